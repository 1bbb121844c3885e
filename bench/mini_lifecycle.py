"""``python -m bench.mini_lifecycle OUT_JSON``: the lifecycle's stages one after another in one
process, each timed, with the peak resident memory of this process tree during it, and the
data dir's disk use and copies of the weights after it. Run by `bench.mini` as a child with
``PHI3OPS_DATA_DIR`` (fresh) and ``PHI3OPS_HF_ENDPOINT`` (the local hub) set.

The stages are the plain functions the lifecycle flow's tasks wrap, in its order (fetch,
package = log the ONNX model, register, evaluate, promote = gates + aliases), as
``python -m bench --only orchestration`` runs them; what Prefect adds on top is that
benchmark's subject, not this one's. The gates are the demo's (`cli.jobs.DEMO_GATES`): the
weights are random.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.mini_disk import PeakSampler, disk_used, tree_rss, weight_copies

MODEL_NAME = "bench-mini"


def run(out: Path, *, eval_set: str) -> dict[str, Any]:
    """Runs the stages; writes and returns ``{"stages": [...], "evaluation": {...}, ...}``."""
    import logging

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    from cli.jobs import DEMO_GATES
    from phi3ops.settings import get_settings
    from phi3ops.sources import ONNX_REPO_ID, Variant
    from tasks.evaluation import evaluate_model
    from tasks.hub import fetch_snapshot
    from tasks.packaging import log_onnx_model
    from tasks.promotion import apply_decision, evaluate_gates
    from tasks.registry import register_version

    data_dir = get_settings().data_dir
    sampler = PeakSampler(lambda: tree_rss(os.getpid()))
    sampler.start()
    report: dict[str, Any] = {"stages": [], "rss_after_imports": tree_rss(os.getpid())}
    sampler.take()

    def stage(name: str, work: Callable[[], Any]) -> Any:
        print(f"  lifecycle: {name} ...", flush=True)
        started = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - started
        row: dict[str, Any] = {
            "stage": name,
            "seconds": seconds,
            "peak_rss": sampler.take(),
            "disk_used": disk_used(data_dir),
            "weights": weight_copies(data_dir),
        }
        report["stages"].append(row)
        print(
            f"  lifecycle: {name} {seconds:.1f} s, peak {row['peak_rss'] / 2**30:.2f} GiB",
            flush=True,
        )
        return result

    fetched = stage("fetch", lambda: fetch_snapshot(ONNX_REPO_ID, variant=Variant.ONNX_CPU_INT4))
    logged = stage("package", lambda: log_onnx_model(fetched))
    registered = stage("register", lambda: register_version(logged, fetched, model_name=MODEL_NAME))
    summary = stage("evaluate", lambda: evaluate_model(registered.model_uri, eval_set))

    decision: Any = None

    def promote() -> str:
        nonlocal decision
        decision = evaluate_gates(
            MODEL_NAME,
            registered.version,
            summary,
            None,
            champion_version=None,
            policy=get_settings().gates.with_overrides(DEMO_GATES),
        )
        return str(apply_decision(decision, triggered_by="bench-mini").action)

    report["decision"] = stage("promote", promote)
    report["failed_gates"] = [
        f"{gate.gate}: {gate.detail}" for gate in decision.gates if not gate.passed
    ]
    sampler.stop()
    report["evaluation"] = {"eval_set": summary.eval_set, "metrics": summary.metrics}
    report["version"] = registered.version
    report["model_name"] = MODEL_NAME
    out.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    run(Path(sys.argv[1]), eval_set=sys.argv[2] if len(sys.argv) > 2 else "phi3-default")
