"""``python -m bench --only load``: the model server under load, clients on loopback.

One server (`phi3ops.serving.server.start_server`, one uvicorn worker) runs as a subprocess;
this process plays the clients, each with its own keep-alive HTTP connection. Measured side by
side in one run, on the ONNX flavor:

* output tokens/s with ``clients`` concurrent clients vs 1 client (target >= 1.8);
* those tokens/s vs a bare onnxruntime-genai batch of the same ``clients`` prompts, run in this
  process while the server is idle (target >= 0.85);
* p50 request latency with ``clients`` clients vs 1 client (target <= 4.5);
* 1 client: ``POST /v1/chat/completions`` vs ``POST /invocations`` (overhead target <= 5%).

The transformers flavor gets the same rows (reported, no target; no bare batch: MLflow's
pipeline has no batcher across requests). Contenders alternate A-B-B-A: the single-client
routes request by request, the blocks round by round.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

Row = tuple[str, str, float, str]
ROUTES = {"invocations": "/invocations", "openai": "/v1/chat/completions"}


def _body(prompt: str, max_tokens: int) -> dict[str, object]:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }


def _completion_tokens(answer: object) -> int:
    """``usage.completion_tokens`` of a chat completion, bare or in MLflow's envelopes."""
    if isinstance(answer, list) and answer:
        return _completion_tokens(answer[0])
    if isinstance(answer, dict):
        if "usage" in answer:
            return int(answer["usage"]["completion_tokens"])
        for key in ("predictions", "outputs"):
            if key in answer:
                return _completion_tokens(answer[key])
    raise ValueError(f"no usage in the answer: {json.dumps(answer)[:300]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Clients:
    """HTTP clients of one server: each thread has its own keep-alive connection."""

    def __init__(self, url: str, prompts: list[str], *, max_tokens: int) -> None:
        import httpx

        self.url, self.prompts, self.max_tokens = url, prompts, max_tokens
        self._httpx = httpx

    def call(self, client, route: str, prompt: str) -> tuple[int, float]:
        """One request; returns (completion tokens, seconds)."""
        start = time.perf_counter()
        response = client.post(self.url + ROUTES[route], json=_body(prompt, self.max_tokens))
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"{route}: HTTP {response.status_code}: {response.text[:300]}")
        return _completion_tokens(response.json()), elapsed

    def single(self, n: int, *, first: int) -> dict[str, tuple[int, float, list[float]]]:
        """1 client, ``n`` prompts, alternating the two routes A-B-B-A request by request."""
        out: dict[str, tuple[int, float, list[float]]] = {r: (0, 0.0, []) for r in ROUTES}
        with self._httpx.Client(timeout=600) as client:
            for i in range(n):
                prompt = self.prompts[(first + i // 2) % len(self.prompts)]
                order = list(ROUTES) if (first + i) % 2 == 0 else list(reversed(ROUTES))
                for route in order:
                    tokens, seconds = self.call(client, route, prompt)
                    total, spent, latencies = out[route]
                    out[route] = (total + tokens, spent + seconds, [*latencies, seconds])
        return out

    def concurrent(self, clients: int, per_client: int) -> tuple[int, float, list[float]]:
        """``clients`` clients at once, each sending ``per_client`` prompts one after another
        from its own first prompt; returns (tokens, wall seconds, latencies).
        """
        latencies: list[float] = []

        def one(first: int) -> int:
            tokens = 0
            with self._httpx.Client(timeout=600) as client:
                for n in range(first, first + per_client):
                    got, seconds = self.call(
                        client, "invocations", self.prompts[n % len(self.prompts)]
                    )
                    tokens += got
                    latencies.append(seconds)
            return tokens

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            tokens = sum(pool.map(one, range(clients)))
        return tokens, time.perf_counter() - start, latencies


def _bare_batch(
    model_dir: Path, prompts: list[str], *, max_tokens: int
) -> Callable[[list[str]], int]:
    """A bare onnxruntime-genai greedy batch (right-padded, as the pyfunc pads); returns
    ``generate(prompts) -> completion tokens`` (a row counts up to and with its end token).
    """
    import numpy as np
    import onnxruntime_genai as og

    config = json.loads((model_dir / "genai_config.json").read_text())["model"]
    eos = config["eos_token_id"]
    eos_ids = {int(t) for t in (eos if isinstance(eos, list) else [eos])}
    pad = int(config.get("pad_token_id", min(eos_ids)))
    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)

    def generate(batch: list[str]) -> int:
        rows = [
            tokenizer.encode(
                tokenizer.apply_chat_template(
                    messages=json.dumps([{"role": "user", "content": p}]),
                    add_generation_prompt=True,
                )
            )
            for p in batch
        ]
        width = max(len(row) for row in rows)
        input_ids = np.full((len(rows), width), pad, dtype=np.int32)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
        params = og.GeneratorParams(model)
        params.set_search_options(
            batch_size=len(rows), max_length=width + max_tokens, do_sample=False
        )
        generator = og.Generator(model, params)
        generator.append_tokens(input_ids)
        counts, done = [0] * len(rows), [False] * len(rows)
        while not generator.is_done() and not all(done):
            generator.generate_next_token()
            for i, token in enumerate(generator.get_next_tokens()):
                if not done[i]:
                    tokenizer.decode([int(token)])  # the pyfunc decodes as it goes too
                    counts[i] += 1
                    done[i] = int(token) in eos_ids or counts[i] >= max_tokens
        return sum(counts)

    generate(prompts[:2])  # warm-up
    return generate


def _measure(
    model_uri: str,
    prompts: list[str],
    log: Path,
    *,
    clients: int,
    per_client: int,
    single_n: int,
    max_tokens: int,
    rounds: int,
    bare: Callable[[list[str]], int] | None,
    batching: dict[str, float] | None = None,
) -> dict[str, float]:
    """Starts one server on ``model_uri``, runs the contenders A-B-B-A, stops it."""
    from phi3ops.serving.server import start_server, stop_server, wait_until_ready

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as out:
        process = start_server(
            model_uri,
            port=port,
            workers=1,
            timeout_s=600,
            batching=batching,
            stdout=out,
            stderr=out,
        )
    try:
        started = time.perf_counter()
        wait_until_ready(process, url, timeout=300)
        print(f"  server ready in {time.perf_counter() - started:.1f} s ({model_uri})")
        calls = _Clients(url, prompts, max_tokens=max_tokens)
        calls.single(2, first=0)  # warm-up: both routes
        calls.concurrent(clients, 1)
        totals = {k: 0.0 for k in ("inv_t", "inv_s", "oai_t", "oai_s", "many_t", "many_s")}
        totals |= {"bare_t": 0.0, "bare_s": 0.0, "bare1_t": 0.0, "bare1_s": 0.0}
        lat: dict[str, list[float]] = {"inv": [], "oai": [], "many": []}

        def single() -> None:
            got = calls.single(single_n, first=round_)
            for key, route in (("inv", "invocations"), ("oai", "openai")):
                tokens, seconds, latencies = got[route]
                totals[f"{key}_t"] += tokens
                totals[f"{key}_s"] += seconds
                lat[key] += latencies
            print(
                f"  1 client   round {round_}: {got['invocations'][0] / got['invocations'][1]:.1f}"
                f" tok/s /invocations, {got['openai'][0] / got['openai'][1]:.1f} /v1/chat"
            )

        def many() -> None:
            tokens, seconds, latencies = calls.concurrent(clients, per_client)
            totals["many_t"] += tokens
            totals["many_s"] += seconds
            lat["many"] += latencies
            print(f"  {clients} clients  round {round_}: {tokens / seconds:.1f} tok/s")

        def batch() -> None:
            if bare is None:
                return
            for n in range(per_client):
                batch_prompts = [prompts[(first + n) % len(prompts)] for first in range(clients)]
                start = time.perf_counter()
                totals["bare_t"] += bare(batch_prompts)
                totals["bare_s"] += time.perf_counter() - start
            for prompt in prompts:  # the ceiling's denominator: one prompt at a time
                start = time.perf_counter()
                totals["bare1_t"] += bare([prompt])
                totals["bare1_s"] += time.perf_counter() - start
            print(
                f"  bare batch round {round_}: {totals['bare_t'] / totals['bare_s']:.1f} tok/s "
                f"(1 prompt at a time: {totals['bare1_t'] / totals['bare1_s']:.1f})"
            )

        for round_ in range(rounds):
            order = [single, many, batch] if round_ % 2 == 0 else [batch, many, single]
            for contender in order:
                contender()
    finally:
        stop_server(process)
    result = {
        "one_tps": totals["inv_t"] / totals["inv_s"],
        "openai_tps": totals["oai_t"] / totals["oai_s"],
        "many_tps": totals["many_t"] / totals["many_s"],
        "one_p50": statistics.median(lat["inv"]),
        "openai_p50": statistics.median(lat["oai"]),
        "many_p50": statistics.median(lat["many"]),
        # Overhead per request: the mean seconds of the two routes (same prompts, interleaved).
        "one_mean": totals["inv_s"] / len(lat["inv"]),
        "openai_mean": totals["oai_s"] / len(lat["oai"]),
        # Each /v1/chat request over the /invocations one of the same prompt beside it: the
        # median of these pairs is robust to drift and to a stall hitting one request.
        "openai_paired": statistics.median(
            o / i for o, i in zip(lat["oai"], lat["inv"], strict=True)
        ),
    }
    if bare is not None:
        result["bare_tps"] = totals["bare_t"] / totals["bare_s"]
        result["bare1_tps"] = totals["bare1_t"] / totals["bare1_s"]
    return result


def _rows(flavor: str, m: dict[str, float], clients: int, *, targets: bool) -> list[Row]:
    def target(text: str) -> str:
        return text if targets else "report"

    rows: list[Row] = [
        (
            f"{flavor}: tokens/s, {clients} concurrent clients vs 1 client (/invocations)",
            f"{m['many_tps']:.1f} vs {m['one_tps']:.1f}",
            m["many_tps"] / m["one_tps"],
            target(">= 1.8"),
        ),
    ]
    if "bare_tps" in m:
        rows.append(
            (
                f"{flavor}: ceiling on this machine now, bare onnxruntime-genai batch of "
                f"{clients} vs 1 prompt at a time",
                f"{m['bare_tps']:.1f} vs {m['bare1_tps']:.1f}",
                m["bare_tps"] / m["bare1_tps"],
                "report (2.24 on an idle 2-core machine; bounds the two rows around it)",
            )
        )
        rows.append(
            (
                f"{flavor}: tokens/s, {clients} HTTP clients vs a bare onnxruntime-genai batch "
                f"of the same {clients} prompts",
                f"{m['many_tps']:.1f} vs {m['bare_tps']:.1f}",
                m["many_tps"] / m["bare_tps"],
                target(">= 0.85"),
            )
        )
    rows += [
        (
            f"{flavor}: p50 request latency (s), {clients} clients vs 1 client",
            f"{m['many_p50']:.2f} vs {m['one_p50']:.2f}",
            m["many_p50"] / m["one_p50"],
            target("<= 4.5"),
        ),
        (
            f"{flavor}: 1 client, s per request: /v1/chat/completions vs /invocations "
            "(p50, and mean in brackets; ratio: median of adjacent same-prompt pairs)",
            f"{m['openai_p50']:.3f} vs {m['one_p50']:.3f} "
            f"({m['openai_mean']:.3f} vs {m['one_mean']:.3f})",
            m["openai_paired"],
            target("<= 1.05 (overhead <= 5%)"),
        ),
    ]
    return rows


def serving_under_load(
    packaged: dict[str, object], args, tmp: Path, *, prompts: list[str]
) -> tuple[str, list[Row]]:
    """Runs the section on ``prompts``; returns (setup text, rows)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    clients, max_tokens, rounds = args.clients, args.max_tokens, args.rounds
    wait_ms = getattr(args, "load_batch_wait_ms", None)
    batching = None if wait_ms is None else {"batch_wait_ms": wait_ms}
    load_before = os.getloadavg()
    log = tmp / "load-server.log"
    bare = _bare_batch(Path(packaged["onnx_model_dir"]), prompts, max_tokens=max_tokens)
    onnx = _measure(
        str(packaged["onnx"]),
        prompts,
        log,
        clients=clients,
        per_client=len(prompts),
        single_n=2 * len(prompts),
        max_tokens=max_tokens,
        rounds=rounds,
        bare=bare,
        batching=batching,
    )
    del bare
    rows = _rows("ONNX", onnx, clients, targets=True)
    tf_note = "transformers flavor: skipped (--load-skip-transformers)."
    if not getattr(args, "load_skip_transformers", False):
        transformers = _measure(
            str(packaged["transformers"]),
            prompts,
            log,
            clients=clients,
            per_client=1,
            single_n=4,
            max_tokens=max_tokens,
            rounds=rounds,
            bare=None,
        )
        rows += _rows("transformers", transformers, clients, targets=False)
        tf_note = (
            "transformers flavor (the same registered weights in bf16, 1 prompt per client and "
            "4 single-client requests per round, since it decodes ~4x slower on CPU): reported, "
            "no target, no bare batch (MLflow's pipeline has no batcher across requests)."
        )
    load_after = os.getloadavg()
    setup = (
        f"one server subprocess (`start_server`, 1 uvicorn worker, requests recorded to a temp "
        f"MLflow store), clients on loopback with keep-alive connections; chat bodies, "
        f"max_tokens={max_tokens}, greedy; {rounds} rounds. ONNX: each of {clients} clients "
        f"sends the {len(prompts)} prompts one after another from its own first prompt; the bare "
        f"batch runs the same {len(prompts)} batches of {clients} prompts (then the "
        f"{len(prompts)} prompts one at a time) in the bench process while the server idles; "
        f"1 client sends {2 * len(prompts)} requests per round to each route, alternating "
        f"A-B-B-A request by request; the blocks alternate A-B-C, C-B-A round by round. "
        f"ONNX batcher: {'as packaged' if wait_ms is None else f'batch_wait_ms={wait_ms:g}'}. "
        f"{tf_note} Load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.2f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.2f}' for x in load_after)}."
    )
    return setup, rows
