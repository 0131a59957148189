"""Embeddings from a loaded model: a second llama.cpp context, with embeddings on, over the same
weights as the model's generation context (engine/runtime.py).

How a vector is made depends on the GGUF's `<arch>.pooling_type`, which llama.cpp reads:
- A model that declares pooling (a dedicated embedding model: BERT-like, EmbeddingGemma,
  Qwen3-Embedding, nomic...) is pooled by llama.cpp itself, as its metadata says (mean, CLS or
  last token; the model's own dense layers after it, if any). Its whole input is one micro-batch,
  as llama.cpp requires for pooling (and non-causal attention needs), so the input limit is the
  smallest of N_CTX, the model's training context and N_BATCH.
- A causal LM without pooling metadata (the default Gemma 3 270M, any chat model) gets the hidden
  state of its **last token** (`LAST`): under causal attention it is the only position that has
  read the whole input, which is why decoder-based embedding models (e5-mistral, Qwen3-Embedding,
  gte-Qwen) pool that way, and it is what Ollama's runner returns for a model without pooling.
  The input is read in chunks of EMBED_CHUNK tokens through the context's KV cache with
  embeddings off (a plain prompt read: no output, no logits), and only its final token with
  embeddings on, so the limit is min(N_CTX, training context). With embeddings on, llama.cpp
  outputs every token of a decode and computes its logits too (262,144 a token for Gemma 3 270M:
  168M multiply-adds against about 100M for its layers, and 1 MiB of logits a token to store).
  The final token's vector is the same either way for the same chunks (tested bit for bit here);
  llama.cpp's results do move in the last digits with how a sequence is split into micro-batches.
- Reranking heads (`rank`) are not embeddings: such a model is refused with a 400.

The context holds one sequence and is used by one request at a time (`Embedder` in
engine/embed_service.py admits them); its decode calls take the runtime's `Turn`, the same one
the scheduler's decode steps take, so an embedding is read between two generation steps instead
of competing with them for the cores.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

import numpy as np

from engine.errors import BadRequest, EngineError
from engine.runtime import RuntimeClosed, Turn, flash_attn_type

log = logging.getLogger(__name__)

MAX_INPUTS = 2048  # texts (or token lists) in one request, as OpenAI's embeddings API allows
EMBED_CHUNK = 64  # tokens a causal LM reads per decode (its logits buffer: EMBED_CHUNK x n_vocab floats)
POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}


@dataclass(frozen=True)
class Pooling:
    """How a model's vectors are made: `kind` (mean, cls, last) and whether llama.cpp pools
    (`native`, from the GGUF's metadata) or the engine takes the last token of a causal LM."""

    kind: str
    native: bool

    @property
    def describe(self) -> str:
        return f"{self.kind} ({'from the GGUF metadata' if self.native else 'default for a causal LM'})"


def pooling_of(metadata: dict[str, str]) -> Pooling:
    """The pooling a model's metadata declares (`<arch>.pooling_type`), else LAST for a causal LM.
    A reranker (`rank`) is refused: it scores pairs, it does not embed."""
    arch = metadata.get("general.architecture", "")
    raw = metadata.get(f"{arch}.pooling_type")
    try:
        value = int(raw) if raw not in (None, "") else -1
    except ValueError:
        value = -1
    if value == 4:
        raise BadRequest("this model is a reranker (pooling_type rank): it scores pairs of texts and gives no "
                         "embeddings", field="model")
    if value in (1, 2, 3):
        return Pooling(POOLING_NAMES[value], native=True)
    return Pooling("last", native=False)


def l2_normalize(vector: np.ndarray) -> np.ndarray:
    """The vector scaled to length 1 (Ollama's and llama-server's normalization; a zero vector stays)."""
    norm = float(np.linalg.norm(vector))
    return vector / max(norm, 1e-12)


def shorten(vector: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first `dimensions` values, normalized again (Matryoshka truncation, as Ollama's
    /api/embed and OpenAI's `dimensions` do); the vector as it is when None."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    return l2_normalize(vector[:dimensions])


def base64_floats(vector: np.ndarray) -> str:
    """Little-endian float32 bytes in base64: what OpenAI's `encoding_format: base64` returns and
    its clients decode (numpy.frombuffer(..., dtype="float32"))."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


class EmbeddingContext:
    """A llama.cpp context with embeddings on, over `runtime`'s model (one sequence). `embed`
    returns the raw pooled vector of a token list; `close` frees the context (before the model:
    engine/model_residency.py closes it first)."""

    def __init__(self, runtime, pooling: Pooling, *, n_ctx: int, n_batch: int, n_threads: int,
                 n_threads_batch: int, flash_attn: str) -> None:
        import llama_cpp as lib
        from llama_cpp import _internals

        self._lib, self.runtime, self.pooling = lib, runtime, pooling
        self.turn: Turn = runtime.turn
        model = runtime.model.model
        n_train = lib.llama_model_n_ctx_train(model) or n_ctx
        # The longest input: a native pooling reads it in one micro-batch; LAST reads it in chunks.
        self.limit = min(n_ctx, n_train, n_batch) if pooling.native else min(n_ctx, n_train)
        self.chunk = self.limit if pooling.native else min(EMBED_CHUNK, self.limit)
        params = lib.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = lib.LLAMA_POOLING_TYPE_UNSPECIFIED if pooling.native else lib.LLAMA_POOLING_TYPE_NONE
        params.n_ctx = self.limit
        params.n_seq_max = 1
        params.n_batch = params.n_ubatch = self.chunk
        params.n_threads, params.n_threads_batch = n_threads, n_threads_batch
        params.flash_attn_type = flash_attn_type(flash_attn)
        params.no_perf = True
        self.context = _internals.LlamaContext(model=runtime.model, params=params, verbose=False)
        self.ctx = self.context.ctx
        self.mem = lib.llama_get_memory(self.ctx)  # None for encoder-only models (BERT): nothing to clear
        self.n_embd = lib.llama_model_n_embd_out(model)
        self.n_vocab = runtime.n_vocab
        self.adds_eos = bool(lib.llama_vocab_get_add_eos(runtime.vocab))
        self._batch = lib.llama_batch_init(self.chunk, 0, 1)
        self._embeddings_on = True  # as created; LAST turns it off to read all but the final token
        self._closed = False
        log.info("embedding context for %s: pooling %s, inputs up to %d tokens, %d per decode",
                 runtime.path.name, pooling.describe, self.limit, self.chunk)

    def fit(self, tokens: np.ndarray, limit: int) -> np.ndarray:
        """`tokens` cut to `limit`, keeping a closing token the tokenizer adds (BERT's [SEP],
        Qwen3-Embedding's end of text), on which the model pools."""
        if len(tokens) <= limit:
            return tokens
        if self.adds_eos and limit > 1:
            return np.concatenate([tokens[:limit - 1], tokens[-1:]])
        return tokens[:limit]

    def embed(self, tokens: np.ndarray, deadline_left) -> np.ndarray:
        """The pooled, un-normalized vector of `tokens` (at most `limit`). `deadline_left()` gives
        the seconds left (None: no limit); TimeoutError when they run out, checked before each
        decode.

        With embeddings on, llama.cpp outputs every token, and a causal LM then computes each
        token's logits too (262k of them a token for Gemma 3: more work than the model's layers).
        LAST needs only the final token's hidden state, so everything before it is read with
        embeddings off and no output (a prompt read, filling the KV cache), and the final token
        alone with embeddings on."""
        lib = self._lib
        if self._closed:
            raise RuntimeClosed("the model was closed (switched out); retry the request")
        if self.mem:
            lib.llama_memory_clear(self.mem, True)
        if self.pooling.native:
            self._decode(tokens, 0, deadline_left, embeddings=True)
            ptr = lib.llama_get_embeddings_seq(self.ctx, 0)
        else:
            for start in range(0, len(tokens) - 1, self.chunk):
                self._decode(tokens[start:min(start + self.chunk, len(tokens) - 1)], start, deadline_left,
                             embeddings=False)
            self._decode(tokens[-1:], len(tokens) - 1, deadline_left, embeddings=True)
            ptr = lib.llama_get_embeddings_ith(self.ctx, -1)
        if not ptr:
            raise EngineError("llama.cpp returned no embedding for this input")
        vector = np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).astype(np.float32)  # a copy
        if not np.all(np.isfinite(vector)):
            raise EngineError("the embedding has NaN or infinite values")
        return vector

    def _decode(self, part: np.ndarray, start: int, deadline_left, *, embeddings: bool) -> None:
        """One llama_decode of `part` (positions from `start`), in the runtime's turn; every token
        an output when `embeddings`, none otherwise."""
        lib, b = self._lib, self._batch
        for i, token in enumerate(part):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(token), start + i, 1, embeddings
            b.seq_id[i][0] = 0
        b.n_tokens = len(part)
        left = deadline_left()
        if left is not None and left <= 0 or not self.turn.acquire(left):
            raise TimeoutError
        try:
            if not self.pooling.native and embeddings != self._embeddings_on:
                lib.llama_set_embeddings(self.ctx, embeddings)
                self._embeddings_on = embeddings
            rc = lib.llama_decode(self.ctx, b)
        finally:
            self.turn.release()
        if rc != 0:
            raise EngineError(f"llama_decode failed with status {rc} while embedding")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._lib.llama_batch_free(self._batch)
        self.context.close()


def context_bytes(path, pooling: Pooling, *, n_ctx: int, n_batch: int, flash_attn: bool) -> int:
    """RAM an embedding context for the model at `path` takes, by the offload planner's rules: its
    KV cache (n_ctx cells, sliding-window layers only the window), its compute buffer and its output
    buffer (logits and embeddings of one decode). Counted in the memory budget when it is made."""
    from engine import offload

    shape = offload.ModelShape.from_layout(offload.read_gguf_layout(path))
    limit = min(n_ctx, n_batch) if pooling.native else n_ctx
    chunk = limit if pooling.native else min(EMBED_CHUNK, limit)
    kv = sum(offload.kv_cache_bytes(shape, limit, n_ubatch=chunk, swa_full=False))
    compute = offload.compute_buffer_bytes(shape, limit, chunk, with_output=True, flash_attn=flash_attn)
    output = 4 * chunk * (shape.n_vocab + shape.n_embd)
    return kv + compute + output
