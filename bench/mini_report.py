"""The ``## mini`` section of ``BENCHMARKS.md`` from `bench.mini`'s results."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

HEADING = "## mini: Phi-3-mini's real shape on this machine"
GIB = 2**30


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f}"


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _copies(weights: dict[str, Any]) -> str:
    """The weight bytes' files (``.onnx.data``, safetensors): paths naming them, and copies
    (distinct inodes) on disk with their size.
    """
    data = {k: w for k, w in weights.items() if k.endswith((".onnx.data", ".safetensors"))}
    if not data:
        return "none"
    paths = sum(w["paths"] for w in data.values())
    copies = sum(w["copies"] for w in data.values())
    size = sum(w["bytes_on_disk"] for w in data.values())
    return f"{paths} paths, {copies} on disk ({_gib(size)} GiB)"


def _pcts(values: list[float | None]) -> str:
    got = sorted(v for v in values if v is not None)
    if not got:
        return "n/a"
    p50 = got[len(got) // 2] if len(got) % 2 else (got[len(got) // 2 - 1] + got[len(got) // 2]) / 2
    p95 = got[min(len(got) - 1, round(0.95 * (len(got) - 1)))]
    return f"p50 {p50:.2f} s, p95 {p95:.2f} s (n={len(got)})"


def _statuses(block: dict[str, Any]) -> str:
    s = block["status"]
    return (
        f"429: {s['429']}, 503: {s['503']}, 504: {s['504']}, other errors: {block['other_errors']}"
    )


def section(results: dict[str, Any], args: argparse.Namespace, *, measured: datetime) -> str:
    """The section's markdown, from `bench.mini`'s results and options."""
    m, life, bare, served, kv = (
        results["machine"],
        results["lifecycle"],
        results["bare"],
        results["served"],
        results["kv"],
    )
    n = args.clients
    many_key = f"batch{n}"
    build = results.get("build")
    lines = [
        HEADING,
        "",
        f"`make bench-mini` (`python -m bench.mini --preset {results['preset']}`), measured "
        f"{measured:%Y-%m-%d %H:%M} UTC on {m['machine']}, {m['cpus']} CPUs, "
        f"{m['memory'] / GIB:.1f} GiB memory, Python {m['python']}; whole run "
        f"{results['total_s'] / 60:.1f} min. Random weights at the preset's shape "
        f"({results['parameters'] / 1e9:.2f}B parameters, int4 build {_gib(kv['weights_bytes'])} "
        "GiB), served from the local hub as `make demo` serves the tiny model, in a fresh data "
        "dir. The machine is shared with other sessions, so absolute figures are noisy: load "
        f"average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in m['load_before'])} before, "
        f"{'/'.join(f'{x:.2f}' for x in m['load_after'])} after.",
        "",
    ]
    if build:
        lines += [
            f"**Build** (`ensure_tiny_phi3`, a child process: random bf16 weights written tensor "
            f"by tensor, then the int4 build with its fp32 intermediate on disk): "
            f"{build['seconds'] / 60:.1f} min, peak resident memory {_gib(build['peak_rss'])} GiB.",
            "",
        ]
    else:
        lines += ["**Build**: cached from an earlier run (`--rebuild` measures it).", ""]
    lines += [
        f"**Lifecycle**, stage by stage: the task functions the lifecycle flow runs, in its "
        f"order, in one child process (what Prefect adds is the orchestration section's "
        f"subject); eval set `{life['evaluation']['eval_set']}`"
        + (
            " (`evals/smoke.jsonl`, 6 items, not the default `phi3-default`'s 50: this run "
            "does not say how long the lifecycle's default evaluation takes)"
            if life["evaluation"]["eval_set"] == "smoke"
            else ""
        )
        + f"; the demo's relaxed gates (random weights). Decision: {life['decision']}"
        + (f" ({'; '.join(life['failed_gates'])})" if life.get("failed_gates") else "")
        + ". The server below serves the version registered here either way. "
        f"Process after imports: {_gib(life['rss_after_imports'])} GiB.",
        "",
        "| stage | wall s | peak RSS of the process tree, GiB | data dir on disk, GiB | "
        "weight data files after it: names, copies on disk |",
        "|---|---|---|---|---|",
    ]
    for row in life["stages"]:
        lines.append(
            f"| {row['stage']} | {row['seconds']:.1f} | {_gib(row['peak_rss'])} | "
            f"{_gib(row['disk_used'])} | {_copies(row['weights'])} |"
        )
    total = sum(row["seconds"] for row in life["stages"])
    metrics = life["evaluation"]["metrics"]
    evaluated = ", ".join(
        f"{key} {metrics[key]:.3g}"
        for key in ("n_items", "tokens_per_s", "latency_p95_s", "ttft_p50_s", "error_rate")
        if key in metrics
    )
    ready = served["ready"]
    lines += [
        f"| **total** | {total:.1f} | {_gib(max(r['peak_rss'] for r in life['stages']))} | | |",
        "",
        f"Evaluation: {evaluated}. While the server runs (its folder included): data dir "
        f"{_gib(ready['disk_used'])} GiB on disk; {_copies(ready['weights'])}.",
        "",
    ]
    one, many = served["one"], served["many"]
    ratio = many["tps"] / bare[many_key]["tps"] if bare[many_key]["tps"] else 0.0
    no_504 = many["status"]["504"] == 0
    long = served["long"]
    stream = served["long_stream"]
    ceiling = served["rss_idle"] + kv["budget"]
    lm = served["long_memory"]
    lm_ceiling = lm["rss_idle"] + kv["budget"]
    wrongly = [r for r in served["refusals"] if r.get("could_have_finished")]
    lines += [
        f"**Serving**: bare onnxruntime-genai first (this process, greedy, the same prompts, "
        f"max_tokens {args.max_tokens}, {args.rounds} rounds), released, then `phi3ops serve`'s "
        f"server as a subprocess with its defaults (1 uvicorn worker, 60 s request timeout, "
        f"the default KV budget), ready in {served['ready_s']:.0f} s; clients on loopback, "
        f"non-streamed chat requests unless said.",
        "",
        "| measure | value | ratio | target |",
        "|---|---|---|---|",
        f"| bare og, tokens/s: batch {n} vs batch 1 | {bare[many_key]['tps']:.2f} vs "
        f"{bare['batch1']['tps']:.2f} | {bare[many_key]['tps'] / bare['batch1']['tps']:.2f} "
        "| report |",
        f"| served, tokens/s: {n} clients ({args.per_client} requests each) vs 1 client "
        f"({args.single} requests) | {many['tps']:.2f} vs {one['tps']:.2f} | "
        f"{many['tps'] / one['tps'] if one['tps'] else 0:.2f} | report |",
        f"| served {n} clients vs bare og batch {n}, tokens/s | {many['tps']:.2f} vs "
        f"{bare[many_key]['tps']:.2f} | {ratio:.2f} | >= 0.85 and no 504: "
        f"{'met' if ratio >= 0.85 and no_504 else 'NOT met'} |",
        f"| served 1 client vs bare og batch 1, tokens/s | {one['tps']:.2f} vs "
        f"{bare['batch1']['tps']:.2f} | {one['tps'] / bare['batch1']['tps']:.2f} | report |",
        f"| latency, 1 client | p50 {_s(one['p50'])} s, p95 {_s(one['p95'])} s | | report |",
        f"| latency, {n} clients | p50 {_s(many['p50'])} s, p95 {_s(many['p95'])} s | | report |",
        f"| refusals and timeouts, 1 client | {_statuses(one)} | | none |",
        f"| refusals and timeouts, {n} clients | {_statuses(many)} | | no 504 |",
        f"| time to first token (streamed), 1 client | {_pcts(served['ttft_one'])} | | report |",
        f"| time to first token (streamed), {n} clients at once | {_pcts(served['ttft_many'])} "
        "| | report |",
        f"| bare og prefill of one {results['long_prompt_tokens']}-token prompt | "
        f"{bare['long_prefill']['prefill_s']:.1f} s "
        f"({1 / bare['long_prefill']['s_per_prompt_token']:.0f} prompt tokens/s) | | report |",
        f"| {n} long requests at once ({results['long_prompt_tokens']}-token prompt, max_tokens "
        f"{args.long_max_tokens}, not streamed) | {long['ok']} answered; {_statuses(long)} | | "
        "refuse only what cannot finish |",
        f"| refused long requests the server could have finished (its work ahead + the bare "
        f"engine's own time for the request alone <= the deadline) | {len(wrongly)} of "
        f"{len(served['refusals'])} refused | | 0 |",
        f"| server resident memory: idle / peak at 1 / {n} clients | {_gib(served['rss_idle'])}"
        f" / {_gib(one['rss_peak'])} / {_gib(many['rss_peak'])} GiB | | report |",
        f"| server resident memory, peak with {n} long requests streamed (up to "
        f"{args.long_window_s:.0f} s: {stream['ended']} ended, {stream['finished']} finished; "
        f"statuses {', '.join(stream['statuses']) or 'none'}) vs idle (weights loaded) + KV "
        f"budget | {_gib(stream['rss_peak'])} vs {_gib(served['rss_idle'])} + "
        f"{_gib(kv['budget'])} = {_gib(ceiling)} GiB | {stream['rss_peak'] / ceiling:.2f} "
        "| <= 1 |",
        f"| server resident memory, peak with the {n} long requests not streamed | "
        f"{_gib(long['rss_peak'])} GiB | | report |",
        f"| a second server with request timeout {lm['timeout_s']} s, so that admission takes "
        f"the {n} long requests (not streamed; sampled for {lm['window_s']:.0f} s, in which "
        f"{lm['ended']} ended: {', '.join(lm['statuses']) or 'none'}): peak resident "
        f"memory vs idle (weights loaded) + KV budget | {_gib(lm['rss_peak'])} vs "
        f"{_gib(lm['rss_idle'])} + {_gib(kv['budget'])} = {_gib(lm_ceiling)} GiB | "
        f"{lm['rss_peak'] / lm_ceiling:.2f} | <= 1 |",
        "",
        f"KV budget (`kv_budget_bytes`, default from `phi3_chat.admission.default_kv_budget`): "
        f"min(per-token bytes x context x max batch = {kv['per_token']:,} x "
        f"{kv['context_length']} x {kv['max_batch_size']}, 25% of the machine's "
        f"{_gib(kv['machine_memory'])} GiB), at least one full-context row = "
        f"{_gib(kv['budget'])} GiB here; weights (int4 files) {_gib(kv['weights_bytes'])} GiB.",
        "",
    ]
    if served["refusals"]:
        lines.append("Refused long requests (server's prediction vs its deadline):")
        lines.append("")
        for r in served["refusals"]:
            if "predicted_s" in r:
                lines.append(
                    f"- {r['status']}: predicted {r['predicted_s']:.1f} s ({r['ahead_s']:.1f} s "
                    f"ahead of it) vs deadline {r['deadline_s']:.0f} s; the bare engine alone "
                    f"{r['bare_alone_s']:.1f} s: "
                    f"{'could have finished' if r['could_have_finished'] else 'could not finish'}"
                )
            else:
                lines.append(f"- {r['status']}: {r['message']}")
        lines.append("")
    if served.get("many_errors"):
        lines.append(f"First errors with {n} clients: {served['many_errors']}")
        lines.append("")
    return "\n".join(lines)
