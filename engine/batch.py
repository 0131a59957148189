"""Each scheduler step's batch: the next token of every decoding sequence, then chunks of the
prompts being read (short reads first, then in the order they came: engine/forecast.py
`read_order`), within the batch's room (N_BATCH) and, while others generate, a prefill budget
(PREFILL_CHUNK, and PREFILL_STEP_S of reading at the measured speed), so that a long prompt slows
the others' tokens down instead of stopping them. Chunks end where the slot policy says (row
groups), and what each slot holds is recorded once the decode went in.

A step is decoded in parts, one llama_decode each: the decoding sequences' tokens, then each prompt
chunk alone. With a KV stream per sequence, llama.cpp splits a batch into ubatches holding the same
number of tokens of sequences with consecutive ids (`split_equal`): a chunk beside a classmate's
chunk or beside the replies of the slots next to it was cut at their length (66 rows read as 65 and
1, the rest of a 395-row chunk after 116), off the row groups that keep the conversation cache
exact, and a later turn continuing such a prefix answered otherwise than a cold read. Decoded alone,
a chunk is one ubatch; the parts also cost less than the cut pieces (30-55 ms a step here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from engine.admission import DeadlineEstimator
from engine.forecast import read_order
from engine.runtime import Runtime
from engine.sequence import Sequence
from engine.slot_policy import SlotPolicy

PREFILL_STEP_S = 0.5  # at most this much prompt reading in a step while other requests generate


class DecodeFailed(Exception):
    """llama_decode failed: `sequences` are those whose tokens (or pending copies) it held."""

    def __init__(self, cause: Exception, sequences: list[Sequence]) -> None:
        super().__init__(str(cause))
        self.cause, self.sequences = cause, sequences


@dataclass(eq=False)
class Part:
    """One llama_decode of a step: the batch's rows [start, end), the decoding sequences' tokens or
    one prompt chunk (or a saver's placeholder token), and the rows whose logits are sampled."""

    start: int
    end: int
    decoding: list[Sequence] = field(default_factory=list)
    chunk: tuple[Sequence, int] | None = None  # the sequence, tokens
    wants: list[tuple[Sequence, int]] = field(default_factory=list)  # sequences to sample, and their logits row

    def held(self) -> list[Sequence]:
        return self.decoding + ([self.chunk[0]] if self.chunk else [])


@dataclass(eq=False)
class Batch:
    """What one step decodes, as the runtime's batch was filled, in parts."""

    decoding: list[Sequence]  # one token each
    parts: list[Part] = field(default_factory=list)  # decoded in this order (the copies are made at the first)
    saving: list[Sequence] = field(default_factory=list)  # prefixes to save to disk once the copies are made
    placeholder: Sequence | None = None  # a saver's token decoded only so that the copies are made
    n: int = 0  # rows in the batch

    @property
    def prefill_rows(self) -> int:
        return self.n - len(self.decoding)


class BatchBuilder:
    """Fills the runtime's batch each step. `waits_for_leader(seq)`: whether a sequence waits for
    another to read a shared prefix (PrefixSharing.waits_for_leader; it is then left out)."""

    def __init__(self, runtime: Runtime, policy: SlotPolicy, estimator: DeadlineEstimator, prefill_chunk: int,
                 waits_for_leader: Callable[[Sequence], bool]) -> None:
        self.runtime, self.policy, self.estimator = runtime, policy, estimator
        self.prefill_chunk = prefill_chunk
        self.waits_for_leader = waits_for_leader

    def prefill_rows(self) -> int:
        """Prompt tokens a step may read while others generate: PREFILL_CHUNK, and no more than
        PREFILL_STEP_S of reading at the measured speed (a 1B model on 2 cores reads 256 tokens in
        about 2 s, which would hold every reply to one token per 2 s)."""
        if not self.estimator.ready or self.estimator.row_s <= 0:
            return self.prefill_chunk
        by_time = int(PREFILL_STEP_S / self.estimator.row_s)
        return min(self.prefill_chunk, max(4 * self.policy.min_rows, by_time))

    def build(self, active: list[Sequence]) -> Batch:
        """The batch of the `active` sequences (those in slots) for the next decode."""
        rt = self.runtime
        batch = Batch(decoding=[q for q in active if q.pending_token is not None])
        prefilling = sorted((q for q in active if q.pending_token is None),
                            key=lambda q: read_order(len(q.tokens) - q.n_prompt_done, q.started))
        rt.batch_clear()
        if batch.decoding:
            part = Part(0, len(batch.decoding), decoding=batch.decoding)
            for seq in batch.decoding:  # one token each: decoding never waits for a prompt to be read
                part.wants.append((seq, rt.batch_add(seq.slot.seq_id, seq.pending_token, seq.slot.n_kv, True)))
            batch.parts.append(part)
        batch.n = len(batch.decoding)
        # Then prompts, in chunks that fill the rest of the batch; while sequences are generating,
        # at most `prefill_chunk` prompt tokens a step, so that their next tokens are not long in coming.
        budget = min(rt.n_batch, batch.n + self.prefill_rows()) if batch.decoding else rt.n_batch
        self._add_prompts(batch, prefilling, budget)
        if batch.n == 0 and batch.saving:
            # Nothing else to decode, but llama.cpp copies the cells only at a decode: decode the
            # saver's next token, and drop it again (it is read properly next step, with its row group).
            placeholder = batch.placeholder = batch.saving[0]
            rt.batch_add(placeholder.slot.seq_id, int(placeholder.tokens[placeholder.disk_save]),
                         placeholder.disk_save, False)
            batch.n = 1
            batch.parts.append(Part(0, 1))
        return batch

    def _add_prompts(self, batch: Batch, prefilling: list[Sequence], budget: int) -> None:
        rt = self.runtime
        for seq in prefilling:
            if self.waits_for_leader(seq):
                continue
            if seq.disk_save:  # it holds exactly the prefix once this decode has made the copy
                batch.saving.append(seq)
                continue
            start, room = seq.n_prompt_done, budget - batch.n
            if room <= 0:
                break
            if self._sliver(seq, room):
                continue
            end = self.policy.chunk_end(start, room, len(seq.tokens))
            last = end == len(seq.tokens)
            for pos, tok in enumerate(seq.tokens[start:end].tolist(), start):
                rt.batch_add(seq.slot.seq_id, tok, pos, last and pos == end - 1)
            part = Part(batch.n, batch.n + end - start, chunk=(seq, end - start))
            batch.n = part.end
            if last:
                part.wants.append((seq, batch.n - 1))
            batch.parts.append(part)

    def _sliver(self, seq: Sequence, room: int) -> bool:
        """Whether the room left in this step would give `seq` a part shorter than `min_rows` that
        does not finish its prompt: read so, the rest of its prompt would no longer be exact
        (SlotPolicy.exact_after), and classmates waiting to copy it would read it all again. It
        waits for the next step instead (unless N_BATCH itself is that small)."""
        left = len(seq.tokens) - seq.n_prompt_done
        return room < self.policy.min_rows <= self.runtime.n_batch and left > room

    def drop_placeholder(self, batch: Batch) -> None:
        """The decode went in: take the placeholder token out again (before its slot is saved)."""
        if batch.placeholder is not None:
            self.runtime.seq_rm(batch.placeholder.slot.seq_id, batch.placeholder.disk_save, -1)

    def record(self, part: Part) -> None:
        """The part's decode went in: record what its sequences' caches now hold."""
        for seq in part.decoding:
            slot = seq.slot
            slot.kv[slot.n_kv] = seq.pending_token
            slot.n_kv += 1
            seq.pending_token = None
        if part.chunk is not None:
            seq, k = part.chunk
            slot, start = seq.slot, seq.n_prompt_done
            slot.kv[start:start + k] = seq.tokens[start:start + k]
            slot.n_kv = seq.n_prompt_done = start + k
            slot.n_exact = self.policy.exact_after(slot.n_exact, start, k)
