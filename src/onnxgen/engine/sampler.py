"""The next token of each sequence from its logits, in numpy.

The order of the filters is transformers' (repetition penalty, then temperature, top-k, top-p,
min-p).  Each request samples from its own generator, seeded per request, so its tokens do
not depend on what else shares the batch.
"""

from __future__ import annotations

import numpy as np

from .sequence import Sequence


def penalize_repetition(logits: np.ndarray, seen: list[int], penalty: float) -> np.ndarray:
    """CTRL's penalty as transformers applies it: seen tokens' positive logits ÷ penalty, negative × penalty."""
    if penalty == 1.0 or not seen:
        return logits
    ids = np.unique(np.asarray(seen, np.int64))
    chosen = logits[ids]
    logits = logits.copy()
    logits[ids] = np.where(chosen > 0, chosen / penalty, chosen * penalty)
    return logits


def probabilities(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """The distribution to sample from: the logits tempered, then cut by top-k, top-p and min-p."""
    scaled = logits.astype(np.float64) / temperature
    if 0 < top_k < scaled.size:
        kth = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:  # the smallest set of most likely tokens whose mass reaches top_p
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        probs[order[mass_before >= top_p]] = 0.0
    if min_p > 0.0:
        probs[probs < min_p * probs.max()] = 0.0
    return probs / probs.sum()


def sample(seq: Sequence, logits: np.ndarray, eos_ids: set[int]) -> int:
    params = seq.params
    logits = penalize_repetition(logits, seq.tokens, params.repetition_penalty)
    if len(seq.output_ids) < params.min_new_tokens and eos_ids:
        logits = logits.copy()
        logits[list(eos_ids)] = -np.inf
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    probs = probabilities(logits, params.temperature, params.top_k, params.top_p, params.min_p)
    return int(seq.rng.choice(probs.size, p=probs))
