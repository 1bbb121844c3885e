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
        """Logits whose greedy pick is this row's sample (float32, the input's shape)."""
        scores = logits.astype(np.float64).reshape(-1) / self.temperature
        keep = np.ones(scores.shape, dtype=bool)
        if 0 < self.top_k < scores.size:
            cut = np.partition(scores, -self.top_k)[-self.top_k]
            keep &= scores >= cut
        if self.top_p < 1.0:
            order = np.argsort(-scores, kind="stable")
            probs = np.exp(scores[order] - scores[order[0]])
            probs /= probs.sum()
            # The smallest prefix whose mass reaches top_p: every token before the one that
            # crosses it, and that one.
            inside = np.concatenate(([True], np.cumsum(probs)[:-1] < self.top_p))
            nucleus = np.zeros(scores.shape, dtype=bool)
            nucleus[order[inside]] = True
            keep &= nucleus
        noise = self.rng.gumbel(size=scores.shape)
        noisy = np.where(keep, scores + noise, scores - FILTERED_OFFSET)
        return noisy.astype(np.float32).reshape(logits.shape)


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
