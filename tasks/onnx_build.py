"""Build an ONNX int4 model from Hugging Face PyTorch Phi-3 weights.

The work is done by ``onnxruntime_genai.models.builder``, which reads a local Hugging Face
folder (config, safetensors, tokenizer) with no network access and writes an ONNX model,
its external weights, ``genai_config.json`` and the tokenizer files onnxruntime-genai loads.

The builder writes into its output folder as it goes, so it runs in a temporary sibling
folder that is renamed onto ``output_dir`` only once the build is complete: a reader never
sees a half-written model at ``output_dir``.

A build says which of its four steps it is in, at INFO through this module's logger (so in the
terminal and in the Prefect run's logs): checking the checkpoint, reading its config and
tokenizer, converting and quantizing to int4 (the long one: minutes for Phi-3-mini), checking
the build and moving it into place.

Memory: the builder hands the int4 quantizer its whole graph as one in-memory ONNX proto with
every weight in fp32 (``onnx_ir.to_proto``), while the bf16 weights are still held: at
Phi-3-mini's size 14.5 GB on top of 7.6 GB, more than a 24 GB machine has. `_fp32_on_disk`
makes that intermediate model an external-data file in the build's scratch folder instead (the
weights written one at a time, then memory-mapped one MatMul at a time by the quantizer), and
the bf16 tensors are released once written: at Phi-3-mini's size the build peaks at 10.5 GB
(while the intermediate is written) and takes under 2 minutes of its own on 2 cores, where the
in-memory intermediate passed 15 GB and was still rising. The files built are the same bytes.
`_stamp_wheel_commit` keeps those bytes the same from one commit of this project to the next.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from phi3ops.errors import InvalidInputError, OnnxBuildError

__all__ = [
    "DEFAULT_ONNX_FILENAME",
    "build_onnx_int4",
    "build_onnx_int4_task",
    "find_onnx_build",
]

logger = logging.getLogger(__name__)

#: The builder's own default name for the decoder model file.
DEFAULT_ONNX_FILENAME = "model.onnx"
#: How many steps a build announces (`_step`).
BUILD_STEPS = 4

# What onnxruntime-genai 0.18's builder accepts for int4 (see its --execution_provider and
# block_size / accuracy_level help); checked here so a typo fails before a long build.
_EXECUTION_PROVIDERS = frozenset({"cpu", "cuda", "dml", "webgpu", "NvTensorRtRtx"})
_BLOCK_SIZES = frozenset({16, 32, 64, 128, 256})
_ACCURACY_LEVELS = frozenset({0, 1, 2, 3, 4})
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
#: Name of the fp32 intermediate model's weights in the build's scratch folder.
FP32_INTERMEDIATE_DATA = "fp32-intermediate.onnx.data"
#: Initializers at least this large go to the on-disk intermediate; smaller ones (norms,
#: shapes, constants) stay in the proto, where the quantizer's other readers expect them.
_ON_DISK_MIN_BYTES = 1024


def find_onnx_build(model_dir: Path) -> Path | None:
    """Return the decoder ``.onnx`` file of a complete onnxruntime-genai build, if any.

    A build is complete when ``genai_config.json`` parses and the decoder file it names
    exists next to it (the builder writes ``genai_config.json`` after the model).

    Args:
        model_dir: Folder that may hold an onnxruntime-genai model.

    Returns:
        Path of the decoder ONNX file, or None when the folder holds no complete build.
    """
    config_path = Path(model_dir) / "genai_config.json"
    try:
        genai_config = json.loads(config_path.read_text(encoding="utf-8"))
        filename = genai_config["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(filename, str) or not filename:
        return None
    onnx_path = Path(model_dir) / filename
    return onnx_path if onnx_path.is_file() else None


def build_onnx_int4(
    pytorch_dir: Path,
    output_dir: Path,
    *,
    execution_provider: str = "cpu",
    block_size: int = 32,
    accuracy_level: int = 4,
    cache_dir: Path | None = None,
    filename: str = DEFAULT_ONNX_FILENAME,
) -> Path:
    """Convert a Hugging Face PyTorch Phi-3 folder into an ONNX int4 model folder.

    Idempotent: when ``output_dir`` already holds a complete build it is returned as is.

    Args:
        pytorch_dir: Local Hugging Face folder with ``config.json`` (``model_type`` phi3),
            safetensors weights and a tokenizer, e.g. a snapshot of
            ``microsoft/Phi-3-mini-4k-instruct``.
        output_dir: Folder to create with the ONNX model, its ``.onnx.data`` weights,
            ``genai_config.json`` and tokenizer files. Its parent must be writable.
        execution_provider: onnxruntime execution provider the model is built for.
        block_size: int4 quantization block size (MatMulNBits ``block_size``).
        accuracy_level: MatMulNBits minimum accuracy level (4 = int8 compute, CPU default).
        cache_dir: Scratch folder for the builder's temporary files; defaults to a folder
            inside the temporary build folder, removed afterwards.
        filename: Name of the decoder ONNX file (the weights go to ``<filename>.data``).

    Returns:
        ``output_dir``, holding a complete build.

    Raises:
        InvalidInputError: ``pytorch_dir`` is not a Phi-3 safetensors folder, an option is
            out of range, or ``output_dir`` is a non-empty folder without a complete build.
        OnnxBuildError: The builder is missing or failed; nothing is left at ``output_dir``.
    """
    pytorch_dir = Path(pytorch_dir)
    output_dir = Path(output_dir)
    started = time.monotonic()
    _step(1, f"checking the Phi-3 checkpoint {pytorch_dir}")
    _check_options(
        execution_provider=execution_provider,
        block_size=block_size,
        accuracy_level=accuracy_level,
        filename=filename,
    )
    check_pytorch_phi3_dir(pytorch_dir)

    if find_onnx_build(output_dir) is not None:
        logger.info("ONNX build: %s already holds a complete build; reusing it", output_dir)
        return output_dir
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise InvalidInputError(
            f"{output_dir} exists but holds no complete ONNX build (no genai_config.json or no "
            "model file it names). Delete it, or pass another output_dir, and build again."
        )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling on the same filesystem, so the final rename is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.building-", dir=output_dir.parent))
    try:
        model_dir = staging / "model"
        _run_builder(
            pytorch_dir,
            model_dir,
            execution_provider=execution_provider,
            block_size=block_size,
            accuracy_level=accuracy_level,
            cache_dir=cache_dir if cache_dir is not None else staging / "cache",
            scratch_dir=staging / "fp32-intermediate",
            filename=filename,
        )
        _step(4, f"checking the build and moving it into {output_dir}")
        built = find_onnx_build(model_dir)
        # A name mismatch means the builder ignored an option: fail rather than mislead.
        if built is None or built.name != filename:
            raise OnnxBuildError(
                f"the onnxruntime-genai builder returned without writing genai_config.json and "
                f"{filename} for {pytorch_dir}. Check its output above; the installed "
                "onnxruntime-genai may not support this model or these options."
            )
        try:
            # os.replace onto a missing or empty folder is atomic on POSIX.
            os.replace(model_dir, output_dir)
        except OSError as exc:
            # Someone else finished the same build first: theirs is as good as ours.
            if find_onnx_build(output_dir) is not None:
                return output_dir
            raise OnnxBuildError(
                f"could not move the finished ONNX build into {output_dir}: {exc}. "
                "Check that the folder is writable and not in use, then build again."
            ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("ONNX build: done in %.1f s -> %s", time.monotonic() - started, output_dir)
    return output_dir


def _step(number: int, what: str) -> None:
    """Logs ``ONNX build: step N/4 — <what>`` at INFO."""
    logger.info("ONNX build: step %d/%d — %s", number, BUILD_STEPS, what)


def check_pytorch_phi3_dir(pytorch_dir: Path) -> dict[str, object]:
    """Check that a folder is a Hugging Face PyTorch Phi-3 checkpoint the builder can read.

    Args:
        pytorch_dir: The folder to check.

    Returns:
        The parsed ``config.json``.

    Raises:
        InvalidInputError: What is missing or wrong, and how to fix it.
    """
    pytorch_dir = Path(pytorch_dir)
    if not pytorch_dir.is_dir():
        raise InvalidInputError(
            f"{pytorch_dir} is not a folder. Pass the local folder of a Hugging Face Phi-3 "
            "checkpoint (e.g. a snapshot of microsoft/Phi-3-mini-4k-instruct)."
        )
    config_path = pytorch_dir / "config.json"
    if not config_path.is_file():
        raise InvalidInputError(
            f"{pytorch_dir} has no config.json, so it is not a Hugging Face model folder. "
            "Download the full repository snapshot (config, tokenizer and safetensors files)."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"{config_path} is not valid JSON ({exc}). Download the file again."
        ) from exc
    if not isinstance(config, dict) or config.get("model_type") != "phi3":
        found = config.get("model_type") if isinstance(config, dict) else None
        raise InvalidInputError(
            f"{config_path} has model_type {found!r}, not 'phi3'. Pass a Phi-3 checkpoint "
            "such as microsoft/Phi-3-mini-4k-instruct."
        )
    if not any(pytorch_dir.glob("*.safetensors")):
        raise InvalidInputError(
            f"{pytorch_dir} has no *.safetensors weights. Download the safetensors files of the "
            "repository (older .bin checkpoints are not supported)."
        )
    index_path = pytorch_dir / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInputError(
                f"{index_path} is not a valid safetensors index ({exc}). Download it again."
            ) from exc
        missing = [shard for shard in shards if not (pytorch_dir / shard).is_file()]
        if missing:
            raise InvalidInputError(
                f"{pytorch_dir} lacks the weight shards {missing} named in "
                "model.safetensors.index.json. Download every shard of the repository."
            )
    if not any((pytorch_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise InvalidInputError(
            f"{pytorch_dir} has no tokenizer (tokenizer.json or tokenizer.model); the ONNX "
            "build copies it for onnxruntime-genai. Download the tokenizer files too."
        )
    return config


def _check_options(
    *, execution_provider: str, block_size: int, accuracy_level: int, filename: str
) -> None:
    if execution_provider not in _EXECUTION_PROVIDERS:
        raise InvalidInputError(
            f"execution_provider {execution_provider!r} is not one the builder knows; "
            f"use one of {sorted(_EXECUTION_PROVIDERS)}."
        )
    if block_size not in _BLOCK_SIZES:
        raise InvalidInputError(
            f"block_size {block_size!r} is not supported; use one of {sorted(_BLOCK_SIZES)}."
        )
    if accuracy_level not in _ACCURACY_LEVELS:
        raise InvalidInputError(
            f"accuracy_level {accuracy_level!r} is not supported; use one of "
            f"{sorted(_ACCURACY_LEVELS)} (4 = int8 compute, the CPU default)."
        )
    if not filename.endswith(".onnx") or Path(filename).name != filename:
        raise InvalidInputError(
            f"filename {filename!r} must be a bare file name ending in .onnx, e.g. "
            f"{DEFAULT_ONNX_FILENAME!r}."
        )


def _run_builder(
    pytorch_dir: Path,
    model_dir: Path,
    *,
    execution_provider: str,
    block_size: int,
    accuracy_level: int,
    cache_dir: Path,
    scratch_dir: Path,
    filename: str,
) -> None:
    """Run onnxruntime-genai's builder, its fp32 intermediate model on disk in ``scratch_dir``
    (`_fp32_on_disk`); any failure becomes an OnnxBuildError.
    """
    try:
        # Heavy (torch, transformers) and it appends its own folder to sys.path: import late.
        from onnxruntime_genai.models.builder import create_model, parse_extra_options
    except ImportError as exc:
        raise OnnxBuildError(
            f"the onnxruntime-genai model builder cannot be imported ({exc}). Install "
            "onnxruntime-genai==0.18.0 with torch and onnx_ir (they are phi3ops dependencies)."
        ) from exc

    # 0.18 reads `block_size` / `accuracy_level`; the `int4_`-prefixed names its help calls
    # deprecated aliases are silently ignored. hf_token=false: never look for a hub token.
    extra_options = [
        f"block_size={block_size}",
        f"accuracy_level={accuracy_level}",
        f"filename={filename}",
        "hf_token=false",
    ]
    try:
        base = _builder_base_module(create_model)
        _step(2, f"reading the config and tokenizer of {pytorch_dir}")
        # parse_extra_options also loads the config and tokenizer that create_model needs.
        options = parse_extra_options(
            None,
            str(pytorch_dir),
            str(model_dir),
            "int4",
            execution_provider,
            str(cache_dir),
            extra_options,
        )
        _step(
            3,
            f"converting to ONNX and quantizing to int4 ({execution_provider}, "
            f"block_size={block_size}, accuracy_level={accuracy_level}); the long step",
        )
        with _stamp_wheel_commit(base), _fp32_on_disk(base, scratch_dir):
            create_model(
                None,
                str(pytorch_dir),
                str(model_dir),
                "int4",
                execution_provider,
                str(cache_dir),
                **options,
            )
    except Exception as exc:
        raise OnnxBuildError(
            f"the onnxruntime-genai builder failed to convert {pytorch_dir} to int4 "
            f"({execution_provider}, block_size={block_size}, accuracy_level={accuracy_level}): "
            f"{type(exc).__name__}: {exc}. Check that the folder is a complete, uncorrupted "
            "Phi-3 checkpoint."
        ) from exc


def _builder_base_module(create_model: Callable[..., Any]) -> types.ModuleType | None:
    """The builder's ``builders.base`` module (imported under that name: the builder puts its
    own folder on ``sys.path``), whose ``Model.to_nbits`` makes the fp32 intermediate proto.

    None when ``create_model`` is not the installed builder's (a stand-in with no source
    file): there is no intermediate model to move to disk then.
    """
    source = getattr(sys.modules.get(getattr(create_model, "__module__", "")), "__file__", None)
    if source is None or "onnxruntime_genai" not in Path(source).parts:
        return None
    for name, module in list(sys.modules.items()):
        model_class = getattr(module, "Model", None)
        if name.endswith("builders.base") and hasattr(model_class, "to_nbits"):
            if not callable(getattr(getattr(module, "ir", None), "to_proto", None)):
                break
            return module
    raise OnnxBuildError(
        "the installed onnxruntime-genai builder has no builders.base module with Model.to_nbits "
        "and onnx_ir.to_proto, which phi3ops patches to keep the build's memory bounded. "
        "Install onnxruntime-genai==0.18.0 (the version phi3ops pins)."
    )


@contextlib.contextmanager
def _stamp_wheel_commit(base: types.ModuleType | None) -> Iterator[None]:
    """While the builder runs, it stamps the model's ``producer_version`` with the installed
    wheel's commit (``onnxruntime_genai.__commit__``).

    Its own ``get_genai_commit`` runs ``git rev-parse HEAD`` five folders above its source
    file first: inside a virtual environment in a git checkout (``.venv`` here) that is the
    checkout's commit, so every commit of the project changed the bytes of the same build.
    """
    if base is None:
        yield
        return
    import onnxruntime_genai

    model_class = base.Model
    commit = getattr(onnxruntime_genai, "__commit__", None) or None
    saved = model_class.__dict__.get("get_genai_commit")
    model_class.get_genai_commit = classmethod(lambda cls: commit)
    try:
        yield
    finally:
        if saved is None:
            del model_class.get_genai_commit
        else:
            model_class.get_genai_commit = saved


class _OnnxIrWithProtoOnDisk(types.ModuleType):
    """``onnx_ir`` as the builder's base module sees it, but for ``to_proto`` (see
    `_fp32_on_disk`); every other name is the real module's.
    """

    def __init__(self, real: types.ModuleType, to_proto: Callable[[Any], Any]) -> None:
        super().__init__(real.__name__, real.__doc__)
        self._real = real
        self.to_proto = to_proto

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def _fp32_on_disk(base: types.ModuleType | None, scratch: Path) -> Iterator[None]:
    """While the builder runs, its ``ir.to_proto(model)`` writes the model's weights to
    ``scratch / FP32_INTERMEDIATE_DATA`` and returns a proto that refers to them there.

    The weights are written one by one (the builder's lazy fp32 casts of the bf16 tensors run
    then, one at a time) and the model keeps the on-disk tensors in their place, so the bf16
    tensors can be freed. The proto's external-data locations are absolute paths, which the
    int4 quantizer (``ir.from_proto(tensor).numpy()``, a memory map) reads wherever the
    process runs; the builder's final save reads the tensors it did not quantize from the same
    file. ``scratch`` must outlive the builder's save; the caller removes it.
    """
    if base is None:
        yield
        return
    import onnx_ir
    from onnx_ir import external_data

    real = base.ir

    def to_proto(model: Any) -> Any:
        if not isinstance(model, onnx_ir.Model):
            return onnx_ir.to_proto(model)
        scratch.mkdir(parents=True, exist_ok=True)
        data_path = scratch / FP32_INTERMEDIATE_DATA
        # A second call (a second quantizer pass) would overwrite tensors the first one refers
        # to: give each call its own file.
        n = 1
        while data_path.exists():
            n += 1
            data_path = scratch / f"{n}-{FP32_INTERMEDIATE_DATA}"
        external_data.unload_from_model(
            model, str(scratch), data_path.name, size_threshold_bytes=_ON_DISK_MIN_BYTES
        )
        proto = onnx_ir.to_proto(model)
        _absolute_external_locations(proto, scratch)
        return proto

    base.ir = _OnnxIrWithProtoOnDisk(real, to_proto)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        base.ir = real  # type: ignore[attr-defined]


def _absolute_external_locations(model_proto: Any, base_dir: Path) -> None:
    """Point every external-data initializer of ``model_proto`` (subgraphs too) at
    ``base_dir / location``, so readers find it whatever their working folder.
    """
    from onnx import TensorProto

    graphs = [model_proto.graph]
    while graphs:
        graph = graphs.pop()
        for tensor in graph.initializer:
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            for entry in tensor.external_data:
                if entry.key == "location" and not os.path.isabs(entry.value):
                    entry.value = str(base_dir / entry.value)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)


@task(name="build-onnx-int4", retries=0, cache_policy=NO_CACHE)
def build_onnx_int4_task(
    pytorch_dir: Path,
    output_dir: Path,
    *,
    execution_provider: str = "cpu",
    block_size: int = 32,
    accuracy_level: int = 4,
    cache_dir: Path | None = None,
    filename: str = DEFAULT_ONNX_FILENAME,
) -> Path:
    """Prefect task: build an ONNX int4 model folder (see :func:`build_onnx_int4`).

    No retries: a failed build fails the same way again. Caching is left to the function
    itself, which returns an existing complete build without rebuilding.

    Args:
        pytorch_dir: Local Hugging Face Phi-3 folder with safetensors weights.
        output_dir: Folder to create with the ONNX model.
        execution_provider: onnxruntime execution provider the model is built for.
        block_size: int4 quantization block size.
        accuracy_level: MatMulNBits minimum accuracy level.
        cache_dir: Scratch folder for the builder's temporary files.
        filename: Name of the decoder ONNX file.

    Returns:
        ``output_dir``, holding a complete build.
    """
    return build_onnx_int4(
        pytorch_dir,
        output_dir,
        execution_provider=execution_provider,
        block_size=block_size,
        accuracy_level=accuracy_level,
        cache_dir=cache_dir,
        filename=filename,
    )
