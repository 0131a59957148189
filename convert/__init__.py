"""Hugging Face checkpoint → GGUF → quantized GGUF (see the converter issue; not built yet)."""
