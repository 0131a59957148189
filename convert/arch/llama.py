"""Llama 1/2/3 and Mistral: the reference decoder, plus two quirks.

- Q/K permutation: transformers stores q_proj/k_proj with each head's rotary halves split
  (rotate_half); llama.cpp's LLAMA graph rotates interleaved pairs, so the rows of each head are
  re-ordered back to the interleaved layout. Biases (if any) get the same permutation.
- Llama 3.1's "llama3" RoPE scaling is a per-frequency factor table, stored as `rope_freqs`.
Mistral's sliding window (v0.1) is ignored by llama.cpp; it only matters past 4096 tokens.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from convert.arch.base import Architecture, OutTensor, T, register


def interleave_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that turns each head's [first half | second half] into interleaved pairs."""
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, 2, half).swapaxes(1, 2).reshape(-1)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's RoPE scaling (as transformers' _compute_llama3_parameters)."""
    base = float(rope.get("rope_theta", 500000.0))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


@register("LlamaForCausalLM", "MistralForCausalLM")
class Llama(Architecture):
    gguf_arch = gguf.MODEL_ARCH.LLAMA

    def add_rope_scaling(self, w: gguf.GGUFWriter, rope: dict) -> None:
        if (rope.get("rope_type") or rope.get("type")) == "llama3":
            return  # expressed by the rope_freqs tensor instead of keys
        super().add_rope_scaling(w, rope)

    def transform(self, t: OutTensor) -> None:
        if t.kind is T.ATTN_Q:
            t.rows = interleave_rows(t.shape[0], self.n_head)
        elif t.kind is T.ATTN_K:
            t.rows = interleave_rows(t.shape[0], self.n_head_kv)

    def extra_tensors(self) -> list[OutTensor]:
        rope = self.rope()
        if (rope.get("rope_type") or rope.get("type")) != "llama3":
            return []
        factors = llama3_rope_factors(rope, self.head_dim)
        name = gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight"
        return [OutTensor(name, T.ROPE_FREQS, factors.shape, data=factors, keep_f32=True)]
