"""Rotary position embeddings: the parameters of a config and the cos/sin tables RotaryEmbedding reads."""

from __future__ import annotations

import math

import numpy as np


def rope_parameters(config: dict) -> dict:
    """The RoPE parameters (default or YaRN); a clear error for other kinds."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise NotImplementedError(f"rope type {kind!r} is not supported yet (default, linear, llama3 and yarn are)")
    params["rope_type"] = kind
    params["rope_theta"] = float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)
    return params


def rope_caches(rope: dict, dim: int, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, dim / 2] as transformers computes them (default, linear, llama3, YaRN)."""
    base = rope["rope_theta"]
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32).astype(np.float64) / dim)
    inv_freq, attention_factor = 1.0 / pos_freqs, 1.0
    if rope["rope_type"] == "yarn":
        factor = rope.get("factor") or max_positions / rope["original_max_position_embeddings"]
        original = rope["original_max_position_embeddings"]

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = rope.get("attention_factor")
        if attention_factor is None:
            m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
            attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

        def correction_dim(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(rope.get("beta_fast") or 32), correction_dim(rope.get("beta_slow") or 1)
        if rope.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    elif rope["rope_type"] == "linear":
        inv_freq = inv_freq / rope["factor"]
    elif rope["rope_type"] == "llama3":  # wavelengths beyond the original context are stretched
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        original = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) & ~(wavelen > original / low)
        inv_freq = np.where(medium, smoothed, scaled)
    inv_freq = inv_freq.astype(np.float32).astype(np.float64)  # transformers keeps inv_freq in float32
    freqs = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    return np.cos(freqs) * attention_factor, np.sin(freqs) * attention_factor
