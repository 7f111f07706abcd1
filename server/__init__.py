"""swapyard's serving side: HTTP API -> router -> engine -> model."""
