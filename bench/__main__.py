"""`make bench`: serving speed of the packaged Phi-3, measured side by side in one process.

On a ~200M-parameter random Phi-3 built locally (ONNX int4 + bf16 PyTorch), fetched from the
local hub and packaged exactly as the pipeline does, with the same prompts for every contender:

* tokens/s through the loaded ONNX pyfunc vs a bare onnxruntime-genai loop (target >= 0.95);
* ONNX int4 pyfunc vs the transformers flavor on CPU (reported; expect > 2x);
* ``mlflow.pyfunc.load_model("models:/...@candidate")`` to first token vs bare ``og.Model``.

Contenders alternate prompt by prompt, so machine noise hits both sides alike. Results go to
stdout and ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

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
    from phi3ops.offline.packaged import register_both_flavors
    from phi3ops.offline.tiny_phi3 import PRESETS, ensure_tiny_phi3
    from phi3ops.settings import get_settings

    cache = Path(os.environ.get("PHI3OPS_BENCH_CACHE", REPO_ROOT / ".data" / "bench-cache"))
    repos = ensure_tiny_phi3(cache, PRESETS[recipe_name])
    os.environ["PHI3OPS_DATA_DIR"] = str(tmp / "data")
    get_settings.cache_clear()
    registered = register_both_flavors(repos, model_name_prefix="bench")
    out: dict[str, object] = {"recipe": repos.recipe, "onnx_model_dir": repos.onnx_model_dir}
    out |= {flavor: version.candidate_uri for flavor, version in registered.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--preset", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    with tempfile.TemporaryDirectory(prefix="phi3ops-bench-") as tmp:
        packaged = _package(Path(tmp), args.preset)
        recipe = packaged["recipe"]
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
    report = _markdown(rows, recipe, args)
    print(report)
    args.output.write_text(report)
    print(f"written to {args.output}")
    return 0


def _markdown(rows: list[tuple[str, str, float, str]], recipe: object, args) -> str:
    params = getattr(recipe, "num_parameters", None)
    lines = [
        "# Benchmarks",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; `make bench` "
        f"(preset `{args.preset}`, {params:,} parameters; {len(PROMPTS)} prompts x "
        f"{args.rounds} rounds, max_tokens={args.max_tokens}, greedy).",
        "Contenders run alternately, prompt by prompt, in one process: the ratios are what "
        "counts; absolute numbers move with the machine's load.",
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
