"""Gemma (1): a Llama-like decoder whose RMSNorm multiplies by (1 + w).

transformers stores w; llama.cpp's norm multiplies by the stored weight, so every norm weight is
written as 1 + w. Input and output embeddings are tied (llama.cpp reuses token_embd; its graph also
scales the embeddings by sqrt(hidden), as transformers does). RoPE is NeoX-style, so no permutation.
"""

from __future__ import annotations

import gguf

from convert.arch.base import Architecture, OutTensor, register
from convert.errors import ConvertError

NORM_KINDS = {
    gguf.MODEL_TENSOR.ATTN_NORM, gguf.MODEL_TENSOR.FFN_NORM, gguf.MODEL_TENSOR.OUTPUT_NORM,
    gguf.MODEL_TENSOR.ATTN_POST_NORM, gguf.MODEL_TENSOR.FFN_PRE_NORM,
    gguf.MODEL_TENSOR.FFN_POST_NORM, gguf.MODEL_TENSOR.ATTN_Q_NORM, gguf.MODEL_TENSOR.ATTN_K_NORM,
}


@register("GemmaForCausalLM")
class Gemma(Architecture):
    gguf_arch = gguf.MODEL_ARCH.GEMMA
    tied_embeddings_default = True

    def skip(self, hf_name: str) -> bool:
        # llama.cpp's Gemma and Gemma 2 graphs have no output tensor: lm_head is the embeddings.
        if hf_name == "lm_head.weight":
            if not self.tied_embeddings:
                raise ConvertError(f"{self.hf_name}: an untied lm_head cannot be represented in "
                                   f"llama.cpp's {self.gguf_name} graph")
            return True
        return super().skip(hf_name)

    def transform(self, t: OutTensor) -> None:
        if t.kind in NORM_KINDS:
            t.shift = 1.0
