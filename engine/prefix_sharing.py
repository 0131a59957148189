"""Prefix sharing between the sequences of one runtime: a prompt that opens as another sequence's
(a classmate's case prompt) copies those cells instead of reading them again. A sequence still
reading such a prefix is followed: the others wait for it, then copy. What a copy gives is decided
by the slot policy (SlotPolicy.share_point, follow_point), so that it never changes a reply.

llama.cpp makes a copy only at the next decode; until then the donor's cells must not change
(`copy_sources`), and should that decode fail, what the copies wrote is unknown (`copy_targets`)."""

from __future__ import annotations

from typing import Callable

from engine.prompt_cache import common_prefix
from engine.runtime import Runtime
from engine.sequence import Sequence
from engine.slot_policy import MIN_RESTORE_GAIN, Slot, SlotPolicy


class PrefixSharing:
    """`prompts`: the scheduler's disk glue (engine/disk_prompts.py), or None; `truncate(slot,
    keep)`: cuts a slot back (SlotCells.truncate), returning what it keeps."""

    def __init__(self, runtime: Runtime, policy: SlotPolicy, slots: list[Slot], prompts,
                 truncate: Callable[[Slot, int], int], metrics=None) -> None:
        self.runtime, self.policy, self.slots = runtime, policy, slots
        self.prompts, self.truncate, self.metrics = prompts, truncate, metrics
        self.shared_tokens = 0  # prompt tokens copied from another sequence instead of read
        # Slots whose cells a copy reads at the next decode (llama.cpp copies the buffers then): no
        # state may be restored into them before it, or the copy would take the restored cells.
        self.copy_sources: set[int] = set()
        self.copy_targets: set[int] = set()  # slots those copies write: uncertain if the decode fails

    def take(self, seq: Sequence) -> bool:
        """Take the most of `seq`'s prompt that is to be had without reading it: wait for a
        classmate reading it (if that will give the most), else restore it from the disk cache or
        copy it from another sequence, whichever gives more. True if `seq` now waits for a leader."""
        shared, _donor = self.best_donor(seq)
        hit = self.prompts.hit(seq) if self.prompts is not None else None
        on_disk = hit[0] if hit else 0
        if self.follow(seq, beyond=max(shared, on_disk)):
            return True
        if on_disk > shared and seq.slot.seq_id not in self.copy_sources and self.prompts.load(seq, hit):
            return False
        self.share(seq)
        return False

    def share(self, seq: Sequence) -> bool:
        """Copy into `seq`'s slot the longest exact prefix of its prompt that another sequence
        holds (a classmate's case prompt), when that saves at least MIN_RESTORE_GAIN tokens over
        what the slot has: the prefix is read once for the whole class. True if it copied."""
        rt, slot = self.runtime, seq.slot
        best, donor = self.best_donor(seq)
        if donor is None or best < seq.n_prompt_done + MIN_RESTORE_GAIN:
            return False
        save = 0
        if self.prompts is not None:  # what the two share, ending far enough before they part that
            # a third request with a question of its own can continue it from its end (a state past
            # the sliding window is only continued from its end, and every part reads min_rows)
            common = common_prefix(donor.kv[:donor.n_exact], seq.tokens)
            # One classmate saves it; the others copy all they can (and read only their own part).
            saving = [s.seq for s in self.slots if s.seq is not None and s.seq.disk_save]
            save = self.prompts.save_point(seq.tokens, min(best, self.policy.resume_point(common, common)), saving)
        rt.seq_copy(donor.seq_id, slot.seq_id)
        self.copy_sources.add(donor.seq_id)
        self.copy_targets.add(slot.seq_id)
        slot.kv[:donor.n_kv] = donor.kv[:donor.n_kv]
        slot.n_kv, slot.n_exact = donor.n_kv, donor.n_exact
        keep = self.truncate(slot, save or best)
        seq.disk_save = save  # a prefix two requests use: saved for the next class (after the copy lands)
        seq.n_prompt_done = seq.reused = keep
        self.shared_tokens += keep
        if self.metrics is not None:
            self.metrics.cache_hits.labels(cache="shared-prefix").inc()
        return True

    def best_donor(self, seq: Sequence) -> tuple[int, Slot | None]:
        """The other slot whose cells give the most of `seq`'s prompt now, and how much."""
        rt, policy = self.runtime, self.policy
        best, donor = 0, None
        for other in self.slots:
            if other is seq.slot or not other.n_exact:
                continue
            first = rt.seq_pos_min(other.seq_id) if policy.n_swa else 0
            point = policy.share_point(other, seq.tokens, first)
            if point > best:
                best, donor = point, other
        return best, donor

    def follow(self, seq: Sequence, beyond: int = 0) -> bool:
        """If another sequence is still reading a prompt that shares a longer prefix with this one
        than any sequence holds now, wait for it (the batch skips a follower) and copy the prefix
        then, rather than reading it a second time alongside. True if `seq` now follows one. The
        one it follows may itself wait for another, placed earlier still: a sequence only follows
        one placed before it, so no two wait for each other."""
        best, leader = max(beyond, seq.n_prompt_done) + MIN_RESTORE_GAIN - 1, None
        for other in self.slots:
            lead = other.seq
            if lead is None or lead.order >= seq.order or lead.pending_token is not None:
                continue
            point = self.policy.follow_point(lead.tokens, seq.tokens)
            if point > best:
                best, leader = point, lead
        if leader is not None:
            seq.leader, seq.target = leader, best
        return leader is not None

    def waits_for_leader(self, seq: Sequence) -> bool:
        """Whether a follower still waits: its leader is reading (in its slot, not yet past the
        shared prefix). Once it is past, or gone, the follower copies what it can and reads on."""
        lead = seq.leader
        if lead is None:
            return False
        reading = lead.slot is not None and lead.slot.seq is lead and lead.pending_token is None
        if reading and lead.slot.n_exact < seq.target:
            return True
        seq.leader = None
        # Two cases may open alike (the same role-play rules): what it copies may be only that
        # opening, while a classmate now reads the rest of its own case. Then it waits for that one.
        return self.take(seq)

    def copies_done(self) -> None:
        """A decode went in: llama.cpp made the pending copies."""
        self.copy_sources.clear()
        self.copy_targets.clear()

    def copies_failed(self) -> list[Sequence]:
        """A decode failed: the sequences whose cells a pending copy was to write (done or not,
        nobody knows). The copy sources stay marked: a copy llama.cpp did not make is still due."""
        held = [s.seq for s in self.slots if s.seq_id in self.copy_targets]
        self.copy_targets.clear()
        return held
