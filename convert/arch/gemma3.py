"""Gemma 3 (text): Gemma 2's layout with q/k norms, no attention soft-capping, and two RoPE bases.

Five sliding-window layers use RoPE base 10 000 and every sixth layer is global with `rope_theta`
(1 000 000); llama.cpp hard-codes the pattern and the local base, so other values are refused.
The q/k norms are Gemma norms too (1 + w). Embeddings are tied; an lm_head copy is dropped.
"""

from __future__ import annotations

import gguf

from convert.arch.base import register
from convert.arch.gemma import Gemma
from convert.arch.gemma2 import check_layer_types, check_query_scale
from convert.errors import ConvertError

LOCAL_ROPE_BASE = 10000.0  # what llama.cpp uses for Gemma 3's sliding-window layers


@register("Gemma3ForCausalLM")
class Gemma3(Gemma):
    gguf_arch = gguf.MODEL_ARCH.GEMMA3

    def skip(self, hf_name: str) -> bool:
        return super(Gemma, self).skip(hf_name)  # output.weight exists in GEMMA3 if untied

    def add_arch_hparams(self, w: gguf.GGUFWriter) -> None:
        check_query_scale(self, layers_27b=62)
        check_layer_types(self, every=6)
        params = self.config.get("rope_parameters")
        if isinstance(params, dict) and isinstance(params.get("sliding_attention"), dict):
            local_base = float(params["sliding_attention"].get("rope_theta", LOCAL_ROPE_BASE))
        else:  # transformers 4 configs
            local_base = float(self.config.get("rope_local_base_freq", LOCAL_ROPE_BASE))
        if local_base != LOCAL_ROPE_BASE:
            raise ConvertError(f"{self.hf_name}: local RoPE base {local_base:g} is not the "
                               f"{LOCAL_ROPE_BASE:g} that llama.cpp uses for Gemma 3")
        w.add_sliding_window(int(self.require("sliding_window")))
        if self.config.get("attn_logit_softcapping") is not None:
            raise ConvertError(f"{self.hf_name}: attention soft-capping is not part of Gemma 3")
        if (cap := self.config.get("final_logit_softcapping")) is not None:
            w.add_final_logit_softcapping(float(cap))
