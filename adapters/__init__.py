"""Adapter formats, validation and registry (LoRA, prefix, prompt, bottleneck)."""
