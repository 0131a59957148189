"""Gemma 2: Gemma's (1 + w) norms, plus post-norms, logit soft-capping and local attention.

llama.cpp hard-codes what config.json could vary: every other layer (0, 2, …) uses the sliding
window, and queries are scaled by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 46-layer 27B).
A config that departs from that cannot be represented, so it is refused rather than converted wrong.
"""

from __future__ import annotations

import math

import gguf

from convert.arch.base import register
from convert.arch.gemma import Gemma
from convert.errors import ConvertError


def check_query_scale(arch: Gemma, layers_27b: int) -> None:
    """llama.cpp infers the attention scale from the layer count; check config.json agrees."""
    scalar = arch.config.get("query_pre_attn_scalar")
    if scalar is None:
        return
    expected = arch.hidden / arch.n_head if arch.n_layers == layers_27b else arch.head_dim
    if not math.isclose(float(scalar), expected):
        raise ConvertError(f"{arch.hf_name}: query_pre_attn_scalar={scalar} but llama.cpp scales "
                           f"queries by 1/sqrt({expected:g}) for a {arch.n_layers}-layer model")


def check_layer_types(arch: Gemma, every: int) -> None:
    """llama.cpp makes every `every`-th layer global and the rest sliding-window; check config.json."""
    types = arch.config.get("layer_types")
    if not types:
        return
    expected = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                for i in range(arch.n_layers)]
    if list(types) != expected:
        raise ConvertError(f"{arch.hf_name}: layer_types {types} differ from llama.cpp's fixed "
                           f"pattern (one global layer in {every})")


@register("Gemma2ForCausalLM")
class Gemma2(Gemma):
    gguf_arch = gguf.MODEL_ARCH.GEMMA2

    def add_arch_hparams(self, w: gguf.GGUFWriter) -> None:
        check_query_scale(self, layers_27b=46)
        check_layer_types(self, every=2)
        w.add_sliding_window(int(self.require("sliding_window")))
        if (cap := self.config.get("attn_logit_softcapping")) is not None:
            w.add_attn_logit_softcapping(float(cap))
        if (cap := self.config.get("final_logit_softcapping")) is not None:
            w.add_final_logit_softcapping(float(cap))
