"""Which sequences compute which tokens in the next step.

Continuous batching: every step takes up to ``max_num_batched_tokens`` tokens, first one chunk
for each running sequence in arrival order (a decode is a chunk of one token; a long prompt is
cut into chunks that share the step with the decodes), then admits waiting sequences while
tokens, sequence slots and blocks last.  When a running sequence needs a block and none is
free, the most recently admitted sequence is preempted: its blocks are released and it goes
back to the head of the queue, to be recomputed later (its tokens are kept, so nothing it has
produced is lost or produced twice).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_pool import BlockPool
from .sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens of seq computed this step, from seq.num_computed on

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so its logits are sampled."""
        return self.seq.num_computed + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(self, pool: BlockPool, *, max_num_seqs: int = 64, max_num_batched_tokens: int = 512):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be ≥ 1")
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of admission
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted = False
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            if budget == 0:
                break
            num = min(seq.num_uncomputed, budget)
            while not self.pool.grow(seq, seq.num_computed + num):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                chunks.append(ScheduledChunk(seq, num))
                budget -= num
        # Admit new work only when nothing had to give way: otherwise it would thrash.
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix = self.pool.cached_prefix(seq)
            num = min(len(seq) - len(prefix) * self.pool.block_size, budget)
            if not self.pool.can_admit(seq, prefix, len(prefix) * self.pool.block_size + num):
                break
            self.waiting.popleft()
            self.pool.admit(seq, prefix)
            if seq.num_cached_prompt == 0:
                seq.num_cached_prompt = seq.num_computed
            assert self.pool.grow(seq, seq.num_computed + num)
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, num))
            budget -= num
        return chunks

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def computed(self, chunks: list[ScheduledChunk]) -> None:
        """After the step ran: the chunks' K/V are in the cache; full blocks join the prefix cache."""
        for chunk in chunks:
            chunk.seq.num_computed += chunk.num_tokens
            self.pool.register_full_blocks(chunk.seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` (done, stopped or aborted), wherever it is, and release its blocks."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.pool.release(seq)
        else:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
