"""One onnxruntime-genai batch, step by step: grammar, per-row sampling, logprobs.

`batch_steps` runs the rows the batcher grouped (rows share a grammar, or have none) as one
greedy generator: each step it reads the logits only when some row needs them (a row that
samples, wants logprobs, or has finished its constrained value while others go on), writes back
each sampling row's own noisy logits (`phi3_chat.sampler`) and a filler token for the rows that
are done, and hands every row its token. A batch of greedy rows without logprobs or grammar runs
exactly as before: og's own greedy step, no logits read.

`guidance_problem` is the check at load that the engine really constrains decoding, and
`grammar_problem` compiles one request's grammar (once per grammar) so that a schema llguidance
cannot build is the request's 400, not its batch's failure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnxruntime_genai as og

from phi3_chat.admission import _Rates, prefill_chunks
from phi3_chat.guidance import Guidance
from phi3_chat.request import _IncrementalDecoder, _Request, _RowState
from phi3_chat.sampler import as_rows, forced, log_softmax, top_logprobs

__all__ = ["GrammarCache", "batch_steps", "guidance_problem"]

#: The grammar and prompt of the load-time check: a model must answer ``yes`` or ``no``.
_CHECK_GRAMMAR = 'start: ANSWER\nANSWER: "yes" | "no"\n'


def batch_steps(
    og_model: Any,
    tokenizer: Any,
    batch: list[_Request],
    *,
    pad_token_id: int,
    eos_token_ids: frozenset[int],
    filler_token_id: int,
    rates: _Rates,
    prefill_slice_s: float | None = None,
) -> Iterator[list[_RowState]]:
    """Generates ``batch`` (rows with one grammar, or none); yields the rows after each token.

    A single row's prompt is appended in the chunks `prefill_chunks` cuts for
    ``prefill_slice_s`` (onnxruntime-genai holds the GIL through a prefill).
    """
    width = max(len(request.input_ids) for request in batch)
    # og 0.18 pads on the right with pad_token_id and masks those positions itself
    # (left padding changes the answers); batch_size must equal the number of rows.
    input_ids = np.full((len(batch), width), pad_token_id, dtype=np.int32)
    for row, request in enumerate(batch):
        input_ids[row, : len(request.input_ids)] = request.input_ids
    params = og.GeneratorParams(og_model)
    params.set_search_options(
        batch_size=len(batch),
        max_length=width + max(request.max_tokens for request in batch),
        do_sample=False,  # rows sample on their own (phi3_chat.sampler)
    )
    guidance = batch[0].guidance
    if guidance is not None:
        params.set_guidance(guidance.kind, guidance.data)
    generator = og.Generator(og_model, params)
    started = time.perf_counter()
    for chunk in prefill_chunks(input_ids, rates, prefill_slice_s):
        generator.append_tokens(chunk)
    rates.observe_prefill(input_ids.size, time.perf_counter() - started)
    states = [
        _RowState(request, _IncrementalDecoder(tokenizer), eos_token_ids) for request in batch
    ]
    sampling = any(state.sampler is not None for state in states)
    wants_logprobs = any(request.logprobs is not None for request in batch)
    several = len(batch) > 1
    while not generator.is_done() and not all(state.done for state in states):
        started = time.perf_counter()
        logprobs: list[np.ndarray | None] = [None] * len(batch)
        done_rows = guidance is not None and several and any(state.done for state in states)
        if sampling or wants_logprobs or done_rows:
            logits = as_rows(generator.get_logits(), len(batch))
            written = logits.copy()
            for row, state in enumerate(states):
                if state.done:
                    written[row] = forced(logits[row], filler_token_id)
                    continue
                if state.request.logprobs is not None:
                    logprobs[row] = log_softmax(logits[row])
                if state.sampler is not None:
                    written[row] = state.sampler.noisy(logits[row])
            if sampling or done_rows:
                generator.set_logits(written.reshape(len(batch), 1, -1))
        generator.generate_next_token()
        rates.observe_step(len(batch), time.perf_counter() - started)
        for row, (state, token) in enumerate(zip(states, generator.get_next_tokens(), strict=True)):
            if state.done:
                continue
            token = int(token)
            lp = logprobs[row]
            if lp is not None:
                state.token_logprobs.append(
                    (token, float(lp[token]), top_logprobs(lp, state.request.logprobs or 0))
                )
            state.add(token)
        yield states
    for state in states:
        state.end()
    yield states


class GrammarCache:
    """Compiles each grammar once (llguidance, through a one-token generator) and remembers
    why it failed, if it did; thread-safe, bounded.
    """

    def __init__(self, og_model: Any, size: int = 256) -> None:
        self._model = og_model
        self._size = size
        self._lock = threading.Lock()
        self._seen: dict[Guidance, str | None] = {}

    def problem(self, guidance: Guidance) -> str | None:
        """Why llguidance cannot build ``guidance``, or None."""
        with self._lock:
            if guidance in self._seen:
                return self._seen[guidance]
        try:
            params = og.GeneratorParams(self._model)
            params.set_search_options(batch_size=1, max_length=2)
            params.set_guidance(guidance.kind, guidance.data)
            og.Generator(self._model, params)
            problem = None
        except Exception as error:  # llguidance's own words, first line
            problem = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        with self._lock:
            if len(self._seen) >= self._size:
                self._seen.pop(next(iter(self._seen)))
            self._seen[guidance] = problem
        return problem


def guidance_problem(generate: Callable[[str, str], str]) -> str | None:
    """Why the engine does not constrain decoding, or None when it does.

    Args:
        generate: Answers a short prompt under a grammar ``(kind, data)`` and returns the text.

    Returns:
        What went wrong: ``set_guidance`` failed (a build without guidance), or the answer
        broke the grammar (a build that ignores it).
    """
    try:
        answer = generate("lark_grammar", _CHECK_GRAMMAR)
    except Exception as error:
        return f"set_guidance failed: {error}"
    if answer not in ("yes", "no"):
        return f"asked for yes or no under a grammar, the model answered {answer[:40]!r}"
    return None
