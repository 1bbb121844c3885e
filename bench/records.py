"""``python -m bench --only records``: do inference records keep up with serving?

One server (`start_server`, ``--workers 2``, every request recorded through the spool of
`phi3ops.serving.spool` into the run's SQLite MLflow store) serves the ONNX flavor; this process
plays ``--clients`` closed-loop clients on ``/v1/chat/completions`` over loopback, with a small
``max_tokens`` so the server answers as fast as it can. Measured in one run:

* the server's requests/s vs the writer's records/s: traces in the store over the same window
  (counted in the store every 0.25 s), and how long after the last answer the last record of
  the load was stored;
* the largest lag: the most records waiting (`read_backlog` on the server's spool folder,
  every worker's file summed) and the longest a waiting record had waited;
* ``SIGTERM`` under load: records stored vs requests answered once the server has exited, what
  still waits in the spool, and whether the stop warned about it.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.serving import Row, _body, _free_port

#: Seconds between two looks at the backlog and at the store.
SAMPLE_S = 0.25
#: How long the load of the SIGTERM run lasts before the signal (s).
TERM_AFTER_S = 3.0
#: Requests answered so far by every client (sampled with the store).
ANSWERED = [0]
_ANSWERED_LOCK = threading.Lock()


class _Sampler(threading.Thread):
    """Samples (time, records waiting, oldest age, traces stored) until stopped."""

    def __init__(self, spool_dir: Path, count: Any) -> None:
        super().__init__(daemon=True)
        self.spool_dir, self.count = spool_dir, count
        self.samples: list[tuple[float, int, float, int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        from phi3ops.serving.spool import read_backlog

        while not self.done.is_set():
            backlog = read_backlog(self.spool_dir)
            self.samples.append(
                (
                    time.time(),
                    backlog.waiting,
                    backlog.oldest_age_s() or 0.0,
                    self.count(),
                    ANSWERED[0],
                )
            )
            self.done.wait(SAMPLE_S)


def _trace_counter(db: Path, experiment: str) -> Callable[[], int]:
    """Traces stored in ``experiment`` of the SQLite store at ``db`` (0 before it exists)."""

    def count() -> int:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM trace_info t JOIN experiments e "
                    "ON t.experiment_id = e.experiment_id WHERE e.name = ?",
                    (experiment,),
                ).fetchone()
            return int(row[0])
        except sqlite3.Error:
            return 0

    return count


def _load(
    url: str, prompts: list[str], *, clients: int, per_client: int, max_tokens: int
) -> tuple[int, int]:
    """``clients`` clients, each sending up to ``per_client`` requests one after another; a
    client stops at its first connection error (the server stopping). Returns (answered: any
    HTTP status, of which 200).
    """
    import httpx

    def one(first: int) -> tuple[int, int]:
        answered = ok = 0
        with httpx.Client(timeout=600) as client:
            for n in range(first, first + per_client):
                body = _body(prompts[n % len(prompts)], max_tokens)
                try:
                    response = client.post(f"{url}/v1/chat/completions", json=body)
                except httpx.TransportError:
                    break
                answered += 1
                ok += response.status_code == 200
                with _ANSWERED_LOCK:
                    ANSWERED[0] += 1
        return answered, ok

    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(one, range(clients)))
    return sum(a for a, _ in parts), sum(o for _, o in parts)


def _wait(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(SAMPLE_S)
    return check()


def _start(model_uri: str, log: Path) -> tuple[Any, str]:
    from phi3ops.serving.server import start_server, wait_until_ready

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as out:
        process = start_server(model_uri, port=port, workers=2, stdout=out, stderr=out)
    started = time.perf_counter()
    wait_until_ready(process, url, timeout=300)
    print(f"  server ready in {time.perf_counter() - started:.1f} s (2 workers, {model_uri})")
    return process, url


def _writer_capacity(tmp: Path, count: int) -> tuple[float, float]:
    """Records/s `write_entries` stores ``count`` served entries at, in batches of 200 into a
    fresh SQLite store: (bulk path, MLflow's public API alone), best of two alternating runs.
    """
    from unittest import mock

    from mlflow import MlflowClient

    from phi3ops.serving import trace_writer
    from phi3ops.serving.records import InferenceRecorder

    best = {"bulk": 0.0, "api": 0.0}
    for run, way in enumerate(("bulk", "api", "api", "bulk")):
        uri = f"sqlite:///{tmp / f'capacity-{run}.db'}"
        experiment_id = MlflowClient(uri).create_experiment(
            "capacity", artifact_location=str(tmp / "capacity-artifacts")
        )
        recorder = InferenceRecorder(
            model_name="m", model_version="1", experiment_id=experiment_id, model_id="m-1"
        )
        entries = []
        for i in range(count):
            ((record, row),) = recorder.records_for(
                {"inputs": [{"messages": [{"role": "user", "content": f"hello {i}"}]}]},
                status_code=200,
                body={"predictions": [{"choices": [{"message": {"content": "hi"}}]}]},
                started=time.time(),
                latency_s=0.01,
            )
            entries.append(recorder.entry(record, request=row))
        patch = mock.patch.object(trace_writer, "insert_traces", lambda store, items: items)
        with patch if way == "api" else mock.MagicMock():
            started = time.perf_counter()
            for first in range(0, count, 200):
                trace_writer.write_entries(entries[first : first + 200], tracking_uri=uri)
            best[way] = max(best[way], count / (time.perf_counter() - started))
    return best["bulk"], best["api"]


def records_keep_up(
    packaged: dict[str, object], args: Any, tmp: Path, *, prompts: list[str]
) -> tuple[str, list[Row]]:
    """Runs the section; returns (setup text, rows)."""
    from phi3ops.serving.server import stop_server
    from phi3ops.serving.spool import read_backlog
    from phi3ops.settings import get_settings
    from phi3ops.tracking import tracking_uri

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    settings = get_settings()
    spool_dir = settings.data_dir / "serving" / "spool"
    db = Path(tracking_uri().removeprefix("sqlite:///"))
    count = _trace_counter(db, settings.inference_experiment_name)
    clients, max_tokens = args.records_clients, args.records_max_tokens
    per_client = max(1, args.records_requests // clients)
    log = tmp / "records-server.log"
    load_before = os.getloadavg()

    # 1. Steady load: requests/s, records/s, the largest lag, the drain after the last answer.
    process, url = _start(str(packaged["onnx"]), log)
    answered = _load(url, prompts, clients=clients, per_client=1, max_tokens=max_tokens)[0]
    _wait(lambda: count() >= answered, 120)  # the warm-up's records, out of the window
    sampler = _Sampler(spool_dir, count)
    sampler.start()
    stored_before = count()
    start = time.time()
    load_answered, load_ok = _load(
        url, prompts, clients=clients, per_client=per_client, max_tokens=max_tokens
    )
    load_end = time.time()
    answered += load_answered
    drained = _wait(lambda: count() >= answered and not read_backlog(spool_dir).waiting, 300)
    drain_end = time.time()
    sampler.done.set()
    sampler.join()
    load_s = load_end - start
    stored_load = count() - stored_before
    # Steady state: the middle of the load (its first and last fifth left out), where the
    # answers and the stored records are counted over the same samples.
    middle = [x for x in sampler.samples if start + load_s / 5 <= x[0] <= load_end - load_s / 5]
    (t0, *_, s0, a0), (t1, *_, s1, a1) = middle[0], middle[-1]
    requests_s, records_s = (a1 - a0) / (t1 - t0), (s1 - s0) / (t1 - t0)
    overall_s = stored_load / (drain_end - start)
    most_waiting = max(x[1] for x in sampler.samples)
    oldest = max(x[2] for x in sampler.samples)
    tail_s = drain_end - load_end
    print(
        f"  load: {load_answered} answered ({load_ok} ok) in {load_s:.1f} s "
        f"({load_answered / load_s:.1f} req/s); steady middle {t1 - t0:.1f} s: "
        f"{requests_s:.1f} req/s vs {records_s:.1f} rec/s stored; all {stored_load} stored "
        f"{tail_s:.1f} s after the last answer (drained: {drained}; {overall_s:.1f} rec/s from "
        f"the first request to the last stored); most waiting {most_waiting}, oldest {oldest:.2f} s"
    )

    # 2. SIGTERM under load: records stored vs requests answered once the server is gone.
    warned_before = log.read_text(errors="replace").count("were not stored within")
    term: dict[str, tuple[int, int]] = {}
    loader = threading.Thread(
        target=lambda: term.setdefault(
            "got", _load(url, prompts, clients=clients, per_client=10**6, max_tokens=max_tokens)
        )
    )
    loader.start()
    time.sleep(TERM_AFTER_S)
    backlog_at_term = read_backlog(spool_dir).waiting
    os.killpg(process.pid, signal.SIGTERM)
    stopped = time.perf_counter()
    process.wait(timeout=getattr(process, "drain_s", 60) + 60)
    exit_s = time.perf_counter() - stopped
    loader.join()
    stop_server(process)  # gone already: removes its downloaded model
    answered += term["got"][0]
    stored_all = count()
    left = read_backlog(spool_dir).waiting
    warned = log.read_text(errors="replace").count("were not stored within") > warned_before
    print(
        f"  SIGTERM: {term['got'][0]} answered under load; exited in {exit_s:.1f} s; "
        f"{stored_all} of {answered} answered stored, {left} in the spool, warned: {warned}"
    )
    # 3. The writer's capacity: records/s `write_entries` stores from a full spool (batches of
    # the spool's size, fresh SQLite stores), bulk vs MLflow's API alone, side by side.
    bulk_s, api_s = _writer_capacity(tmp, stored_load or 960)
    print(f"  writer capacity: {bulk_s:.1f} rec/s (bulk) vs {api_s:.1f} rec/s (MLflow API)")
    load_after = os.getloadavg()

    rows: list[Row] = [
        (
            "writer capacity: records/s `write_entries` stores from a full spool (batches of "
            "200, a fresh SQLite store) vs requests/s answered (steady state above)",
            f"{bulk_s:.1f} vs {requests_s:.1f}",
            bulk_s / requests_s,
            ">= 2",
        ),
        (
            "writer capacity, records/s: bulk INSERTs of new traces vs MLflow's "
            "`start_trace`/`log_spans` alone (same entries, alternating)",
            f"{bulk_s:.1f} vs {api_s:.1f}",
            bulk_s / api_s,
            "report",
        ),
        (
            f"records/s stored vs requests/s answered, {clients} clients, 2 workers "
            "(steady state: the middle three fifths of the load)",
            f"{records_s:.1f} vs {requests_s:.1f}",
            records_s / requests_s,
            ">= 1 (keeps up; bounded by the arrivals)",
        ),
        (
            f"the load's {stored_load} records: stored per s from its first request to its "
            f"last record stored vs answered per s over the load",
            f"{overall_s:.1f} vs {load_answered / load_s:.1f}",
            overall_s / (load_answered / load_s),
            "report",
        ),
        (
            "largest lag: records waiting (most seen) / oldest waiting (s)",
            f"{most_waiting} / {oldest:.2f}",
            most_waiting / max(1, load_answered),
            "report (ratio: of the requests of the load)",
        ),
        (
            "last record of the load stored after the last answer (s)",
            f"{tail_s:.2f}",
            tail_s / load_s,
            "report (ratio: of the load's duration)",
        ),
        (
            "SIGTERM under load: records stored vs requests answered, after exit",
            f"{stored_all} vs {answered} ({left} left in the spool; "
            f"stop warned: {'yes' if warned else 'no'})",
            stored_all / answered,
            ">= 1 (or a warning naming what waits)",
        ),
    ]
    setup = (
        f"one server subprocess (`start_server`, `--workers 2`, records spooled and stored in "
        f"the run's SQLite MLflow store), {clients} closed-loop clients on loopback "
        f"(`/v1/chat/completions`, max_tokens={max_tokens}, greedy) sending {per_client} "
        f"requests each after a warm-up of 1 each; the backlog (`read_backlog` on the spool "
        f"folder) and the traces in the store sampled every {SAMPLE_S:g} s. Then the clients "
        f"send without end and the server gets SIGTERM after {TERM_AFTER_S:g} s (backlog "
        f"then: {backlog_at_term}; exit {exit_s:.1f} s later). Load average (1/5/15 min) "
        f"before {'/'.join(f'{x:.2f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.2f}' for x in load_after)}."
    )
    return setup, rows
