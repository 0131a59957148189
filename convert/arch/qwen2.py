"""Qwen2 / Qwen2.5: the Llama layout with biases on q/k/v and NeoX-style RoPE (no permutation).

Small Qwen2 models tie their embeddings. Qwen2's optional sliding window (off in released models)
is not implemented by llama.cpp, so a config that turns it on is refused.
"""

from __future__ import annotations

import gguf

from convert.arch.base import Architecture, register
from convert.errors import ConvertError


@register("Qwen2ForCausalLM")
class Qwen2(Architecture):
    gguf_arch = gguf.MODEL_ARCH.QWEN2

    def add_arch_hparams(self, w: gguf.GGUFWriter) -> None:
        if self.config.get("use_sliding_window"):
            raise ConvertError(f"{self.hf_name}: use_sliding_window=true is not supported by llama.cpp")
