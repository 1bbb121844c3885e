"""`make bench`: what the pipeline costs, measured side by side in one process.

Serving (``--only serving``), on a ~200M-parameter random Phi-3 built locally (ONNX int4 + bf16
PyTorch), fetched from the local hub and packaged exactly as the pipeline does, with the same
prompts for every contender:

* tokens/s through the loaded ONNX pyfunc vs a bare onnxruntime-genai loop (target >= 0.95);
* ONNX int4 pyfunc vs the transformers flavor on CPU (reported; expect > 2x);
* ``mlflow.pyfunc.load_model("models:/...@candidate")`` to first token vs bare ``og.Model``.

Contenders alternate prompt by prompt, so machine noise hits both sides alike.

Concurrency (``--only concurrency``), on the same packaged model: output tokens/s and median
(p50) call latency of the loaded ONNX pyfunc with 8 clients calling ``predict`` at once
(threads, as a scoring server's pool does) vs 1 client, and against the ceiling, one client
sending 8 rows per call; the pyfunc's batcher runs concurrent greedy requests as one
onnxruntime-genai batch. The runs alternate round by round.

Serving under load (``--only load``, `bench.serving`): the model server as a subprocess (one
worker) and HTTP clients on loopback: 8 concurrent clients vs 1 (tokens/s, p50 latency), vs a
bare onnxruntime-genai batch of the same prompts, and ``/v1/chat/completions`` vs
``/invocations``, for the ONNX flavor (and, reported, the transformers flavor).

Two arms (``--only arms``, `bench.arms`): the server with ``@candidate`` loaded beside
``@champion``: resident memory, champion latency with shadow copies on vs off, and the pause of
an alias switch.

Records (``--only records``, `bench.records`): the server with 2 workers under 16 clients; the
record writer's records/s vs its requests/s, the largest backlog, records stored across SIGTERM.

Orchestration (``--only orchestration``): the lifecycle flow (fetch, package, register,
evaluate, promote) on the tiny Phi-3 vs the same task functions called as plain Python, each
run on a fresh store so nothing is reused; the difference is what Prefect costs per run
(target < 15 s).

Results go to stdout and ``BENCHMARKS.md`` (one section per benchmark; ``--only`` keeps the
other sections as they were).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from bench.constrained import constrained_section
from bench.report import write_sections

PROMPTS = [
    "Explain what a registry alias is in one sentence.",
    "List three colours.",
    "Write a haiku about autumn.",
    "What is the capital of France?",
    "Summarise the plot of a detective story.",
    "Give me a JSON object with keys a and b.",
]
REPO_ROOT = Path(__file__).resolve().parents[1]


def _bare_og(model_dir: Path) -> tuple[Callable[[str, int], int], float]:
    """A bare onnxruntime-genai greedy loop; returns (generate -> new tokens, load-to-first s)."""
    import onnxruntime_genai as og

    start = time.perf_counter()
    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)

    def generate(prompt: str, max_tokens: int) -> int:
        text = tokenizer.apply_chat_template(
            messages=json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True
        )
        ids = tokenizer.encode(text)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        count = 0
        while not generator.is_done():
            generator.generate_next_token()
            tokenizer.decode(generator.get_next_tokens())  # the wrapper decodes too
            count += 1
        return count

    generate(PROMPTS[0], 1)
    return generate, time.perf_counter() - start


def _pyfunc(model_uri: str) -> tuple[Callable[[str, int], int], float]:
    """The registered model through mlflow.pyfunc; returns (generate, load-to-first-token s)."""
    import mlflow

    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(model_uri)

    def generate(prompt: str, max_tokens: int) -> int:
        request = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        result = model.predict([request])
        result = result[0] if isinstance(result, list) else result
        return int(result["usage"]["completion_tokens"])

    generate(PROMPTS[0], 1)
    return generate, time.perf_counter() - start


def _batched_vs_single(model_uri: str, *, max_tokens: int, rounds: int) -> tuple[float, float]:
    """Output tokens/s of the ONNX pyfunc: all prompts in one predict call vs one call each."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    requests = [
        {"messages": [{"role": "user", "content": p}], "max_tokens": max_tokens, "temperature": 0.0}
        for p in PROMPTS
    ]

    def tokens(results: list) -> int:
        return sum(int(r["usage"]["completion_tokens"]) for r in results)

    batched_tokens = single_tokens = 0
    batched_s = single_s = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        batched_tokens += tokens(model.predict(requests))
        batched_s += time.perf_counter() - start
        start = time.perf_counter()
        single_tokens += sum(tokens(model.predict([r])) for r in requests)
        single_s += time.perf_counter() - start
    return batched_tokens / batched_s, single_tokens / single_s


def _concurrent_clients(
    model_uri: str, *, clients: int, max_tokens: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """Tokens/s and p50 latency (s) of the ONNX pyfunc: 1 client, ``clients`` clients at once,
    and the batching ceiling, 1 client sending ``clients`` rows in each call.

    Every client sends each prompt once, one call after another, starting at its own prompt so
    that concurrent requests differ; the three runs alternate for ``rounds`` rounds.
    """
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)

    def client(first: int, rows: int, latencies: list[float]) -> int:
        tokens = 0
        for n in range(first, first + len(PROMPTS)):
            requests = [
                {
                    "messages": [{"role": "user", "content": PROMPTS[(n + row) % len(PROMPTS)]}],
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                }
                for row in range(rows)
            ]
            start = time.perf_counter()
            results = model.predict(requests)
            latencies.append(time.perf_counter() - start)
            tokens += sum(int(result["usage"]["completion_tokens"]) for result in results)
        return tokens

    client(0, 1, [])  # warm-up
    runs = {"1 client": (1, 1), f"{clients} clients": (clients, 1), "rows": (1, clients)}
    tokens, seconds = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0.0)
    latencies: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (threads, rows) in runs.items():
            start = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                done = pool.map(
                    lambda first, r=rows, n=name: client(first, r, latencies[n]), range(threads)
                )
                tokens[name] += sum(done)
            seconds[name] += time.perf_counter() - start
    return {
        name: (tokens[name] / seconds[name], statistics.median(latencies[name])) for name in runs
    }


def _side_by_side(
    contenders: dict[str, Callable[[str, int], int]], *, max_tokens: int, rounds: int
) -> dict[str, float]:
    """Tokens/s of each contender over the same prompts, alternating prompt by prompt."""
    tokens = dict.fromkeys(contenders, 0)
    seconds = dict.fromkeys(contenders, 0.0)
    for _ in range(rounds):
        for prompt in PROMPTS:
            for name, generate in contenders.items():
                start = time.perf_counter()
                tokens[name] += generate(prompt, max_tokens)
                seconds[name] += time.perf_counter() - start
    return {name: tokens[name] / seconds[name] for name in contenders}


def _package(tmp: Path, recipe_name: str) -> dict[str, object]:
    """Build, serve, fetch and register both flavors like the pipeline does; return URIs."""
    from offline.packaged import register_both_flavors
    from offline.tiny_phi3 import PRESETS, ensure_tiny_phi3
    from phi3ops.settings import get_settings

    cache = Path(os.environ.get("PHI3OPS_BENCH_CACHE", REPO_ROOT / ".data" / "bench-cache"))
    repos = ensure_tiny_phi3(cache, PRESETS[recipe_name])
    os.environ["PHI3OPS_DATA_DIR"] = str(tmp / "data")
    get_settings.cache_clear()
    registered = register_both_flavors(repos, model_name_prefix="bench")
    out: dict[str, object] = {"recipe": repos.recipe, "onnx_model_dir": repos.onnx_model_dir}
    out |= {flavor: version.candidate_uri for flavor, version in registered.items()}
    return out


# --- orchestration: the lifecycle flow vs the same task functions as plain Python ---------------

LIFECYCLE_MODEL = "bench-lifecycle"


def _lifecycle_plain(*, eval_set: str, gates: dict[str, float]) -> dict[str, object]:
    """The lifecycle's work with no orchestration: the plain functions its tasks wrap, in order
    (fetch -> plan -> find or log + register -> evaluate + compare -> gates -> aliases -> record).
    What only Prefect does (flow/task runs, markdown artifacts, events) is left out.
    """
    from phi3ops.names import CHAMPION_ALIAS
    from phi3ops.registry import alias_version
    from phi3ops.settings import get_settings
    from phi3ops.sources import ONNX_REPO_ID, Flavor, Variant
    from tasks.evaluation import evaluate_model, find_evaluation
    from tasks.hub import fetch_snapshot
    from tasks.packaging import log_onnx_model, plan_package
    from tasks.promotion import apply_decision, evaluate_gates
    from tasks.registry import find_registered_version, register_version

    fetched = fetch_snapshot(ONNX_REPO_ID, variant=Variant.ONNX_CPU_INT4)
    plan = plan_package(fetched, Flavor.ONNX)
    registered = find_registered_version(plan, model_name=LIFECYCLE_MODEL)
    if registered is None:
        logged = log_onnx_model(fetched)
        registered = register_version(logged, fetched, model_name=LIFECYCLE_MODEL)
    summary = evaluate_model(registered.model_uri, eval_set)
    champion = alias_version(LIFECYCLE_MODEL, CHAMPION_ALIAS)
    champion_eval = (
        find_evaluation(LIFECYCLE_MODEL, champion, summary.eval_set_hash)
        if champion not in (None, registered.version)
        else None
    )
    decision = evaluate_gates(
        LIFECYCLE_MODEL,
        registered.version,
        summary,
        champion_eval,
        champion_version=champion,
        policy=get_settings().gates.with_overrides(gates),
    )
    state = apply_decision(decision, triggered_by="bench")  # records it too
    return {"version": registered.version, "decision": state.action}


def _lifecycle_flow(*, eval_set: str, gates: dict[str, float]) -> dict[str, object]:
    """The same lifecycle through `flows.lifecycle.lifecycle_flow` (5 subflows, ~20 tasks)."""
    from flows.lifecycle import lifecycle_flow
    from phi3ops.policies import GateOverrides

    result = lifecycle_flow(
        model_name=LIFECYCLE_MODEL, eval_set=eval_set, gates=GateOverrides(**gates)
    )
    return {"version": result.version, "decision": result.decision}


def _orchestration(tmp: Path, *, eval_set: str, rounds: int) -> list[tuple[str, str, float, str]]:
    """Seconds per lifecycle run, flow vs plain functions, each run on a fresh data dir (fresh
    snapshot folder and MLflow store, so nothing is reused), alternating A-B then B-A.
    """
    import logging

    from huggingface_hub.utils import close_session

    from cli.jobs import DEMO_GATES
    from offline.local_hub import LocalHub
    from offline.tiny_phi3 import PRESETS, ensure_tiny_phi3
    from phi3ops.settings import get_settings
    from phi3ops.sources import ONNX_REPO_ID

    # Prefect's temporary server takes 13-18 s to start here (see DESIGN.md).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    cache = Path(os.environ.get("PHI3OPS_BENCH_CACHE", REPO_ROOT / ".data" / "bench-cache"))
    repos = ensure_tiny_phi3(cache, PRESETS["tiny"])
    contenders = {"flow": _lifecycle_flow, "plain": _lifecycle_plain}
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    runs = 0
    with LocalHub() as hub:
        hub.add_repo(ONNX_REPO_ID, repos.onnx_dir)
        os.environ["PHI3OPS_HF_ENDPOINT"] = hub.url

        def timed(name: str, eval_set: str) -> float:
            nonlocal runs
            runs += 1
            os.environ["PHI3OPS_DATA_DIR"] = str(tmp / f"lifecycle-{runs}-{name}")
            get_settings.cache_clear()
            start = time.perf_counter()
            outcome = contenders[name](eval_set=eval_set, gates=DEMO_GATES)
            elapsed = time.perf_counter() - start
            assert outcome == {"version": "1", "decision": "promoted"}, (name, outcome)
            print(f"  lifecycle {name:<5} {elapsed:6.2f} s")
            return elapsed

        # Warm-up (imports, the model's first load): the first flow also starts the server.
        first_flow = timed("flow", "smoke")
        timed("plain", "smoke")
        for round_ in range(rounds):
            order = ["flow", "plain"] if round_ % 2 == 0 else ["plain", "flow"]
            for name in order:
                seconds[name].append(timed(name, eval_set))
    close_session()

    pairs = list(zip(seconds["flow"], seconds["plain"], strict=True))
    flow_s = sum(seconds["flow"]) / rounds
    plain_s = sum(seconds["plain"]) / rounds
    return [
        (
            f"seconds per lifecycle run: flow vs plain task functions (eval set {eval_set})",
            f"{flow_s:.1f} vs {plain_s:.1f}",
            flow_s / plain_s,
            "report",
        ),
        (
            "orchestration overhead per lifecycle run (flow - plain, s; each pair in brackets)",
            f"{flow_s - plain_s:.1f} ({', '.join(f'{f - p:+.1f}' for f, p in pairs)})",
            (flow_s - plain_s) / plain_s,
            "< 15 s",
        ),
        (
            "first flow run in a fresh process, incl. starting Prefect's temporary server (s)",
            f"{first_flow:.1f}",
            first_flow / plain_s,
            "report (once per process)",
        ),
    ]


# --- the report ------------------------------------------------------------------------------

SECTIONS = {
    "serving": "Serving: the packaged Phi-3",
    "concurrency": "Serving: concurrent clients share batches",
    "load": "Serving under load: the HTTP server, clients on loopback",
    "arms": "Serving two arms: champion and candidate side by side",
    "records": "Inference records: the writer vs the server under load",
    "constrained": "Constrained decoding: structured outputs vs free text, and batches",
    "orchestration": "Orchestration: the lifecycle flow vs plain Python",
}


def main(argv: list[str] | None = None) -> int:
    """``python -m bench``: run the benchmarks and write BENCHMARKS.md; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only",
        choices=sorted(SECTIONS),
        action="append",
        help="Run only this benchmark (repeatable); the other sections of the report are kept.",
    )
    parser.add_argument("--preset", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients.")
    parser.add_argument(
        "--load-skip-transformers",
        action="store_true",
        help="--only load: measure the ONNX flavor only.",
    )
    parser.add_argument(
        "--load-batch-wait-ms",
        type=float,
        help="--only load: serve the ONNX flavor with this batch_wait_ms (default: as packaged).",
    )
    parser.add_argument(
        "--lifecycle-eval-set", default="phi3-default", help="Eval set of the lifecycle runs."
    )
    parser.add_argument("--lifecycle-rounds", type=int, default=3)
    parser.add_argument("--records-clients", type=int, default=16)
    parser.add_argument("--records-requests", type=int, default=960)
    parser.add_argument("--records-max-tokens", type=int, default=4)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    chosen = args.only or list(SECTIONS)

    sections: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="phi3ops-bench-") as tmp:
        wanted = {"serving", "concurrency", "load", "arms", "records", "constrained"}
        packaged = _package(Path(tmp), args.preset) if wanted & set(chosen) else {}
        params = getattr(packaged.get("recipe"), "num_parameters", None)
        if "serving" in chosen:
            rows = _serving(packaged, args)
            sections["serving"] = _section(
                "serving",
                f"preset `{args.preset}`, {params:,} parameters; {len(PROMPTS)} prompts x "
                f"{args.rounds} rounds, max_tokens={args.max_tokens}, greedy. Contenders run "
                "alternately, prompt by prompt, in one process.",
                rows,
            )
        if "concurrency" in chosen:
            sections["concurrency"] = _section(
                "concurrency",
                f"preset `{args.preset}`, {params:,} parameters; each client sends the "
                f"{len(PROMPTS)} prompts one after another (max_tokens={args.max_tokens}, "
                f"greedy), {args.rounds} rounds; 1 client, {args.clients} clients and 1 client "
                f"sending {args.clients} rows per call alternate; "
                "model_config defaults (max_batch_size 8, batch_wait_ms 5).",
                _concurrency(packaged, args),
            )
        if "load" in chosen:
            from bench.serving import serving_under_load

            setup, rows = serving_under_load(packaged, args, Path(tmp), prompts=PROMPTS)
            sections["load"] = _section(
                "load", f"preset `{args.preset}`, {params:,} parameters; {setup}", rows
            )
        if "arms" in chosen:
            from bench.arms import cost_of_two_arms

            setup, rows = cost_of_two_arms(packaged, args, Path(tmp), prompts=PROMPTS)
            sections["arms"] = _section(
                "arms", f"preset `{args.preset}`, {params:,} parameters; {setup}", rows
            )
        if "records" in chosen:
            from bench.records import records_keep_up

            setup, rows = records_keep_up(packaged, args, Path(tmp), prompts=PROMPTS)
            sections["records"] = _section(
                "records", f"preset `{args.preset}`, {params:,} parameters; {setup}", rows
            )
        if "constrained" in chosen:  # bench.constrained
            sections["constrained"] = constrained_section(packaged, args, PROMPTS, _section)
        if "orchestration" in chosen:
            rows = _orchestration(
                Path(tmp), eval_set=args.lifecycle_eval_set, rounds=args.lifecycle_rounds
            )
            sections["orchestration"] = _section(
                "orchestration",
                f"tiny Phi-3 (warm caches), {args.lifecycle_rounds} rounds after a warm-up, "
                "each run on a fresh data dir (snapshot + SQLite MLflow store) so nothing is "
                "reused: fetch from the local hub, package + register, evaluate, promote. "
                "Contenders alternate (A-B, B-A) in one process; the flow runs against Prefect's "
                "temporary server, started once.",
                rows,
            )
    fresh = {SECTIONS[key]: text for key, text in sections.items()}
    report = write_sections(args.output, fresh, order=list(SECTIONS.values()))
    print(report)
    print(f"written to {args.output}")
    return 0


def _serving(packaged: dict[str, object], args) -> list[tuple[str, str, float, str]]:
    # Load-to-first-token, measured back to back on the same files.
    bare, bare_load = _bare_og(packaged["onnx_model_dir"])
    onnx, onnx_load = _pyfunc(packaged["onnx"])
    tps = _side_by_side(
        {"bare onnxruntime-genai": bare, "onnx pyfunc": onnx},
        max_tokens=args.max_tokens,
        rounds=args.rounds,
    )
    batched, single = _batched_vs_single(
        packaged["onnx"], max_tokens=args.max_tokens, rounds=args.rounds
    )
    transformers, tf_load = _pyfunc(packaged["transformers"])
    tps_flavors = _side_by_side(
        {"onnx pyfunc": onnx, "transformers flavor": transformers},
        max_tokens=args.max_tokens,
        rounds=1,
    )
    rows = [
        (
            "tokens/s: ONNX pyfunc vs bare onnxruntime-genai loop",
            f"{tps['onnx pyfunc']:.1f} vs {tps['bare onnxruntime-genai']:.1f}",
            tps["onnx pyfunc"] / tps["bare onnxruntime-genai"],
            ">= 0.95",
        ),
        (
            "tokens/s: ONNX int4 pyfunc vs transformers flavor (CPU)",
            f"{tps_flavors['onnx pyfunc']:.1f} vs {tps_flavors['transformers flavor']:.1f}",
            tps_flavors["onnx pyfunc"] / tps_flavors["transformers flavor"],
            "report (expect > 2)",
        ),
        (
            f"tokens/s: ONNX pyfunc, {len(PROMPTS)} requests batched in one call vs one by one",
            f"{batched:.1f} vs {single:.1f}",
            batched / single,
            ">= 2",
        ),
        (
            "load to first token: pyfunc models:/...@candidate vs bare og.Model (s)",
            f"{onnx_load:.2f} vs {bare_load:.2f}",
            onnx_load / bare_load,
            "report",
        ),
        (
            "load to first token: transformers flavor (s)",
            f"{tf_load:.2f}",
            tf_load / bare_load,
            "report",
        ),
    ]
    return rows


def _concurrency(packaged: dict[str, object], args) -> list[tuple[str, str, float, str]]:
    measured = _concurrent_clients(
        str(packaged["onnx"]), clients=args.clients, max_tokens=args.max_tokens, rounds=args.rounds
    )
    (one_tps, one_p50) = measured["1 client"]
    (many_tps, many_p50) = measured[f"{args.clients} clients"]
    (rows_tps, _) = measured["rows"]
    return [
        (
            f"tokens/s: ONNX pyfunc, {args.clients} concurrent clients vs 1 client",
            f"{many_tps:.1f} vs {one_tps:.1f}",
            many_tps / one_tps,
            "report; the ceiling is the next row (before the batcher: 1.01)",
        ),
        (
            f"tokens/s: ceiling, 1 client sending {args.clients} rows per call vs 1 row",
            f"{rows_tps:.1f} vs {one_tps:.1f}",
            rows_tps / one_tps,
            "report (2.24 for batch 8 on an idle 2-core machine)",
        ),
        (
            f"tokens/s: {args.clients} concurrent clients vs the ceiling",
            f"{many_tps:.1f} vs {rows_tps:.1f}",
            many_tps / rows_tps,
            ">= 0.8",
        ),
        (
            f"p50 call latency (s): {args.clients} concurrent clients vs 1 client",
            f"{many_p50:.2f} vs {one_p50:.2f}",
            many_p50 / one_p50,
            f"report (< {args.clients}: batching beats a queue)",
        ),
    ]


def _section(key: str, setup: str, rows: list[tuple[str, str, float, str]]) -> str:
    lines = [
        f"## {SECTIONS[key]}",
        "",
        f"`python -m bench --only {key}`, measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"{setup}",
        "",
        "| measure | values | ratio | target |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {values} | {ratio:.2f} | {target} |" for name, values, ratio, target in rows
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
