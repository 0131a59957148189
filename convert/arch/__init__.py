"""One module per model family, each registered by its Hugging Face architecture name.

Importing this package registers them all; `architecture_for(checkpoint)` picks the right one.
"""

from __future__ import annotations

from convert.arch import gemma, gemma2, gemma3, llama, qwen2  # noqa: F401  (registers)
from convert.arch.base import Architecture, OutTensor, architecture_for, supported_architectures

__all__ = ["Architecture", "OutTensor", "architecture_for", "supported_architectures"]
