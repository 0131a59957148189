"""The architecture hooks every model family fills in, and the registry that finds them.

The pipeline is fixed (convert/pipeline.py): read config → GGUF keys → vocabulary → tensors → write.
An architecture module says only what differs: its `gguf` architecture, extra hyperparameter keys,
which tensors it drops, and per-tensor transforms (a row permutation or a constant shift). Tensor
names come from the `gguf` package's own tables (`gguf.get_tensor_name_map`); shapes are checked
against config.json before anything is written.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Callable

import gguf
import numpy as np

from convert.checkpoint import Checkpoint, TensorSource, short_repr
from convert.errors import CheckpointError, ConvertError, UnsupportedArchitecture

log = logging.getLogger(__name__)

T = gguf.MODEL_TENSOR
_BLOCK = re.compile(r"\.layers\.(\d+)\.")
# Tensors some checkpoints carry that no llama.cpp graph reads (they are recomputed at run time).
_ALWAYS_SKIPPED = ("rotary_emb.inv_freq",)
_REQUIRED = object()


@dataclass
class OutTensor:
    """One GGUF tensor: where its values come from and how they are transformed on the way."""

    name: str                       # GGUF name, e.g. blk.0.attn_q.weight
    kind: gguf.MODEL_TENSOR
    shape: tuple[int, ...]          # numpy order: (rows, cols)
    source: TensorSource | None = None
    rows: np.ndarray | None = None  # row permutation applied on read (Llama's Q/K)
    shift: float = 0.0              # added to every value (Gemma norms: llama.cpp wants 1 + w)
    data: np.ndarray | None = None  # values the converter computes itself (rope_freqs)
    keep_f32: bool = False          # never stored below f32 (norms, biases, rope factors)

    @property
    def n_rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    def chunk_rows(self, budget_bytes: int) -> int:
        """Rows per read: whole tensor when rows are permuted (a permutation spans all rows)."""
        if self.rows is not None or len(self.shape) <= 1:
            return self.n_rows
        row_bytes = math.prod(self.shape[1:]) * 4
        return max(1, budget_bytes // row_bytes)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32, transformed (a 1-D tensor is always read whole)."""
        whole = len(self.shape) <= 1
        if self.data is not None:
            out = self.data if whole else self.data[start:stop]
            return np.ascontiguousarray(out, dtype=np.float32)
        assert self.source is not None
        if self.rows is not None:
            out = self.source.read()[self.rows if whole else self.rows[start:stop]]
        else:
            out = self.source.read() if whole else self.source.read(start, stop)
        if self.shift:
            out += np.float32(self.shift)
        return out

    def release(self) -> None:
        if self.source is not None:
            self.source.release()


def _tensor_order(t: OutTensor) -> tuple[int, int, str]:
    if t.name.startswith("blk."):
        return 1, int(t.name.split(".")[1]), t.name
    return (2, 0, t.name) if t.name.startswith("output") else (0, 0, t.name)


_REGISTRY: dict[str, type["Architecture"]] = {}


def register(*hf_names: str) -> Callable[[type["Architecture"]], type["Architecture"]]:
    """Class decorator: make an architecture module the converter for these HF architecture names."""
    def add(cls: type[Architecture]) -> type[Architecture]:
        for name in hf_names:
            _REGISTRY[name] = cls
        cls.hf_names = hf_names
        return cls
    return add


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def architecture_for(checkpoint: Checkpoint) -> "Architecture":
    """The registered architecture for config.json's `architectures[0]`, or a clear refusal."""
    names = checkpoint.config.get("architectures") or []
    if not names:
        raise UnsupportedArchitecture(
            f"{checkpoint.folder}/config.json has no 'architectures' entry; supported: "
            + ", ".join(supported_architectures()))
    name = names[0]
    cls = _REGISTRY.get(name)
    if cls is None:
        raise UnsupportedArchitecture(
            f"architecture {name} is not supported; supported: " + ", ".join(supported_architectures()))
    return cls(checkpoint, name)


class Architecture:
    """Base hooks: the Llama-like defaults that most families share."""

    hf_names: ClassVar[tuple[str, ...]] = ()
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    # Tied input/output embeddings when config.json does not say (Gemma ties by design).
    tied_embeddings_default: ClassVar[bool] = False

    def __init__(self, checkpoint: Checkpoint, hf_name: str) -> None:
        self.checkpoint = checkpoint
        self.hf_name = hf_name
        self.config = checkpoint.config
        # No size of a real model exceeds its number of weights; checked here, a hostile config
        # cannot make the tables below (built per layer) or any computed tensor huge.
        self._n_weights = sum(math.prod(t.shape) for t in checkpoint.tensors.values())
        self.n_layers = self.size("num_hidden_layers")
        if self.n_layers > len(checkpoint.tensors):
            raise CheckpointError(f"config.json has {self.n_layers} layers but the checkpoint holds "
                                  f"only {len(checkpoint.tensors)} tensors")
        self.hidden = self.size("hidden_size")
        self.n_head = self.size("num_attention_heads")
        self.n_head_kv = self.size("num_key_value_heads", self.n_head)
        self.head_dim = self.size("head_dim", self.hidden // self.n_head)
        self.n_ff = self.size("intermediate_size")
        self.n_vocab: int | None = self.size("vocab_size", None)
        self.name_map = gguf.get_tensor_name_map(self.gguf_arch, self.n_layers)

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", self.tied_embeddings_default))

    def size(self, key: str, default: Any = _REQUIRED) -> Any:
        """A positive integer from config.json, or `default` when it is absent (or null)."""
        value = self.config.get(key)
        if value is None:
            return self.require(key) if default is _REQUIRED else default
        if type(value) is not int or value <= 0:
            raise CheckpointError(f"config.json: '{key}' must be a positive integer, "
                                  f"not {short_repr(value)}")
        if value > self._n_weights:
            raise CheckpointError(f"config.json: '{key}' is {value}, more than the checkpoint's "
                                  f"{self._n_weights} weights in all")
        return value

    def require(self, key: str) -> Any:
        if self.config.get(key) is None:
            raise CheckpointError(f"config.json lacks '{key}', which {type(self).__name__} needs")
        return self.config[key]

    # --- hyperparameters ---------------------------------------------------------------------

    def rope(self, layer_type: str = "full_attention") -> dict[str, Any]:
        """RoPE settings, from transformers 5's `rope_parameters` or 4's `rope_theta`/`rope_scaling`."""
        params = self.config.get("rope_parameters")
        if isinstance(params, dict) and params:
            if isinstance(params.get(layer_type), dict):
                return dict(params[layer_type])
            if "rope_theta" in params or "rope_type" in params:
                return dict(params)
        out = dict(self.config.get("rope_scaling") or {})
        out.setdefault("rope_theta", self.config.get("rope_theta", 10000.0))
        return out

    def add_hparams(self, w: gguf.GGUFWriter) -> None:
        """The keys every llama.cpp decoder reads; families add theirs in `add_arch_hparams`."""
        w.add_context_length(int(self.config.get("max_position_embeddings") or 4096))
        w.add_embedding_length(self.hidden)
        w.add_block_count(self.n_layers)
        w.add_feed_forward_length(self.n_ff)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(float(self.config.get("rms_norm_eps", 1e-6)))
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)
        w.add_rope_dimension_count(self.head_dim)
        rope = self.rope()
        w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        self.add_rope_scaling(w, rope)
        self.add_arch_hparams(w)

    def add_rope_scaling(self, w: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind == "default":
            return
        factor = float(rope.get("factor", 1.0))
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif kind == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            if (orig := rope.get("original_max_position_embeddings")) is not None:
                w.add_rope_scaling_orig_ctx_len(int(orig))
        else:
            raise ConvertError(f"{self.hf_name}: RoPE scaling '{kind}' is not supported by this converter")

    def add_arch_hparams(self, w: gguf.GGUFWriter) -> None:
        """Family-specific keys (soft-capping, sliding window...)."""

    # --- tensors -----------------------------------------------------------------------------

    def skip(self, hf_name: str) -> bool:
        """Source tensors that have no place in the GGUF file."""
        if hf_name.endswith(_ALWAYS_SKIPPED):
            return True
        # A tied model may still carry a copy of the embeddings as lm_head; llama.cpp reuses
        # token_embd when output.weight is absent, so the copy is dropped.
        return hf_name == "lm_head.weight" and self.tied_embeddings

    def transform(self, t: OutTensor) -> None:
        """Per-tensor quirks (permute, shift); the default changes nothing."""

    def extra_tensors(self) -> list[OutTensor]:
        """Tensors the converter computes (e.g. Llama 3's rope_freqs)."""
        return []

    def expected_shape(self, kind: gguf.MODEL_TENSOR, is_bias: bool) -> tuple[int | None, ...] | None:
        """The shape config.json implies for a tensor kind (None: not checked; a None size: any)."""
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        if is_bias:
            return {T.ATTN_Q: (q,), T.ATTN_K: (kv,), T.ATTN_V: (kv,), T.ATTN_OUT: (self.hidden,)}.get(kind)
        return {
            T.TOKEN_EMBD: (self.n_vocab, self.hidden), T.OUTPUT: (self.n_vocab, self.hidden),
            T.ATTN_Q: (q, self.hidden), T.ATTN_K: (kv, self.hidden), T.ATTN_V: (kv, self.hidden),
            T.ATTN_OUT: (self.hidden, q), T.FFN_GATE: (self.n_ff, self.hidden),
            T.FFN_UP: (self.n_ff, self.hidden), T.FFN_DOWN: (self.hidden, self.n_ff),
            T.ATTN_NORM: (self.hidden,), T.FFN_NORM: (self.hidden,), T.OUTPUT_NORM: (self.hidden,),
            T.ATTN_POST_NORM: (self.hidden,), T.FFN_PRE_NORM: (self.hidden,),
            T.FFN_POST_NORM: (self.hidden,), T.ATTN_Q_NORM: (self.head_dim,),
            T.ATTN_K_NORM: (self.head_dim,),
        }.get(kind)

    def tensor_plan(self) -> list[OutTensor]:
        """Map, transform and check every source tensor; raise on anything unmapped or misshapen."""
        kinds = {gguf.TENSOR_NAMES[k]: k for k in gguf.MODEL_TENSORS[self.gguf_arch]}
        out: list[OutTensor] = []
        per_block: dict[int, set[str]] = {}
        for hf_name, source in self.checkpoint.tensors.items():
            if self.skip(hf_name):
                log.debug("skipping %s", hf_name)
                continue
            name = self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ConvertError(f"{self.hf_name}: tensor {hf_name} {list(source.shape)} has no "
                                   f"GGUF counterpart for {self.gguf_name}; refusing to drop it")
            block = _BLOCK.search(hf_name)
            base = re.sub(r"^blk\.\d+\.", "blk.{bid}.", name.rsplit(".", 1)[0])
            kind = kinds.get(base)
            if kind is None:
                raise ConvertError(f"{self.hf_name}: {hf_name} maps to unknown tensor {name}")
            t = OutTensor(name, kind, tuple(source.shape), source=source)
            self._check_shape(hf_name, t)
            t.keep_f32 = len(t.shape) <= 1
            self.transform(t)
            out.append(t)
            if block is not None:
                per_block.setdefault(int(block.group(1)), set()).add(name.split(".", 2)[2])
        self._check_blocks(per_block)
        self._check_embeddings(out)
        out.extend(self.extra_tensors())
        # A fixed order (embeddings, blocks in order, head) makes the file independent of how the
        # checkpoint was sharded.
        return sorted(out, key=_tensor_order)

    def _check_shape(self, hf_name: str, t: OutTensor) -> None:
        """Before any read: the shape config.json implies, and never an empty tensor."""
        expected = self.expected_shape(t.kind, t.name.endswith(".bias"))
        if expected is not None and (len(t.shape) != len(expected) or any(
                e is not None and e != d for e, d in zip(expected, t.shape))):
            implied = ", ".join("*" if e is None else str(e) for e in expected)
            raise ConvertError(f"{self.hf_name}: {hf_name} has shape {list(t.shape)} but "
                               f"config.json implies [{implied}]")
        if math.prod(t.shape) == 0:
            raise CheckpointError(f"{self.hf_name}: {hf_name} has shape {list(t.shape)}, "
                                  "with no values at all")

    def _check_blocks(self, per_block: dict[int, set[str]]) -> None:
        if sorted(per_block) != list(range(self.n_layers)):
            raise CheckpointError(f"{self.hf_name}: config.json has {self.n_layers} layers but the "
                                  f"weights have blocks {sorted(per_block)[:8]}…")
        first = per_block[0]
        for bid, names in per_block.items():
            if names != first:
                missing = sorted(first ^ names)
                raise CheckpointError(f"{self.hf_name}: layer {bid} differs from layer 0 in "
                                      f"{', '.join(missing)}; the checkpoint is incomplete")

    def _check_embeddings(self, tensors: list[OutTensor]) -> None:
        names = {t.name for t in tensors}
        if "token_embd.weight" not in names:
            raise CheckpointError(f"{self.hf_name}: no token embeddings (model.embed_tokens.weight)")
        if not self.tied_embeddings and "output.weight" not in names:
            raise CheckpointError(f"{self.hf_name}: config.json says the embeddings are not tied, "
                                  "but there is no lm_head.weight")
