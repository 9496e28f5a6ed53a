"""Beam search over the paged cache, sharing blocks between beams (copy on write).

Beams are sequences.  A beam chosen by two successors is forked: the child shares every block
of its parent (the pool counts references), and only the partly filled last block is copied,
by whichever of them writes into it first.  Finished hypotheses are scored as in transformers:
the sum of log-probabilities ÷ generated length ** length_penalty; with ``early_stopping`` the
search ends once ``num_beams`` have finished, otherwise when no running beam can still beat
the worst of them at its current length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scheduler import ScheduledChunk
from .sequence import SamplingParams, Sequence


@dataclass
class Hypothesis:
    token_ids: list[int]  # generated tokens (eos included if it ended with one)
    score: float  # log-probability ÷ len ** length_penalty
    log_prob: float


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def beam_search(engine, prompt: list[int], *, num_beams: int, max_new_tokens: int, eos_token_ids: set[int],
                min_new_tokens: int = 0, length_penalty: float = 1.0, early_stopping: bool = False,
                num_return_sequences: int = 1) -> list[Hypothesis]:
    """The best ``num_return_sequences`` hypotheses after ``prompt``, best first."""
    if engine.has_unfinished_requests():
        raise RuntimeError("beam search needs the engine to itself: finish or abort the running requests first")
    pool, runner = engine.pool, engine.runner
    params = SamplingParams(max_new_tokens=max_new_tokens)
    root = Sequence(prompt, params)
    pool.admit(root, pool.cached_prefix(root))
    beams: list[Sequence] = [root]
    try:
        logits = _prefill(engine, root)
        scores = np.zeros(1)
        finished: list[Hypothesis] = []
        for step in range(max_new_tokens):
            logprobs = log_softmax(logits.astype(np.float32)).astype(np.float64)
            if step < min_new_tokens:
                logprobs[:, list(eos_token_ids)] = -np.inf
            total = (scores[:, None] + logprobs).ravel()
            order = np.argsort(-total, kind="stable")[:2 * num_beams]
            chosen = []
            for rank, flat in enumerate(order):
                beam, token = divmod(int(flat), logprobs.shape[1])
                if token in eos_token_ids:
                    if rank < num_beams:
                        finished.append(_hypothesis(beams[beam], [token], total[flat], length_penalty))
                    continue
                chosen.append((beam, token, total[flat]))
                if len(chosen) == num_beams:
                    break
            if not chosen or step == max_new_tokens - 1 or _done(finished, chosen, step + 1, num_beams, length_penalty,
                                                     early_stopping):
                finished += [_hypothesis(beams[b], [t], s, length_penalty) for b, t, s in chosen]
                break
            beams = _advance(pool, beams, chosen)
            scores = np.array([s for _, _, s in chosen])
            copies = [c for seq in beams for c in pool.make_writable(seq, seq.num_computed)]
            runner.copy_blocks(copies)
            for seq in beams:
                if not pool.grow(seq, len(seq)):
                    raise MemoryError(f"beam search ran out of KV blocks ({len(pool.blocks)} in the cache)")
            chunks = [ScheduledChunk(seq, 1) for seq in beams]
            logits = runner.run(chunks)
            for seq in beams:
                seq.num_computed += 1
                pool.register_full_blocks(seq)
        finished.sort(key=lambda h: -h.score)
        return finished[:num_return_sequences]
    finally:
        for seq in beams:
            pool.release(seq)


def _prefill(engine, seq: Sequence) -> np.ndarray:
    """Compute the prompt (in chunks of the engine's token budget); the last token's logits."""
    logits = None
    while seq.num_uncomputed:
        num = min(seq.num_uncomputed, engine.scheduler.max_num_batched_tokens)
        if not engine.pool.grow(seq, seq.num_computed + num):
            raise MemoryError(f"the prompt does not fit in the KV cache ({len(engine.pool.blocks)} blocks)")
        logits = engine.runner.run([ScheduledChunk(seq, num)])
        seq.num_computed += num
        engine.pool.register_full_blocks(seq)
    return logits


def _advance(pool, beams: list[Sequence], chosen) -> list[Sequence]:
    """The next beams: a parent chosen once continues itself; chosen again, it is forked first."""
    claimed, successors = set(), []
    for beam, token, _ in chosen:
        parent = beams[beam]
        if beam in claimed:
            child = Sequence(parent.tokens, parent.params)
            child.prompt_len = parent.prompt_len
            pool.fork(parent, child)
            successors.append((child, token))
        else:
            claimed.add(beam)
            successors.append((parent, token))
    for index, seq in enumerate(beams):
        if index not in claimed:
            pool.release(seq)
    for seq, token in successors:
        seq.tokens.append(token)
    return [seq for seq, _ in successors]


def _hypothesis(seq: Sequence, extra: list[int], log_prob: float, length_penalty: float) -> Hypothesis:
    tokens = seq.output_ids + extra
    return Hypothesis(tokens, float(log_prob) / len(tokens) ** length_penalty, float(log_prob))


def _done(finished, chosen, length, num_beams, length_penalty, early_stopping) -> bool:
    if len(finished) < num_beams:
        return False
    if not chosen:
        return True
    if early_stopping:
        return True
    worst = sorted(h.score for h in finished)[-num_beams]
    best_running = max(s for _, _, s in chosen) / length ** length_penalty
    return worst >= best_running
