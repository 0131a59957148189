"""ai-engine: a local LLM engine that serves quantized GGUF models over HTTP."""

__version__ = "0.1.0"
