"""Each row samples on its own, from the model's own logits, inside a shared batch.

onnxruntime-genai 0.18 samples a whole batch with one set of search options and one random
seed, so rows with different ``temperature``, ``top_p``, ``top_k`` or ``seed`` could not share a
batch, and a seeded row's answer would depend on the rows beside it. Here the generator always
runs greedy; each step, for the rows that sample, `StepLogits` reads the logits
(``Generator.get_logits``), adds Gumbel noise from the row's own generator
(``numpy.random.default_rng(seed)``) to its filtered, temperature-scaled logits and writes them
back (``Generator.set_logits``). The greedy pick of ``log p / T + Gumbel`` is a sample of
``softmax(log p / T)`` (the Gumbel-max trick), and it stays one under a grammar: llguidance
masks the written logits before the pick, so the sample is drawn from the allowed tokens in the
same proportions. A seeded row's noise depends on its seed and its own steps only, so the same
request gives the same answer whatever batch it shares. Greedy rows keep their logits untouched.

Log probabilities (``logprobs``) are the model's own: ``log_softmax`` of the raw logits, before
temperature, filters or grammar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FILTERED_OFFSET", "RowSampler", "log_softmax", "top_logprobs"]

#: Where a token filtered out by top_k / top_p is put below the kept ones: far enough that no
#: Gumbel draw lifts it over a kept token, finite so that a grammar allowing only filtered
#: tokens still picks the likeliest of them.
FILTERED_OFFSET = 1.0e4
# How many of the likeliest tokens the nucleus is first looked for among.
_NUCLEUS_POOL = 512


@dataclass
class RowSampler:
    """One row's sampling state: its settings and its own random generator."""

    temperature: float
    top_p: float
    top_k: int
    rng: np.random.Generator

    @classmethod
    def of(cls, *, temperature: float, top_p: float, top_k: int, seed: int | None) -> RowSampler:
        """A sampler seeded with ``seed`` (fresh entropy when None)."""
        rng = np.random.default_rng(None if seed is None else seed & (2**64 - 1))
        return cls(temperature=temperature, top_p=top_p, top_k=top_k, rng=rng)

    def noisy(self, logits: np.ndarray) -> np.ndarray:
        """Logits whose greedy pick is this row's sample (float32, the input's shape).

        Only the kept tokens (``top_k``, then ``top_p``) draw noise; the others sit
        `FILTERED_OFFSET` below. Float32 throughout: a step over Phi-3's 32k vocabulary costs
        about half a millisecond per row (more when a flat distribution's nucleus needs a full
        sort).
        """
        scores = logits.astype(np.float32).reshape(-1) / np.float32(self.temperature)
        kept = self._kept(scores)
        size = scores.size if kept is None else kept.size
        uniform = np.maximum(self.rng.random(size, dtype=np.float32), np.float32(1e-30))
        noise = -np.log(-np.log(uniform))
        if kept is None:
            return (scores + noise).reshape(logits.shape)
        noisy = scores - np.float32(FILTERED_OFFSET)
        noisy[kept] = scores[kept] + noise
        return noisy.reshape(logits.shape)

    def _kept(self, scores: np.ndarray) -> np.ndarray | None:
        """Indices of the tokens ``top_k`` and ``top_p`` keep; None for all of them."""
        size = scores.size
        kept = None
        if 0 < self.top_k < size:
            kept = np.argpartition(scores, -self.top_k)[-self.top_k :]
        if self.top_p >= 1.0:
            return kept
        among = kept if kept is not None else np.arange(size)
        # The nucleus usually lies within the likeliest few hundred: sort those first.
        pool = among
        if among.size > _NUCLEUS_POOL:
            pool = among[np.argpartition(scores[among], -_NUCLEUS_POOL)[-_NUCLEUS_POOL:]]
        top = scores[pool].max()
        total = np.exp(scores[among] - top, dtype=np.float64).sum()
        for candidates in (pool, among):
            order = candidates[np.argsort(-scores[candidates], kind="stable")]
            mass = np.cumsum(np.exp(scores[order] - top, dtype=np.float64)) / total
            if mass[-1] >= self.top_p or candidates is among:
                # The smallest prefix whose mass reaches top_p.
                count = int(np.searchsorted(mass, self.top_p)) + 1
                return order[: min(count, order.size)]
        return kept  # not reached: the second pass always returns


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log_softmax`` of one row's logits, in float64."""
    scores = logits.astype(np.float64).reshape(-1)
    shifted = scores - scores.max()
    return shifted - np.log(np.exp(shifted).sum())


def top_logprobs(logprobs: np.ndarray, count: int) -> list[tuple[int, float]]:
    """The ``count`` likeliest tokens and their log probabilities, likeliest first."""
    if count <= 0:
        return []
    best = np.argpartition(-logprobs, count - 1)[:count]
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return [(int(token), float(logprobs[token])) for token in best]


def forced(logits: np.ndarray, token: int) -> np.ndarray:
    """Logits whose greedy pick is ``token`` (where a grammar allows it)."""
    out = np.full(logits.shape, -1.0e9, dtype=np.float32)
    out.reshape(-1)[token] = 0.0
    return out


def as_rows(logits: Any, rows: int) -> np.ndarray:
    """``Generator.get_logits`` as ``(rows, vocab)``."""
    return np.asarray(logits, dtype=np.float32).reshape(rows, -1)
