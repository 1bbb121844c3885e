"""`make bench-mini` (``python -m bench.mini``): Phi-3-mini's real shape on this machine.

On the ``mini`` preset (random weights at Phi-3-mini's exact shape, int4 2.2 GB; built once
and cached like the other presets), served from the local hub as ``make demo`` serves the
tiny one, in a fresh data dir:

* the lifecycle stage by stage (`bench.mini_lifecycle`, a child process): wall time, peak
  resident memory of the process tree, the data dir's disk use and the copies of the weight
  bytes on disk after each stage;
* bare onnxruntime-genai at batch 1 and batch N on the served files (greedy, the same prompts);
* ``phi3ops serve``'s server (a subprocess, its defaults: 60 s request timeout, default KV
  budget) with 1 client and N concurrent clients: tokens/s, p50/p95 latency, 429/503/504;
  streamed time to first token; N long requests (~1,000-token prompts): what admission does
  with them (refusals against their deadline and the engine's own speed), and the server's
  resident memory while their batches run against the KV budget plus the weights.

Writes the ``## mini`` section of ``BENCHMARKS.md`` (the other sections are kept). Try the
harness on a small preset first: ``python -m bench.mini --preset tiny --out /tmp/b.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.mini_disk import PeakSampler, disk_used, tree_rss, weight_copies
from bench.mini_report import HEADING, section
from bench.report import write_sections

REPO_ROOT = Path(__file__).resolve().parents[1]


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mini", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", default="mini", help="tiny, bench or mini (default)")
    parser.add_argument(
        "--eval-set", default="phi3-default", help="eval set of the lifecycle (smoke: 6 items)"
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=2, help="requests per client")
    parser.add_argument("--single", type=int, default=4, help="requests of the 1 client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="bare og rounds per batch size")
    parser.add_argument("--long-prompt-tokens", type=int, default=1000)
    parser.add_argument("--long-max-tokens", type=int, default=256)
    parser.add_argument("--long-window-s", type=float, default=150.0)
    parser.add_argument(
        "--long-timeout-s",
        type=int,
        default=900,
        help="request timeout of the second server, which admits the long requests",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    parser.add_argument("--keep-data", action="store_true", help="keep the data dir")
    parser.add_argument(
        "--rebuild", action="store_true", help="drop the cached preset and measure its build"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and writes its section; returns the exit code."""
    args = _args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PHI3OPS_PROGRESS", "0")
    from bench import mini_serve
    from offline.local_hub import LocalHub
    from offline.tiny_phi3 import PRESETS, ensure_tiny_phi3
    from phi3ops.settings import get_settings
    from phi3ops.sources import ONNX_REPO_ID, PYTORCH_REPO_ID

    began = time.perf_counter()
    load_before = os.getloadavg()
    recipe = PRESETS[args.preset]
    cache = Path(os.environ.get("PHI3OPS_BENCH_CACHE", REPO_ROOT / ".data" / "bench-cache"))
    build = _build(cache, args.preset, rebuild=args.rebuild)
    repos = ensure_tiny_phi3(cache, recipe)  # built now, or cached
    print(f"preset {args.preset}: {repos.root}", flush=True)
    work = REPO_ROOT / ".data" / f"bench-mini-{args.preset}"
    shutil.rmtree(work, ignore_errors=True)
    data_dir = work / "data"
    data_dir.mkdir(parents=True)
    os.environ["PHI3OPS_DATA_DIR"] = str(data_dir)
    get_settings.cache_clear()
    results: dict[str, Any] = {
        "preset": args.preset,
        "build": build,
        "parameters": recipe.num_parameters,
    }
    try:
        with LocalHub() as hub:
            hub.add_repo(ONNX_REPO_ID, repos.onnx_dir)
            hub.add_repo(PYTORCH_REPO_ID, repos.pytorch_dir)
            env = os.environ | {"PHI3OPS_HF_ENDPOINT": hub.url, "PYTHONPATH": str(REPO_ROOT)}
            out_json = work / "lifecycle.json"
            print("lifecycle (child process) ...", flush=True)
            subprocess.run(
                [sys.executable, "-m", "bench.mini_lifecycle", str(out_json), args.eval_set],
                env=env,
                cwd=REPO_ROOT,
                check=True,
            )
            results["lifecycle"] = json.loads(out_json.read_text())
        long, long_tokens = mini_serve.long_prompt(repos.onnx_model_dir, args.long_prompt_tokens)
        results["long_prompt_tokens"] = long_tokens
        print("bare onnxruntime-genai ...", flush=True)
        results["bare"] = mini_serve.bare(
            repos.onnx_model_dir,
            clients=args.clients,
            max_tokens=args.max_tokens,
            rounds=args.rounds,
            long=long,
        )
        name, version = results["lifecycle"]["model_name"], results["lifecycle"]["version"]
        print("server ...", flush=True)
        # The version just registered, whether or not its gates passed (random weights).
        served = mini_serve.serve(
            f"models:/{name}/{version}",
            work / "server.log",
            clients=args.clients,
            per_client=args.per_client,
            single=args.single,
            max_tokens=args.max_tokens,
            long=long,
            long_max_tokens=args.long_max_tokens,
            long_window_s=args.long_window_s,
            on_ready=lambda: {
                "disk_used": disk_used(data_dir),
                "weights": weight_copies(data_dir),
            },
        )
        print("server with a long request timeout (memory at long requests) ...", flush=True)
        served["long_memory"] = mini_serve.long_memory(
            f"models:/{name}/{version}",
            work / "server.log",
            clients=args.clients,
            long=long,
            max_tokens=args.long_max_tokens,
            window_s=args.long_window_s,
            timeout_s=args.long_timeout_s,
        )
        print(f"  {served['long_memory']}", flush=True)
        served["refusals"] = mini_serve.refusals(
            served.pop("long_rows"), results["bare"], long_tokens, args.long_max_tokens
        )
        results["served"] = served
        results["kv"] = _kv_budget(repos.onnx_model_dir)
    finally:
        if not args.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
    results["machine"] = _machine(load_before)
    results["total_s"] = time.perf_counter() - began
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    text = section(results, args, measured=datetime.now(UTC))
    write_sections(args.out, {HEADING.removeprefix("## "): text})
    print(text)
    print(f"results: {work / 'results.json'}; section written to {args.out}")
    return 0


def _build(cache: Path, preset: str, *, rebuild: bool) -> dict[str, float] | None:
    """Builds the preset in a child process (``python -m offline.tiny_phi3``) when it is not
    cached (or ``rebuild``), sampling the child's resident memory; None when it was cached.
    """
    from offline.tiny_phi3 import PRESETS, TinyPhi3Repos
    from offline.tiny_phi3.build import is_complete

    root = TinyPhi3Repos.at(cache / PRESETS[preset].cache_key(), PRESETS[preset]).root
    if rebuild:
        shutil.rmtree(root, ignore_errors=True)
    if is_complete(root):
        return None
    print(f"building the {preset} preset (child process) ...", flush=True)
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "offline.tiny_phi3", str(cache), "--preset", preset],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
    )
    sampler = PeakSampler(lambda: tree_rss(child.pid), interval_s=0.2)
    sampler.start()
    code = child.wait()
    sampler.stop()
    if code != 0:
        raise RuntimeError(f"building the {preset} preset failed (exit {code})")
    return {"seconds": time.perf_counter() - started, "peak_rss": sampler.take()}


def _kv_budget(model_dir: Path) -> dict[str, Any]:
    """The server's default KV budget for this model on this machine (as `phi3_chat.model`
    computes it: `phi3_chat.admission.default_kv_budget` with the default batch size).
    """
    from phi3_chat.admission import default_kv_budget, kv_bytes_per_token, machine_memory_bytes
    from phi3_chat.batcher import DEFAULT_MAX_BATCH_SIZE

    config = json.loads((model_dir / "genai_config.json").read_text())["model"]
    context = int(config["context_length"])
    weights = sum(p.stat().st_size for p in model_dir.glob("*.onnx*"))
    return {
        "per_token": kv_bytes_per_token(config),
        "context_length": context,
        "max_batch_size": DEFAULT_MAX_BATCH_SIZE,
        "machine_memory": machine_memory_bytes(),
        "budget": default_kv_budget(
            config, context, DEFAULT_MAX_BATCH_SIZE, machine_memory_bytes()
        ),
        "weights_bytes": weights,
    }


def _machine(load_before: tuple[float, float, float]) -> dict[str, Any]:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpus": os.cpu_count(),
        "memory": memory,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


if __name__ == "__main__":
    raise SystemExit(main())
