"""The int4 build with its fp32 intermediate model on disk (bounded memory at Phi-3-mini's size),
and the tiny builder's tensor-by-tensor weights: the same files as before, on the tiny Phi-3.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from offline.tiny_phi3 import MINI, TINY, TinyPhi3Repos

pytestmark = pytest.mark.slow

# Runs one build in a fresh process (the builder's graph order can differ between a first and a
# second build in one process) and prints what the on-disk intermediate held.
_BUILD = """
import contextlib, json, sys
from pathlib import Path
import tasks.onnx_build as onnx_build

mode, source, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
seen = []
original = onnx_build._fp32_on_disk

@contextlib.contextmanager
def spy(base, scratch):
    with original(base, scratch):
        yield
        files = sorted(scratch.iterdir()) if scratch.exists() else []
        seen.append({
            "patched": base is not None,
            "scratch": str(scratch),
            "files": [p.name for p in files],
            "bytes": sum(p.stat().st_size for p in files),
        })

if mode == "in-memory":
    onnx_build._fp32_on_disk = lambda base, scratch: contextlib.nullcontext()
else:
    onnx_build._fp32_on_disk = spy
onnx_build.build_onnx_int4(source, out)
print(json.dumps(seen))
"""


def _digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _build(mode: str, source: Path, out: Path) -> list[dict[str, object]]:
    result = subprocess.run(
        [sys.executable, "-c", _BUILD, mode, str(source), str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fp32_intermediate_on_disk_builds_the_same_files(
    tiny_phi3: TinyPhi3Repos, tmp_path: Path
) -> None:
    on_disk = _build("on-disk", tiny_phi3.pytorch_dir, tmp_path / "on-disk")
    _build("in-memory", tiny_phi3.pytorch_dir, tmp_path / "in-memory")

    # The intermediate really went to disk: one fp32 file, in the build's staging folder next
    # to the output, holding at least the fp32 matrices (4 bytes a weight).
    [used] = on_disk
    assert used["patched"] is True
    assert used["files"] == ["fp32-intermediate.onnx.data"]
    layer = 4 * TINY.hidden_size * (4 * TINY.hidden_size + 3 * TINY.intermediate_size)
    assert int(used["bytes"]) >= TINY.num_hidden_layers * layer  # type: ignore[call-overload]
    scratch = Path(str(used["scratch"]))
    assert scratch.parent.parent == tmp_path
    assert scratch.parent.name.startswith(".on-disk.building-")
    # ... and was removed with the staging folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in-memory", "on-disk"]

    first, second = _digests(tmp_path / "on-disk"), _digests(tmp_path / "in-memory")
    assert {"model.onnx", "model.onnx.data", "genai_config.json"} <= set(first)
    assert first == second


def test_build_is_stamped_with_the_wheels_commit_not_the_checkouts(
    tiny_phi3: TinyPhi3Repos,
) -> None:
    import onnx
    import onnxruntime_genai as og

    # The builder's own lookup runs `git rev-parse HEAD` above its source file, which inside
    # this checkout's .venv is the project's commit: every commit changed the built bytes.
    onnx_file = next(tiny_phi3.onnx_model_dir.glob("*.onnx"))
    stamped = onnx.load(str(onnx_file), load_external_data=False).producer_version
    assert stamped == f"{og.__version__}+{og.__commit__[:7]}"


def test_weights_written_tensor_by_tensor_load_and_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime_genai as og
    import torch
    from transformers import Phi3ForCausalLM

    from offline.tiny_phi3 import build as tiny_build

    # The path MINI takes (it is over the threshold), on the tiny recipe.
    assert MINI.num_parameters > tiny_build.STREAM_ABOVE_PARAMETERS > TINY.num_parameters
    monkeypatch.setattr(tiny_build, "STREAM_ABOVE_PARAMETERS", 0)
    repos = tiny_build.build_tiny_phi3(tmp_path / "root", TINY)

    index = json.loads((repos.pytorch_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    model = Phi3ForCausalLM.from_pretrained(repos.pytorch_dir)
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert sum(t.numel() for t in state.values()) == TINY.num_parameters
    assert json.loads((repos.pytorch_dir / "config.json").read_text())["dtype"] == "bfloat16"
    norm = state["model.norm.weight"]
    assert torch.equal(norm, torch.ones_like(norm))
    embed = state["model.embed_tokens.weight"].float()
    assert abs(float(embed.std()) - 0.02) < 0.002  # Phi-3's initializer_range

    # The ONNX build reads them and onnxruntime-genai generates with it.
    og_model = og.Model(str(repos.onnx_model_dir))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=8, do_sample=False)
    generator = og.Generator(og_model, params)
    generator.append_tokens([[1, 2, 3]])
    generator.generate_next_token()
    assert len(generator.get_next_tokens()) == 1
