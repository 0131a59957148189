"""The KV cache's element types (the KV_CACHE_TYPE setting), declared once.

The settings check a name against this table, the model manager hands its ggml type id to
llama.cpp, and offload.py derives the bytes per element from it (through gguf's table).
"""

from __future__ import annotations

# Name → ggml type id (ggml.h's `enum ggml_type`, the same numbers as gguf.GGMLQuantizationType).
KV_CACHE_TYPES = {"f16": 1, "f32": 0, "bf16": 30, "q8_0": 8, "q5_1": 7, "q5_0": 6, "q4_1": 3, "q4_0": 2}
# The others are quantized, and llama.cpp quantizes the V cache only with flash attention.
FLOAT_KV_TYPES = ("f16", "f32", "bf16")
