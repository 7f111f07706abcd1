"""The vLLM engine (vllm/engine.py) and what runs inside vLLM's workers for it."""
