"""Adapters on frozen linear layers (core: selection, freezing, merging, saving; lora: LoRA)."""
