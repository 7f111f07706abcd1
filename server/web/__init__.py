"""The HTTP layer: routes (OpenAI's chat, completions and models; adapters; files; fine-tuning jobs; health and
metrics) and their wire format. Data flows one way: these routes → server/router.py → an engine."""
