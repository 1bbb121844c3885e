"""What a tiny Phi-3 build is: its recipe, the presets, its cache key and its repo layout."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from offline.tiny_phi3.tokenizer import ADDED_SPECIAL_TOKENS, MIN_TOKENIZER_VOCAB
from phi3ops.errors import InvalidInputError
from phi3ops.sources import ONNX_CPU_INT4_SUBFOLDER, ONNX_REPO_ID, PYTORCH_REPO_ID
from tasks import onnx_build

__all__ = [
    "BENCH",
    "MINI",
    "ONNX_CPU_INT4_FILENAME",
    "PRESETS",
    "TINY",
    "TinyPhi3Recipe",
    "TinyPhi3Repos",
    "build_code_version",
    "library_versions",
]

#: The decoder file name the real ONNX repo uses in that subfolder.
ONNX_CPU_INT4_FILENAME = "phi3-mini-4k-instruct-cpu-int4-rtn-block-32-acc-level-4.onnx"

# Phi-3 pads its 32011-token vocabulary to 32064 embedding rows; pad ours likewise.
_VOCAB_PAD_MULTIPLE = 64


@dataclass(frozen=True)
class TinyPhi3Recipe:
    """Everything that determines a tiny Phi-3 build; equal recipes build identical bytes.

    Attributes:
        name: Preset name, shown in the model cards.
        seed: Seed of the random weights.
        tokenizer_vocab_size: Size of the trained byte-level BPE vocabulary, the leading
            ``<unk>``/``<s>``/``</s>`` included; the Phi-3 added tokens come after it.
        hidden_size: Model width; a multiple of 32 so the int4 block size divides it.
        intermediate_size: MLP width; a multiple of 32 as well.
        num_hidden_layers: Decoder layers.
        num_attention_heads: Attention heads; must divide ``hidden_size`` into an even size.
        num_key_value_heads: Key/value heads (Phi-3 mini uses as many as attention heads).
        max_position_embeddings: Context length; 4096 as in Phi-3-mini-4k.
        dtype: Dtype of the saved safetensors weights (Phi-3 ships bfloat16).
        min_vocab_rows: Embedding (and LM head) rows at least this many, so a preset can have
            Phi-3-mini's 32064 with the small trained tokenizer; 0: the tokenizer's size padded
            like Phi-3 (:attr:`model_vocab_size`).
    """

    name: str = "tiny"
    seed: int = 0
    tokenizer_vocab_size: int = 1000
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 4096
    dtype: str = "bfloat16"
    min_vocab_rows: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.tokenizer_vocab_size < MIN_TOKENIZER_VOCAB:
            problems.append(f"tokenizer_vocab_size must be at least {MIN_TOKENIZER_VOCAB}")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) <= 0 or getattr(self, name) % 32:
                problems.append(f"{name} must be a positive multiple of 32 (int4 block size)")
        if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
            problems.append("num_attention_heads must divide hidden_size")
        elif (self.hidden_size // self.num_attention_heads) % 2:
            problems.append("hidden_size / num_attention_heads must be even (rotary embedding)")
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_key_value_heads must divide num_attention_heads")
        if self.num_hidden_layers <= 0 or self.max_position_embeddings <= 0:
            problems.append("num_hidden_layers and max_position_embeddings must be positive")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            problems.append("dtype must be bfloat16, float16 or float32")
        if self.min_vocab_rows < 0:
            problems.append("min_vocab_rows must be 0 or more")
        if problems:
            raise InvalidInputError(f"invalid TinyPhi3Recipe {self}: " + "; ".join(problems))

    @property
    def model_vocab_size(self) -> int:
        """Embedding rows: the trained vocabulary plus the added tokens, padded like Phi-3
        (or :attr:`min_vocab_rows` if more).
        """
        used = max(self.tokenizer_vocab_size + len(ADDED_SPECIAL_TOKENS), self.min_vocab_rows)
        return -(-used // _VOCAB_PAD_MULTIPLE) * _VOCAB_PAD_MULTIPLE

    @property
    def num_parameters(self) -> int:
        """Parameter count of the PyTorch model (untied embeddings and LM head, as Phi-3)."""
        head_dim = self.hidden_size // self.num_attention_heads
        qkv = self.hidden_size * (self.hidden_size + 2 * self.num_key_value_heads * head_dim)
        attention = qkv + self.hidden_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        layer = attention + mlp + 2 * self.hidden_size
        return (
            2 * self.model_vocab_size * self.hidden_size
            + self.num_hidden_layers * layer
            + self.hidden_size
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """fp32 KV cache bytes per token of one row (onnxruntime-genai's CPU cache):
        layers x KV heads x head size x 2 (K and V) x 4.
        """
        head_dim = self.hidden_size // self.num_attention_heads
        return self.num_hidden_layers * self.num_key_value_heads * head_dim * 2 * 4

    @property
    def weight_bytes(self) -> int:
        """Bytes of the saved safetensors weights."""
        return self.num_parameters * (4 if self.dtype == "float32" else 2)

    def cache_key(self) -> str:
        """Short sha256 of the recipe, the build code and the versions of the building libraries.

        The library versions are part of the key because the builder's output (ONNX graph,
        genai_config.json, tokenizer files) changes with them.
        """
        payload = {
            "recipe": asdict(self),
            "build_code": build_code_version(),
            "libraries": library_versions(),
        }
        blob = json.dumps(payload, sort_keys=True).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]


def build_code_version() -> str:
    """sha256 of the code that builds the repos (this package and the ONNX build task).

    Part of the cache key, so editing the build can never leave a stale cached model behind.
    """
    package_files = Path(__file__).parent.glob("*.py")
    digest = hashlib.sha256()
    for path in sorted({*package_files, Path(onnx_build.__file__)}):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose output the build depends on.

    Returns:
        Distribution name -> version, ``"missing"`` for one not installed.
    """
    versions = {}
    for dist in ("onnxruntime-genai", "tokenizers", "torch", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "missing"
    return versions


#: Seconds to build: for tests and the demo.
TINY = TinyPhi3Recipe()
#: About 200M parameters: for benchmarks (hundreds of MB on disk, about a minute to build).
BENCH = TinyPhi3Recipe(
    name="bench",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=16,
)
#: Phi-3-mini's exact shape (3.8B parameters, 7.6 GB in bf16, about 2.2 GB in int4): for
#: `make bench-mini`. Its weights are written tensor by tensor and its int4 build keeps the
#: fp32 intermediate on disk, so it builds on a 24 GB machine (minutes).
MINI = TinyPhi3Recipe(
    name="mini",
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    min_vocab_rows=32064,
)
PRESETS: dict[str, TinyPhi3Recipe] = {"tiny": TINY, "bench": BENCH, "mini": MINI}


@dataclass(frozen=True)
class TinyPhi3Repos:
    """Where a built tiny Phi-3 lives.

    Attributes:
        root: Folder holding each repository at ``root / <repo id>``.
        pytorch_dir: The :data:`PYTORCH_REPO_ID` repository.
        onnx_dir: The :data:`ONNX_REPO_ID` repository (its root).
        onnx_model_dir: The int4 CPU model inside it (:data:`ONNX_CPU_INT4_SUBFOLDER`),
            the folder ``onnxruntime_genai.Model`` loads.
        recipe_hash: :meth:`TinyPhi3Recipe.cache_key` of the recipe built.
        recipe: The recipe built.
    """

    root: Path
    pytorch_dir: Path
    onnx_dir: Path
    onnx_model_dir: Path
    recipe_hash: str
    recipe: TinyPhi3Recipe = field(compare=False)

    @classmethod
    def at(cls, root: Path, recipe: TinyPhi3Recipe) -> TinyPhi3Repos:
        """Describe the layout under ``root`` (whether or not it is built)."""
        onnx_dir = root / ONNX_REPO_ID
        return cls(
            root=root,
            pytorch_dir=root / PYTORCH_REPO_ID,
            onnx_dir=onnx_dir,
            onnx_model_dir=onnx_dir / ONNX_CPU_INT4_SUBFOLDER,
            recipe_hash=recipe.cache_key(),
            recipe=recipe,
        )
