"""``python -m bench --only arms``: what serving ``@candidate`` beside ``@champion`` costs.

One server (`start_server` on ``models:/<name>@champion``, one uvicorn worker, following the
registry every 0.5 s) serves the ONNX flavor; the same package is registered twice, as the
champion and the candidate. Measured in one run:

* resident memory of the server with both arms loaded (shadow mode) vs the champion alone
  (target <= 2.1);
* champion p50 request latency with shadow mode on vs off, at 1 and at 4 clients, blocks
  alternating off-on-on-off (target at 1 client <= 1.10: shadow must not slow the champion
  by more than 10%), and with 1 client that pauses between requests (the copies then run
  in the pauses and the next request cuts them off: what a cut-off costs);
* the pause of an alias switch: the longest request latency of 4 clients in the seconds
  around a move of ``@champion`` (a version loaded beside the serving one) vs the longest in
  as many seconds without a switch (reported).

Shadow copies only run while no client call is in flight (`phi3ops.serving.shadow`), so the
run also reports how many copies were answered in full and how many a client call cut off.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.serving import Row, _body, _free_port

CLIENTS = 4
POLL_S = 0.5
#: A client that pauses between requests leaves the idle moments shadow copies run in.
THINK_S = 0.3


def _rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and every process of its session (uvicorn's workers)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[3]) != pid and int(entry.name) != pid:  # stat[3]: the session id
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            continue
    return total


def _wait_for(check: Callable[[], bool], what: str, *, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


class _Load:
    """``clients`` closed-loop clients on /v1/chat/completions; latencies with their end times."""

    def __init__(self, url: str, prompts: list[str], *, max_tokens: int) -> None:
        self.url, self.prompts, self.max_tokens = url, prompts, max_tokens

    def block(
        self, clients: int, per_client: int, *, think_s: float = 0.0
    ) -> list[tuple[float, float]]:
        """(end time, seconds) of each request; each client sends ``per_client`` prompts,
        pausing ``think_s`` seconds after each answer.
        """
        import httpx

        def one(first: int) -> list[tuple[float, float]]:
            out = []
            with httpx.Client(timeout=600) as client:
                for n in range(first, first + per_client):
                    body = _body(self.prompts[n % len(self.prompts)], self.max_tokens)
                    start = time.perf_counter()
                    response = client.post(f"{self.url}/v1/chat/completions", json=body)
                    end = time.perf_counter()
                    if response.status_code != 200:
                        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
                    out.append((end, end - start))
                    time.sleep(think_s)
            return out

        with ThreadPoolExecutor(clients) as pool:
            return [item for part in pool.map(one, range(clients)) for item in part]


def cost_of_two_arms(
    packaged: dict[str, object], args, tmp: Path, *, prompts: list[str]
) -> tuple[str, list[Row]]:
    """Runs the section; returns (setup text, rows)."""
    from mlflow import MlflowClient

    from phi3ops.registry import alias_version
    from phi3ops.serving.server import start_server, stop_server, wait_until_ready
    from phi3ops.traffic import TrafficPlan, clear_plan, write_plan

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    name = str(packaged["onnx"]).removeprefix("models:/").split("@")[0]
    registry = MlflowClient()
    first = alias_version(name, "candidate")
    assert first is not None
    source = registry.get_model_version(name, first).source
    second = str(registry.create_model_version(name, source=source).version)
    third = str(registry.create_model_version(name, source=source).version)
    registry.set_registered_model_alias(name, "champion", first)
    registry.set_registered_model_alias(name, "candidate", second)
    clear_plan(name)

    port, rounds, max_tokens = _free_port(), args.rounds, args.max_tokens
    url = f"http://127.0.0.1:{port}"
    log = tmp / "arms-server.log"
    with log.open("ab") as out:
        process = start_server(
            f"models:/{name}@champion",
            port=port,
            workers=1,
            timeout_s=600,
            poll_s=POLL_S,
            stdout=out,
            stderr=out,
        )
    load = _Load(url, prompts, max_tokens=max_tokens)

    def logged(text: str) -> bool:
        return text in log.read_text()

    state: dict[str, bool] = {"shadow": False}

    def shadow(on: bool) -> None:
        """Turns shadow mode on or off and waits until the server has loaded / dropped the
        candidate (its log says so), then warms the arm.
        """
        if state.get("shadow") == on:
            return
        state["shadow"] = on
        news = "(@candidate) now takes live traffic" if on else "takes no more live traffic"
        before = log.read_text().count(news)
        if on:
            write_plan(name, TrafficPlan.start("shadow"))
        else:
            clear_plan(name)
        _wait_for(lambda: log.read_text().count(news) > before, f"shadow {'on' if on else 'off'}")
        load.block(1, 2)

    latencies: dict[tuple[bool, int, float], list[float]] = {}
    try:
        wait_until_ready(process, url, timeout=300)
        load.block(CLIENTS, 2)  # warm-up
        time.sleep(1)
        rss_one = _rss_bytes(process.pid)
        shadow(True)
        time.sleep(1)
        rss_two = _rss_bytes(process.pid)
        for round_ in range(rounds):
            for on in (False, True) if round_ % 2 == 0 else (True, False):
                shadow(on)
                for clients, think in ((1, 0.0), (CLIENTS, 0.0), (1, THINK_S)):
                    per_client = 2 * len(prompts) if clients == 1 else len(prompts)
                    got = load.block(clients, per_client, think_s=think)
                    latencies.setdefault((on, clients, think), []).extend(s for _, s in got)
                    print(
                        f"  shadow {'on ' if on else 'off'} {clients} client(s), think {think} s, "
                        f"round {round_}: p50 {statistics.median(s for _, s in got):.3f} s"
                    )
        # The alias switch: the same 4-client load, once with @champion moved in the middle.
        shadow(False)
        quiet = load.block(CLIENTS, len(prompts))
        with ThreadPoolExecutor(1) as mover:
            moved_at: list[float] = []

            def move() -> None:
                time.sleep(1.0)
                moved_at.append(time.perf_counter())
                registry.set_registered_model_alias(name, "champion", third)

            future = mover.submit(move)
            switching = load.block(CLIENTS, 2 * len(prompts))
            future.result()
        _wait_for(lambda: logged(f"Now serving version {third}"), "the switch")
    finally:
        stop_server(process)
    shadow_counts = _shadow_outcomes(name, second)

    def window_max(rows: list[tuple[float, float]], start: float, seconds: float) -> float:
        inside = [s for end, s in rows if start <= end <= start + seconds]
        return max(inside) if inside else float("nan")

    span = (max(e for e, _ in quiet) - min(e for e, _ in quiet)) if quiet else 0.0
    quiet_max = max(s for _, s in quiet)
    switch_max = window_max(switching, moved_at[0], span) if moved_at else float("nan")
    p50 = {key: statistics.median(values) for key, values in latencies.items()}
    rows: list[Row] = [
        (
            "resident memory (MiB) of the server: both arms loaded vs the champion alone",
            f"{rss_two / 2**20:.0f} vs {rss_one / 2**20:.0f}",
            rss_two / rss_one,
            "<= 2.1",
        ),
        (
            "champion p50 latency (s), 1 client: shadow on vs off",
            f"{p50[(True, 1, 0.0)]:.3f} vs {p50[(False, 1, 0.0)]:.3f}",
            p50[(True, 1, 0.0)] / p50[(False, 1, 0.0)],
            "<= 1.10",
        ),
        (
            f"champion p50 latency (s), {CLIENTS} clients: shadow on vs off",
            f"{p50[(True, CLIENTS, 0.0)]:.3f} vs {p50[(False, CLIENTS, 0.0)]:.3f}",
            p50[(True, CLIENTS, 0.0)] / p50[(False, CLIENTS, 0.0)],
            "report",
        ),
        (
            f"champion p50 latency (s), 1 client pausing {THINK_S} s after each answer (shadow "
            "copies run in the pauses and are cut off by the next request): on vs off",
            f"{p50[(True, 1, THINK_S)]:.3f} vs {p50[(False, 1, THINK_S)]:.3f}",
            p50[(True, 1, THINK_S)] / p50[(False, 1, THINK_S)],
            "report",
        ),
        (
            f"alias switch pause: longest latency (s) of {CLIENTS} clients over {span:.1f} s "
            "from a move of @champion vs over a block without one",
            f"{switch_max:.3f} vs {quiet_max:.3f}",
            switch_max / quiet_max,
            "report",
        ),
    ]
    setup = (
        f"one server subprocess (`start_server` on models:/{name}@champion, 1 uvicorn worker, "
        f"registry polled every {POLL_S} s); champion and candidate are the same ONNX package "
        f"registered twice; closed-loop clients on /v1/chat/completions, max_tokens="
        f"{max_tokens}, greedy; shadow off/on blocks alternate A-B, B-A over {rounds} rounds "
        f"(1 client: {2 * len(prompts)} requests, {CLIENTS} clients: {len(prompts)} each). "
        f"Shadow copies of the candidate recorded: {shadow_counts}."
    )
    return setup, rows


def _shadow_outcomes(name: str, version: str) -> dict[str, int]:
    """Outcomes of the candidate's shadow records (served in full, or cut off by a client)."""
    import mlflow

    from phi3ops.names import MODEL_VERSION_TAG, RECORD_ATTRIBUTE, SHADOW_TAG
    from phi3ops.settings import get_settings
    from phi3ops.tracking import configure_tracking

    experiment_id = configure_tracking(get_settings().inference_experiment_name)
    traces = mlflow.search_traces(
        locations=[experiment_id],
        filter_string=f"tag.`{MODEL_VERSION_TAG}` = '{version}' AND tag.`{SHADOW_TAG}` = 'true'",
        return_type="list",
    )
    counts: dict[str, int] = {}
    for trace in traces:
        for span in trace.data.spans:
            record = span.get_attribute(RECORD_ATTRIBUTE)
            if isinstance(record, dict):
                outcome = record.get("outcome", "?")
                counts[outcome] = counts.get(outcome, 0) + 1
    return counts
