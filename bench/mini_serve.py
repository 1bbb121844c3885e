"""`make bench-mini`'s serving part: bare onnxruntime-genai at batch 1 and batch N on the
served files, then ``phi3ops serve``'s server (a subprocess, as `bench.serving` starts it)
with 1 client and N concurrent clients, time to first token, and N long requests (resident
memory against the KV budget plus the weights; refusals against their deadlines).
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.mini_disk import PeakSampler, session_rss

PROMPTS = [
    "Explain what a registry alias is in one sentence.",
    "List three colours.",
    "Write a haiku about autumn.",
    "What is the capital of France?",
    "Summarise the plot of a detective story.",
    "Give me a JSON object with keys a and b.",
    "Name two planets and one moon.",
    "How do bridges carry heavy loads?",
]
_FILLER = (
    "The library has books about history, science, art, travel, cooking and many other "
    "subjects, and the readers who come every morning ask the librarians for advice. "
)
#: The batcher's refusal: "... in about X s at its measured speed (Y s of work ahead of it),
#: past its timeout of Z s ..." (`phi3_chat.batcher`).
_REFUSAL = re.compile(
    r"in about ([0-9.]+) s at its measured speed \(([0-9.]+) s of work ahead of it\), "
    r"past its timeout of ([0-9.]+) s"
)


def long_prompt(model_dir: Path, tokens: int) -> tuple[str, int]:
    """A prompt of about ``tokens`` tokens (with the chat template) for this model's tokenizer."""
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(og.Config(str(model_dir)))  # no weights loaded
    text = "Summarise this text. "
    count = 0
    while True:
        count = len(tokenizer.encode(_chat(tokenizer, text + _FILLER)))
        if count > tokens:
            break
        text += _FILLER
    return text, len(tokenizer.encode(_chat(tokenizer, text)))


def _chat(tokenizer: Any, prompt: str) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages=json.dumps([{"role": "user", "content": prompt}]),
            add_generation_prompt=True,
        )
    )


# --- bare onnxruntime-genai ------------------------------------------------------------------


def bare(model_dir: Path, *, clients: int, max_tokens: int, rounds: int, long: str) -> dict:
    """Bare og, greedy: ``rounds`` batches of ``clients`` prompts, then the same prompts one at
    a time (batch 1); and one long prompt's prefill (seconds per prompt token) with the step
    time at batch 1 after it. The model is released before returning.
    """
    import numpy as np
    import onnxruntime_genai as og

    config = json.loads((model_dir / "genai_config.json").read_text())["model"]
    eos = config["eos_token_id"]
    eos_ids = {int(t) for t in (eos if isinstance(eos, list) else [eos])}
    pad = int(config.get("pad_token_id", min(eos_ids)))
    started = time.perf_counter()
    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    load_s = time.perf_counter() - started

    def generate(prompts: list[str], new: int) -> tuple[int, float, float]:
        """(completion tokens, seconds, seconds to the first token)."""
        rows = [tokenizer.encode(_chat(tokenizer, p)) for p in prompts]
        width = max(len(row) for row in rows)
        ids = np.full((len(rows), width), pad, dtype=np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        begin = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(batch_size=len(rows), max_length=width + new, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        first = time.perf_counter() - begin
        counts, done = [0] * len(rows), [False] * len(rows)
        while not generator.is_done() and not all(done):
            generator.generate_next_token()
            for i, token in enumerate(generator.get_next_tokens()):
                if not done[i]:
                    tokenizer.decode([int(token)])
                    counts[i] += 1
                    done[i] = int(token) in eos_ids or counts[i] >= new
        del generator
        return sum(counts), time.perf_counter() - begin, first

    generate(PROMPTS[:2], 4)  # warm-up
    out: dict[str, Any] = {"load_s": load_s}
    for label, size in (("batch1", 1), (f"batch{clients}", clients)):
        tokens, seconds, firsts = 0, 0.0, []
        for round_ in range(rounds):
            if size == 1:
                groups = [[PROMPTS[(round_ + i) % len(PROMPTS)]] for i in range(2)]
            else:
                groups = [[PROMPTS[(round_ + i) % len(PROMPTS)] for i in range(size)]]
            for group in groups:
                got, spent, first = generate(group, max_tokens)
                tokens, seconds = tokens + got, seconds + spent
                firsts.append(first)
        out[label] = {"tokens": tokens, "seconds": seconds, "tps": tokens / seconds}
        out[label]["prefill_p50_s"] = statistics.median(firsts)
        print(f"  bare og {label}: {tokens / seconds:.2f} tok/s", flush=True)
    got, spent, first = generate([long], 8)
    prompt_tokens = len(tokenizer.encode(_chat(tokenizer, long)))
    out["long_prefill"] = {
        "prompt_tokens": prompt_tokens,
        "prefill_s": first,
        "s_per_prompt_token": first / prompt_tokens,
        "step_s_after": (spent - first) / max(got, 1),
    }
    print(f"  bare og prefill of {prompt_tokens} tokens: {first:.1f} s", flush=True)
    return out  # the model goes with this frame


# --- the server --------------------------------------------------------------------------------


class Calls:
    """Requests to one server's /v1/chat/completions, recording every outcome."""

    def __init__(self, url: str) -> None:
        self.url = url

    def one(self, client: Any, prompt: str, max_tokens: int) -> dict[str, Any]:
        """A request: status, seconds, completion tokens (or the error and Retry-After)."""
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        start = time.perf_counter()
        response = client.post(f"{self.url}/v1/chat/completions", json=body)
        seconds = time.perf_counter() - start
        row: dict[str, Any] = {"status": response.status_code, "seconds": seconds}
        if response.status_code == 200:
            row["tokens"] = int(response.json()["usage"]["completion_tokens"])
        else:
            row["error"] = response.text[:600]
            row["retry_after"] = response.headers.get("retry-after")
        return row

    def streamed(self, client: Any, prompt: str, max_tokens: int) -> dict[str, Any]:
        """A streamed request: status, seconds to the first content chunk, total seconds."""
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
        }
        start = time.perf_counter()
        first: float | None = None
        chunks = 0
        with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as response:
            status = response.status_code
            for line in response.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                try:
                    delta = json.loads(line[5:])["choices"][0]["delta"].get("content")
                except (ValueError, KeyError, IndexError, TypeError):
                    continue
                if delta:
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - start
        return {"status": status, "ttft": first, "seconds": time.perf_counter() - start}

    def block(
        self,
        clients: int,
        per_client: int,
        prompts: list[str],
        max_tokens: int,
        *,
        stream: bool = False,
    ) -> tuple[list[dict[str, Any]], float]:
        """``clients`` closed-loop clients, ``per_client`` requests each; (rows, wall seconds)."""
        import httpx

        def client_loop(first: int) -> list[dict[str, Any]]:
            rows = []
            with httpx.Client(timeout=900) as client:
                for n in range(first, first + per_client):
                    prompt = prompts[n % len(prompts)]
                    call = self.streamed if stream else self.one
                    rows.append(call(client, prompt, max_tokens))
            return rows

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            rows = [row for part in pool.map(client_loop, range(clients)) for row in part]
        return rows, time.perf_counter() - started


def summarise(rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Tokens/s over ``wall``, p50/p95 latency of the answered, and the error counts."""
    ok = [r for r in rows if r["status"] == 200]
    latencies = sorted(r["seconds"] for r in ok)
    tokens = sum(r.get("tokens", 0) for r in ok)
    return {
        "requests": len(rows),
        "ok": len(ok),
        "tokens": tokens,
        "tps": tokens / wall if wall else 0.0,
        "p50": statistics.median(latencies) if latencies else None,
        "p95": _p95(latencies),
        "status": {str(s): sum(1 for r in rows if r["status"] == s) for s in (429, 503, 504)},
        "other_errors": sum(1 for r in rows if r["status"] not in (200, 429, 503, 504)),
    }


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def refusals(
    rows: list[dict[str, Any]], bare_out: dict[str, Any], prompt_tokens: int, max_tokens: int
) -> list[dict[str, Any]]:
    """Each refused request: the server's prediction and deadline, and the bare engine's own
    time for the request alone (prefill + ``max_tokens`` steps at batch 1, measured): if that is
    within the deadline and the server was idle enough, the refusal cost a request it could
    have finished.
    """
    out = []
    alone = (
        bare_out["long_prefill"]["s_per_prompt_token"] * prompt_tokens
        + max_tokens / bare_out["batch1"]["tps"]
    )
    for row in rows:
        if row["status"] not in (429, 503):
            continue
        match = _REFUSAL.search(row.get("error", ""))
        item: dict[str, Any] = {"status": row["status"], "message": row.get("error", "")[:200]}
        if match:
            when, ahead, deadline = (float(g) for g in match.groups())
            item |= {"predicted_s": when, "ahead_s": ahead, "deadline_s": deadline}
            item["bare_alone_s"] = alone
            item["could_have_finished"] = ahead + alone <= deadline
        out.append(item)
    return out


def serve(
    model_uri: str,
    log: Path,
    *,
    clients: int,
    per_client: int,
    single: int,
    max_tokens: int,
    long: str,
    long_max_tokens: int,
    long_window_s: float,
    on_ready: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """Starts ``phi3ops serve``'s server on ``model_uri`` with its defaults, runs the blocks
    (1 client, ``clients`` clients, streamed time to first token, long requests), stops it.
    ``on_ready()``'s result (taken once the server has its model) goes in as ``"ready"``.
    """
    from bench.serving import _free_port
    from phi3ops.serving.server import start_server, stop_server, wait_until_ready

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as handle:
        process = start_server(model_uri, port=port, workers=1, stdout=handle, stderr=handle)
    sampler = PeakSampler(lambda: session_rss(process.pid), interval_s=0.25)
    out: dict[str, Any] = {}
    try:
        started = time.perf_counter()
        wait_until_ready(process, url, timeout=600)
        out["ready_s"] = time.perf_counter() - started
        out["served_dir"] = str(getattr(process, "download_dir", ""))
        out["ready"] = on_ready()
        sampler.start()
        calls = Calls(url)
        calls.block(1, 1, PROMPTS, max_tokens)  # warm-up
        out["rss_idle"] = sampler.take()
        print(f"  server ready in {out['ready_s']:.0f} s", flush=True)
        rows, wall = calls.block(1, single, PROMPTS, max_tokens)
        out["one"] = summarise(rows, wall) | {"rss_peak": sampler.take()}
        print(f"  1 client: {out['one']}", flush=True)
        rows, wall = calls.block(clients, per_client, PROMPTS, max_tokens)
        out["many"] = summarise(rows, wall) | {"rss_peak": sampler.take()}
        out["many_errors"] = [r.get("error") for r in rows if r["status"] != 200][:3]
        print(f"  {clients} clients: {out['many']}", flush=True)
        rows, _ = calls.block(1, 2, PROMPTS, max_tokens, stream=True)
        out["ttft_one"] = [r["ttft"] for r in rows]
        rows, _ = calls.block(clients, 1, PROMPTS, max_tokens, stream=True)
        out["ttft_many"] = [r["ttft"] for r in rows]
        out["ttft_status"] = [r["status"] for r in rows]
        sampler.take()
        # Long requests, not streamed: what admission makes of them at the default deadline.
        rows, wall = calls.block(clients, 1, [long], long_max_tokens)
        out["long"] = summarise(rows, wall) | {"rss_peak": sampler.take()}
        out["long_rows"] = rows
        print(f"  {clients} long requests: {out['long']}", flush=True)
        # Long requests streamed (accepted with a deadline that covers generation): the
        # server's memory while their batches hold the KV cache, for up to long_window_s.
        out["long_stream"] = _long_streams(calls, clients, long, long_max_tokens, long_window_s)
        out["long_stream"]["rss_peak"] = sampler.take()
        print(f"  {clients} long streams: {out['long_stream']}", flush=True)
    finally:
        sampler.stop()
        stop_server(process)
    return out


def _long_streams(
    calls: Calls, clients: int, prompt: str, max_tokens: int, window_s: float
) -> dict[str, Any]:
    """``clients`` streamed long requests in daemon threads; returns after they all end or
    after ``window_s`` (the server is stopped next, which ends the rest).
    """
    rows: list[dict[str, Any]] = []
    window = _at_once(
        lambda client: calls.streamed(client, prompt, max_tokens),
        clients=clients,
        window_s=window_s,
        client_timeout_s=window_s + 60,
        rows=rows,
    )
    return {
        "finished": sum(1 for r in rows if r.get("status") == 200 and r.get("ttft") is not None),
        "ended": len(rows),
        "statuses": sorted(str(r.get("status")) for r in rows),
        "window_s": window,
    }


def _at_once(
    call: Any, *, clients: int, window_s: float, client_timeout_s: float, rows: list
) -> float:
    """``clients`` calls at once, each in a daemon thread with its own HTTP client, appending
    its row (or its transport error) to ``rows``; returns the seconds waited: until they all
    ended or ``window_s`` passed (the caller then stops the server, which ends the rest).
    """
    import httpx

    def one() -> None:
        try:
            with httpx.Client(timeout=client_timeout_s) as client:
                rows.append(call(client))
        except httpx.HTTPError as exc:
            rows.append({"status": None, "error": type(exc).__name__})

    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, window_s - (time.perf_counter() - started)))
    return time.perf_counter() - started


def long_memory(
    model_uri: str,
    log: Path,
    *,
    clients: int,
    long: str,
    max_tokens: int,
    window_s: float,
    timeout_s: int,
) -> dict[str, Any]:
    """A second server with a request timeout of ``timeout_s`` (long enough that admission
    accepts ``clients`` long requests at once): its resident memory, idle and at its peak
    while their batches run (up to ``window_s``), against the KV budget it admits rows by.
    """
    from bench.serving import _free_port
    from phi3ops.serving.server import start_server, stop_server, wait_until_ready

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as handle:
        process = start_server(
            model_uri, port=port, workers=1, timeout_s=timeout_s, stdout=handle, stderr=handle
        )
    sampler = PeakSampler(lambda: session_rss(process.pid), interval_s=0.25)
    rows: list[dict[str, Any]] = []
    try:
        wait_until_ready(process, url, timeout=600)
        sampler.start()
        calls = Calls(url)
        calls.block(1, 1, PROMPTS, 4)  # warm-up
        idle = sampler.take()

        window = _at_once(
            lambda client: calls.one(client, long, max_tokens),
            clients=clients,
            window_s=window_s,
            client_timeout_s=timeout_s + 60,
            rows=rows,
        )
        peak = sampler.take()
        ended = sorted(str(r.get("status")) for r in list(rows))
    finally:
        sampler.stop()
        # Not the drain its long timeout allows (minutes of long rows): stopped within 30 s.
        stop_server(process, timeout=30)
    return {
        "timeout_s": timeout_s,
        "rss_idle": idle,
        "rss_peak": peak,
        "window_s": window,
        "ended": len(ended),
        "statuses": ended,
    }
