"""The model folder is data, never code: which files and ``genai_config.json`` settings it may
hold, and the context a ``genai_config.json`` allows.

``OnnxChatModel.load_context`` refuses a folder holding anything but model files
(`MODEL_FILE_SUFFIXES`), a file whose first bytes are an executable (ELF, Mach-O, PE) or a
script (``#!``) whatever its name, a JSON file that is not valid JSON or repeats a key, or a
``genai_config.json`` that loads a library (``custom_ops_library``), names an execution provider
other than the CPU, or sets a session option off `ALLOWED_SESSION_OPTIONS`, before
onnxruntime-genai reads it. The fetch and package tasks run the same check
(`model_file_problems`) on the files they take in.

A repeated key is refused because parsers disagree on which one counts: Python's ``json`` keeps
the last, onnxruntime-genai applies the first, so a config whose last ``session_options`` is clean
would pass a check that reads it with Python while the library loaded the first. Every JSON file
is parsed once, duplicates refused anywhere in it, and the settings checks run on that document.
"""

import json
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "ALLOWED_PROVIDERS",
    "ALLOWED_SESSION_OPTIONS",
    "GENAI_CONFIG",
    "MODEL_FILE_NAMES",
    "MODEL_FILE_SUFFIXES",
    "model_file_problems",
    "model_folder_problems",
    "usable_context",
]

# --- the model folder is data: what it may hold -------------------------------------------------
#
# phi3ops fetches, packages and loads a model folder as data, never as code. These checks run
# at all three points (the fetch and packaging tasks import them from here, since this package may
# import nothing of phi3ops), so a folder altered after it was fetched, or inside a logged model,
# is still refused before onnxruntime-genai reads it.

#: The onnxruntime-genai configuration, read at load time.
GENAI_CONFIG = "genai_config.json"
#: File types (ends of lower-case names) a Phi-3 model folder holds: the ONNX graph and its
#: external weights, safetensors weights, JSON configs and tokenizer files, the SentencePiece
#: tokenizer (``tokenizer.model``), chat templates (``.jinja``, rendered sandboxed by
#: transformers), and text (``merges.txt``, model cards, notices).
MODEL_FILE_SUFFIXES = (
    ".onnx",
    ".onnx.data",
    ".onnx_data",
    ".safetensors",
    ".json",
    ".model",
    ".jinja",
    ".txt",
    ".md",
)
#: Whole file names allowed besides those types (licence files without an extension).
MODEL_FILE_NAMES = ("LICENSE", "LICENCE", "NOTICE")
#: Execution providers a ``genai_config.json`` may name in ``provider_options``.
ALLOWED_PROVIDERS = ("cpu",)
#: ``session_options`` keys a ``genai_config.json`` may set: logging, threads, memory and
#: graph optimisation, and the options the onnxruntime-genai 0.18 builder writes. Everything
#: else is refused: ``custom_ops_library`` loads a shared library, ``enable_profiling`` and the
#: ``ep.context_*`` options write files, unknown keys may do either in a later release.
ALLOWED_SESSION_OPTIONS = (
    "log_id",
    "log_severity_level",
    "log_verbosity_level",
    "intra_op_num_threads",
    "inter_op_num_threads",
    "enable_cpu_mem_arena",
    "enable_mem_pattern",
    "graph_optimization_level",
    "disable_cpu_ep_fallback",
    "disable_quant_qdq",
    "enable_quant_qdq_cleanup",
    "use_env_allocators",
    "provider_options",
    "optimization.disable_specified_optimizers",
    "session.use_device_allocator_for_initializers",
)
# Keys that load code wherever they appear in a genai_config.json.
_CODE_KEYS = ("custom_ops_library",)
_CODE_SUFFIXES = (".so", ".dll", ".dylib", ".pyd", ".exe", ".py", ".sh", ".bat", ".ps1")
# What a file's first bytes say it is, when it is code: shared libraries and executables of every
# platform (PE is checked apart, see `_code_kind`) and scripts the kernel runs.
_CODE_MAGIC = (
    (b"\x7fELF", "an ELF shared library or executable"),
    (b"\xfe\xed\xfa\xce", "a Mach-O shared library or executable"),
    (b"\xfe\xed\xfa\xcf", "a Mach-O shared library or executable"),
    (b"\xce\xfa\xed\xfe", "a Mach-O shared library or executable"),
    (b"\xcf\xfa\xed\xfe", "a Mach-O shared library or executable"),
    (b"\xca\xfe\xba\xbe", "a Mach-O universal (fat) binary"),
    (b"#!", "a script (#!)"),
)
# A PE file (Windows DLL or executable) starts "MZ" and holds b"PE\0\0" at the offset stored at
# 0x3C; raw weights may start "MZ" by chance, so both are required.
_PE_OFFSET_AT = 0x3C


def model_file_problems(files: Mapping[str, str | None]) -> list[str]:
    """Why these files must not be loaded, one line per problem naming the file (and the key).

    Args:
        files: Each file's ``/``-separated path in the folder (or repository), mapped to where
            its bytes are on disk, or to None to check the name only. A file with bytes on disk
            is also checked by what it is: its first bytes (never the whole file) must not be an
            executable or script, and a ``.json`` file is parsed, duplicate keys refused, and
            for ``genai_config.json`` its settings checked.

    Returns:
        The problems, empty when every file is model data.
    """
    problems = []
    for path, location in sorted(files.items()):
        name = path.rsplit("/", 1)[-1]
        if name not in MODEL_FILE_NAMES and not name.lower().endswith(MODEL_FILE_SUFFIXES):
            if name.lower().endswith(_CODE_SUFFIXES) or ".so." in name.lower():
                problems.append(f"{path}: code (a shared library, executable or script)")
            else:
                problems.append(f"{path}: not a model file type")
        elif location is not None:
            problems.extend(_content_problems(path, name, location))
    return problems


def model_folder_problems(folder: str) -> list[str]:
    """`model_file_problems` of every file under ``folder``; links and special files count too.

    Args:
        folder: The model folder (or snapshot).

    Returns:
        The problems, each naming a path relative to ``folder``.
    """
    problems = []
    files: dict[str, str | None] = {}
    for directory, subdirectories, names in os.walk(folder):
        for name in sorted(subdirectories) + sorted(names):
            location = os.path.join(directory, name)
            path = os.path.relpath(location, folder).replace(os.sep, "/")
            if os.path.islink(location):
                problems.append(f"{path}: a symbolic link (a model folder holds plain files only)")
            elif name in names and not os.path.isfile(location):
                problems.append(f"{path}: not a plain file")
            elif name in names:
                files[path] = location
    return problems + model_file_problems(files)


def _content_problems(path: str, name: str, location: str) -> list[str]:
    try:
        kind = _code_kind(location)
    except OSError as exc:
        return [f"{path}: not readable ({exc})"]
    if kind is not None:
        return [
            f"{path}: code ({kind}, by its first bytes, whatever its name); a model folder holds "
            f"no executables: remove the file"
        ]
    if not name.lower().endswith(".json"):
        return []
    document, problems = _checked_json(location)
    if problems or name != GENAI_CONFIG:
        return [f"{path}: {problem}" for problem in problems]
    return [f"{path}: {problem}" for problem in _settings_problems(document, "")]


def _code_kind(location: str) -> str | None:
    """What code the file's first bytes say it is (None for data); reads at most 68 bytes."""
    with open(location, "rb") as handle:
        head = handle.read(_PE_OFFSET_AT + 4)
        for magic, kind in _CODE_MAGIC:
            if head.startswith(magic):
                return kind
        if head.startswith(b"MZ") and len(head) == _PE_OFFSET_AT + 4:
            (offset,) = struct.unpack_from("<I", head, _PE_OFFSET_AT)
            handle.seek(offset)
            if handle.read(4) == b"PE\0\0":
                return "a Windows (PE) DLL or executable"
    return None


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as parsed, every key kept in order (`_checked_json` turns it into a dict)."""


def _checked_json(location: str) -> tuple[Any, list[str]]:
    """The JSON document in the file, and why it may not be read: not valid JSON (UTF-8), or a
    key repeated in an object anywhere in it (each named by its key path).
    """
    try:
        with open(location, "rb") as handle:
            text = handle.read().decode("utf-8")
        parsed = json.loads(text, object_pairs_hook=_Pairs)
    except (OSError, ValueError, RecursionError) as exc:
        return None, [f"not readable JSON ({exc}); fix the file or fetch it again"]
    duplicates: list[str] = []
    try:
        document = _without_duplicates(parsed, "", duplicates)
    except RecursionError:
        return None, ["not readable JSON (nested too deep); fix the file or fetch it again"]
    return document, [
        f"key {key_path} appears more than once (parsers disagree on which one counts: "
        f"onnxruntime-genai reads the first, Python the last); keep one"
        for key_path in duplicates
    ]


def _without_duplicates(node: Any, where: str, duplicates: list[str]) -> Any:
    if isinstance(node, list) and not isinstance(node, _Pairs):
        return [
            _without_duplicates(item, f"{where}[{index}]", duplicates)
            for index, item in enumerate(node)
        ]
    if not isinstance(node, _Pairs):
        return node
    document: dict[str, Any] = {}
    for key, value in node:
        key_path = f"{where}.{key}" if where else key
        if key in document:
            if key_path not in duplicates:
                duplicates.append(key_path)
            continue  # the first one is the one checked: what onnxruntime-genai applies
        document[key] = _without_duplicates(value, key_path, duplicates)
    return document


def _settings_problems(node: Any, where: str) -> Iterator[str]:
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _settings_problems(item, f"{where}[{index}]")
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        key_path = f"{where}.{key}" if where else str(key)
        if str(key).lower() in _CODE_KEYS:
            yield f"{key_path} loads a shared library (remove the key)"
        elif key == "provider_options":
            yield from _provider_problems(value, key_path)
        elif str(key).endswith("filename") and not _inside_folder(value):
            yield f"{key_path}={value!r} is not a file inside the model folder"
        else:
            if key == "session_options" and isinstance(value, dict):
                for option in value:
                    if option not in ALLOWED_SESSION_OPTIONS and option not in _CODE_KEYS:
                        yield (
                            f"{key_path}.{option} is not an allowed session option (allowed: "
                            f"{', '.join(ALLOWED_SESSION_OPTIONS)})"
                        )
            yield from _settings_problems(value, key_path)


def _provider_problems(value: Any, key_path: str) -> Iterator[str]:
    if not isinstance(value, list):
        yield f"{key_path} must be a list of {{provider: options}} objects"
        return
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            yield f"{key_path}[{index}] must be a {{provider: options}} object"
            continue
        for provider in entry:
            if str(provider).lower() not in ALLOWED_PROVIDERS:
                yield (
                    f"{key_path}[{index}] names execution provider {provider!r}; allowed: "
                    f"{', '.join(ALLOWED_PROVIDERS)}"
                )


def _inside_folder(value: Any) -> bool:
    if not isinstance(value, str) or not value or "\\" in value or "\x00" in value:
        return False
    return not os.path.isabs(value) and ".." not in value.split("/")


def usable_context(genai_config: dict[str, Any]) -> int:
    """Tokens a sequence may hold (prompt plus answer) on onnxruntime-genai 0.18.

    ``context_length`` normally. But when the decoder declares a sliding window whose KV cache
    does not slide (what the 0.18 builder writes for Phi-3-mini-4k, whose config.json has
    ``sliding_window: 2047``), og caps the KV cache near the window: measured with window 2047
    and context 4096, a sequence of 2065 tokens fails inside GroupQueryAttention ("The output
    OrtValue provided for output 'present.0.key' ... has shape {1,4,2063,16}"). The window
    plus the current token is what such a model attends to anyway, so that is the limit here.
    """
    context_length = int(genai_config["context_length"])
    window = genai_config.get("decoder", {}).get("sliding_window") or {}
    if window.get("window_size") and not window.get("slide_key_value_cache"):
        return min(context_length, int(window["window_size"]) + 1)
    return context_length
