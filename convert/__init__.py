"""Hugging Face checkpoint → GGUF → quantized GGUF, verified against the original.

`ai-engine convert`, `ai-engine quantize` and `ai-engine verify` (see convert/cli.py). The pipeline:
checkpoint.py reads config and tensors lazily (no torch), arch/ maps each supported architecture
onto the `gguf` package's tables, vocab.py extracts the tokenizer, writer.py streams the GGUF
atomically, quantize.py calls llama.cpp's quantizer, verify.py compares against transformers.
"""

from __future__ import annotations

# Written into every manifest, so a file can be traced to the converter that made it.
CONVERTER_VERSION = "1.0"
