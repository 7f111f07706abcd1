"""Engines turn token-id prompts into streams of generated text; routing never sees which one runs."""
