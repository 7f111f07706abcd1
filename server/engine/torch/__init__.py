"""The pure-torch engine: a scheduler on its own thread, a model runner that mixes every adapter kind row by
row, a paged KV cache (torch/engine.py is the Engine)."""
