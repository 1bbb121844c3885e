"""A tiny random Phi-3, laid out like the real hub repositories, built offline.

Real Phi-3 weights cannot be downloaded on these machines, so tests, the demo and the
benchmarks use a small random ``Phi3ForCausalLM`` that this module builds deterministically
from a :class:`TinyPhi3Recipe`:

* ``<root>/microsoft/Phi-3-mini-4k-instruct/``: like the PyTorch repo: ``config.json``,
  ``generation_config.json``, two safetensors shards with ``model.safetensors.index.json``,
  a byte-level BPE tokenizer carrying the Phi-3 special tokens and chat template
  (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``), ``README.md``
  and ``LICENSE``.
* ``<root>/microsoft/Phi-3-mini-4k-instruct-onnx/``: like the ONNX repo: ``README.md``,
  ``LICENSE`` and the int4 CPU build under :data:`ONNX_CPU_INT4_SUBFOLDER` (made by
  :func:`tasks.onnx_build.build_onnx_int4`).

So ``<root>/<repo id>`` is each repository, ready for a local hub server to serve.

:func:`ensure_tiny_phi3` builds a recipe once into ``<cache_root>/<recipe hash>/`` and reuses
it afterwards. Nothing here touches disk at import time, and torch, transformers, tokenizers
and onnxruntime-genai are imported only when a build runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from phi3ops.errors import InvalidInputError
from phi3ops.sources import ONNX_CPU_INT4_SUBFOLDER, ONNX_REPO_ID, PYTORCH_REPO_ID

__all__ = [
    "BENCH",
    "ONNX_CPU_INT4_FILENAME",
    "ONNX_CPU_INT4_SUBFOLDER",
    "ONNX_REPO_ID",
    "PHI3_CHAT_TEMPLATE",
    "PRESETS",
    "PYTORCH_REPO_ID",
    "TINY",
    "TinyPhi3Recipe",
    "TinyPhi3Repos",
    "build_code_version",
    "build_tiny_phi3",
    "ensure_tiny_phi3",
    "main",
]

#: The decoder file name the real ONNX repo uses in that subfolder.
ONNX_CPU_INT4_FILENAME = "phi3-mini-4k-instruct-cpu-int4-rtn-block-32-acc-level-4.onnx"


#: The chat template of microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json, verbatim.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-3's special tokens, in the real vocabulary's order: the first three open the vocabulary
# (ids 0, 1, 2 as in Phi-3), the rest follow the trained BPE vocabulary (32000.. in Phi-3).
_LEADING_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_ADDED_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
)
# Phi-3's generation_config.json stops on <|endoftext|>, <|assistant|> and <|end|>.
_STOP_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|end|>")
# Phi-3 pads its 32011-token vocabulary to 32064 embedding rows; pad ours likewise.
_VOCAB_PAD_MULTIPLE = 64
_MANIFEST_NAME = "tiny_phi3.json"
# Byte-level BPE starts from 256 byte symbols plus the three leading special tokens.
_MIN_TOKENIZER_VOCAB = 256 + len(_LEADING_SPECIAL_TOKENS) + 1

# A fixed English corpus for the tokenizer. Changing it changes every build (and so the cache key).
_CORPUS = """\
The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden gate.
Small language models can answer questions, summarize documents and write short programs.
A model registry keeps every version of a model together with its metrics, tags and lineage.
Before a new version becomes the champion, it must pass the same evaluation as the current one.
Please write a short poem about the sea, the wind and the lighthouse on the rocky shore.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
How many days are there in a week? There are seven days in a week and twelve months in a year.
Explain why the sky is blue in one sentence: sunlight scatters off the molecules of the air.
The train leaves the station at nine in the morning and arrives in the city before noon.
Water boils at one hundred degrees Celsius at sea level and freezes at zero degrees.
She opened the window, breathed the cold morning air and listened to the birds singing.
Monitoring compares recent predictions with expectations and raises an alert when they drift.
The pipeline downloads the weights, converts them, registers the model and evaluates it.
Every file is pinned to a commit so that the same inputs always produce the same outputs.
Good documentation explains what a function does, what it returns and which errors it raises.
If the tests pass on a clean machine, the build is reproducible and the release can proceed.
Translate the following sentence into French: the library opens at eight o'clock tomorrow.
The recipe needs two cups of flour, three eggs, a pinch of salt and a spoon of sugar.
Mix the butter and the sugar, then add the eggs one at a time and stir until smooth.
Bake the bread in a hot oven for thirty minutes, until the crust is golden and crisp.
The children played football in the park until the sun went down behind the hills.
A good teacher asks questions that help students discover the answer by themselves.
The doctor said that regular exercise, good sleep and fresh vegetables keep people healthy.
Our team meets every Monday to review the plan, discuss problems and choose priorities.
The weather today is sunny with a light breeze; tomorrow it will rain in the afternoon.
Computers store numbers in binary, using only the digits zero and one to represent data.
An assistant should be helpful, honest and harmless, and it should admit what it does not know.
The user asked for a summary of the report, so the assistant listed the three main findings.
Latency is the time to the first token; throughput is the number of tokens per second.
When the server starts, it loads the model once and then answers many requests in parallel.
The old castle stood on the hill above the village, and its towers were covered with ivy.
Mountains, rivers, forests and deserts shape the climate and the life of every continent.
He read the letter twice, folded it carefully and put it back into the blue envelope.
Scientists measure temperature, pressure and humidity to understand how storms are formed.
The market sells apples, oranges, bananas, grapes, tomatoes, potatoes and fresh bread.
Music, painting and literature help people share feelings that are hard to put into words.
To reset your password, click the link in the email and follow the instructions on screen.
The museum is closed on Tuesdays, but it stays open late on Friday and Saturday evenings.
Quality gates reject a candidate whose accuracy falls or whose latency grows too much.
If an error occurs, the message should say what failed and how the user can fix it.
Rollback restores the previous champion quickly when the new version misbehaves in production.
The cat slept on the warm windowsill while the rain tapped gently against the glass.
Write a function that returns the sum of a list of numbers, and add a test for empty lists.
In the beginning the project was small, but it grew as more people contributed their ideas.
The ship sailed north for many weeks, through storms and calm seas, until it reached land.
Coffee, tea and hot chocolate are popular drinks on cold winter mornings in the mountains.
She planted tulips, roses and sunflowers in the garden behind the little yellow house.
The bridge connects the two parts of the town and carries thousands of cars every day.
Historians study letters, maps and old newspapers to learn how people lived long ago.
Thank you for your question. Here is a short answer, followed by a longer explanation.
Yes, I can help with that. First, open the settings; second, choose a language; third, save.
No, that is not correct: seven times eight is fifty six, and nine times nine is eighty one.
The library has books about history, science, art, travel, cooking and many other subjects.
Engineers test bridges, engines and software carefully before anyone is allowed to use them.
A journey of a thousand miles begins with a single step, as the old proverb reminds us.
"""


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

    def __post_init__(self) -> None:
        problems = []
        if self.tokenizer_vocab_size < _MIN_TOKENIZER_VOCAB:
            problems.append(f"tokenizer_vocab_size must be at least {_MIN_TOKENIZER_VOCAB}")
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
        if problems:
            raise InvalidInputError(f"invalid TinyPhi3Recipe {self}: " + "; ".join(problems))

    @property
    def model_vocab_size(self) -> int:
        """Embedding rows: the trained vocabulary plus the added tokens, padded like Phi-3."""
        used = self.tokenizer_vocab_size + len(_ADDED_SPECIAL_TOKENS)
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

    def cache_key(self) -> str:
        """Short sha256 of the recipe, the build code and the versions of the building libraries.

        The library versions are part of the key because the builder's output (ONNX graph,
        genai_config.json, tokenizer files) changes with them.
        """
        payload = {
            "recipe": asdict(self),
            "build_code": build_code_version(),
            "libraries": _library_versions(),
        }
        blob = json.dumps(payload, sort_keys=True).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]


def build_code_version() -> str:
    """sha256 of the code that builds the repos (this module and the ONNX build task).

    Part of the cache key, so editing the build can never leave a stale cached model behind.
    """
    import tasks.onnx_build

    digest = hashlib.sha256()
    for path in sorted({Path(__file__), Path(tasks.onnx_build.__file__)}):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


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
PRESETS: dict[str, TinyPhi3Recipe] = {"tiny": TINY, "bench": BENCH}


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


def ensure_tiny_phi3(cache_root: Path, recipe: TinyPhi3Recipe = TINY) -> TinyPhi3Repos:
    """Build the tiny Phi-3 repositories once into ``cache_root`` and return them.

    The build goes to ``cache_root/<recipe hash>/``; a later call with the same recipe (and
    library versions) returns that folder without building. Builds happen in a temporary
    folder renamed into place at the end, under a file lock, so concurrent or interrupted
    builds never leave a half-built cache behind.

    Args:
        cache_root: Folder for cached builds (created if missing).
        recipe: What to build; :data:`TINY` (default) or :data:`BENCH`.

    Returns:
        The paths of the built repositories.

    Raises:
        InvalidInputError: ``cache_root`` exists but is not a folder.
        OnnxBuildError: The ONNX build failed.
    """
    from filelock import FileLock

    cache_root = Path(cache_root)
    if cache_root.exists() and not cache_root.is_dir():
        raise InvalidInputError(
            f"cache_root {cache_root} is a file, not a folder. Pass a folder for the tiny Phi-3."
        )
    key = recipe.cache_key()
    repos = TinyPhi3Repos.at(cache_root / key, recipe)
    if _is_complete(repos.root):
        return repos

    cache_root.mkdir(parents=True, exist_ok=True)
    # The lock only saves duplicate work; the atomic rename alone keeps the cache consistent.
    with FileLock(str(cache_root / f".{key}.lock")):
        if _is_complete(repos.root):
            return repos
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.building-", dir=cache_root))
        try:
            build_tiny_phi3(staging / "root", recipe)
            if repos.root.exists():
                # Not complete (checked above under the lock): debris from an older layout.
                shutil.rmtree(repos.root)
            os.replace(staging / "root", repos.root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return repos


def build_tiny_phi3(root: Path, recipe: TinyPhi3Recipe = TINY) -> TinyPhi3Repos:
    """Build the tiny Phi-3 repositories into ``root`` (no caching, no atomicity).

    Prefer :func:`ensure_tiny_phi3`; this is its worker.

    Args:
        root: Empty or missing folder to build into.
        recipe: What to build.

    Returns:
        The paths of the built repositories.
    """
    repos = TinyPhi3Repos.at(Path(root), recipe)
    repos.pytorch_dir.mkdir(parents=True, exist_ok=True)
    token_ids = _save_tokenizer(repos.pytorch_dir, recipe)
    _save_model(repos.pytorch_dir, recipe, token_ids)
    _write_text(repos.pytorch_dir / "README.md", _pytorch_model_card(recipe, repos.recipe_hash))
    _write_text(repos.pytorch_dir / "LICENSE", _LICENSE)
    _save_onnx(repos, recipe)
    manifest = {
        "build_code": build_code_version(),
        "libraries": _library_versions(),
        "recipe": asdict(recipe),
        "recipe_hash": repos.recipe_hash,
        "repo_ids": [PYTORCH_REPO_ID, ONNX_REPO_ID],
        "onnx_cpu_int4_subfolder": ONNX_CPU_INT4_SUBFOLDER,
    }
    # transformers 5 writes safetensors shards owner-only (0600); hub downloads are readable
    # by all, and a local hub server or a container worker may run as another user.
    for path in repos.root.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
    # Written last: its presence marks a complete build.
    _write_json(repos.root / _MANIFEST_NAME, manifest)
    return repos


# --- building blocks -----------------------------------------------------------------------


def _save_tokenizer(pytorch_dir: Path, recipe: TinyPhi3Recipe) -> dict[str, int]:
    """Train the byte-level BPE tokenizer, save it like Phi-3's, and return special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # Byte-level BPE: onnxruntime-genai's tokenizer handles BPE (not word-level) models.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.tokenizer_vocab_size,
        special_tokens=[_special(token) for token in _LEADING_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # BPE training is deterministic for a fixed corpus (checked across processes).
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    # Phi-3 strips the whitespace after its chat markers (rstrip), not after <|endoftext|>.
    tokenizer.add_special_tokens(
        [_special(token, rstrip=token != "<|endoftext|>") for token in _ADDED_SPECIAL_TOKENS]
    )
    ids = {token: tokenizer.token_to_id(token) for token in _all_special_tokens()}
    if tokenizer.get_vocab_size() > recipe.model_vocab_size:
        raise AssertionError("tokenizer vocabulary outgrew the model's embedding rows")

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
    )
    fast.save_pretrained(str(pytorch_dir))
    # transformers 5 writes its own layout (chat_template.jinja, tokenizer_class
    # TokenizersBackend); rewrite the configs the way the Phi-3 repo ships them.
    (pytorch_dir / "chat_template.jinja").unlink(missing_ok=True)
    _write_json(pytorch_dir / "tokenizer_config.json", _tokenizer_config(ids, recipe))
    _write_json(pytorch_dir / "special_tokens_map.json", _special_tokens_map())
    return ids


def _special(content: str, *, rstrip: bool = False) -> object:
    from tokenizers import AddedToken

    return AddedToken(content, special=True, normalized=False, rstrip=rstrip)


def _all_special_tokens() -> tuple[str, ...]:
    return _LEADING_SPECIAL_TOKENS + _ADDED_SPECIAL_TOKENS


def _tokenizer_config(ids: dict[str, int], recipe: TinyPhi3Recipe) -> dict[str, object]:
    added_tokens_decoder = {
        str(ids[token]): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": token in _ADDED_SPECIAL_TOKENS and token != "<|endoftext|>",
            "single_word": False,
            "special": True,
        }
        for token in _all_special_tokens()
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": "<s>",
        "chat_template": PHI3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": recipe.max_position_embeddings,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        # Phi-3 says LlamaTokenizer (sentencepiece); ours is a byte-level BPE tokenizer.json.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def _special_tokens_map() -> dict[str, object]:
    def entry(content: str) -> dict[str, object]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    return {
        "bos_token": entry("<s>"),
        "eos_token": entry("<|endoftext|>"),
        "pad_token": entry("<|endoftext|>"),
        "unk_token": entry("<unk>"),
    }


def _save_model(pytorch_dir: Path, recipe: TinyPhi3Recipe, ids: dict[str, int]) -> None:
    """Save random Phi-3 weights (two safetensors shards) and the generation config."""
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=recipe.model_vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        # Equal to max_position_embeddings: the builder then picks Phi3MiniModel (no LongRoPE).
        original_max_position_embeddings=recipe.max_position_embeddings,
        sliding_window=min(2047, recipe.max_position_embeddings - 1),
        bos_token_id=ids["<s>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
        architectures=["Phi3ForCausalLM"],
    )
    dtype = getattr(torch, recipe.dtype)
    # fork_rng: seed our weights without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = Phi3ForCausalLM(config)
    model = model.to(dtype)
    model.config.dtype = recipe.dtype
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"],
        eos_token_id=[ids[token] for token in _STOP_TOKENS],
        pad_token_id=ids["<|endoftext|>"],
    )
    total_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    # Two shards plus an index, like the real repo: each shard a bit over half the weights.
    model.save_pretrained(str(pytorch_dir), max_shard_size=total_bytes * 6 // 10)


def _save_onnx(repos: TinyPhi3Repos, recipe: TinyPhi3Recipe) -> None:
    """Build the int4 CPU model and lay the ONNX repo out like the real one."""
    from tasks.onnx_build import build_onnx_int4

    repos.onnx_model_dir.parent.mkdir(parents=True, exist_ok=True)
    build_onnx_int4(
        repos.pytorch_dir,
        repos.onnx_model_dir,
        execution_provider="cpu",
        block_size=32,
        accuracy_level=4,
        filename=ONNX_CPU_INT4_FILENAME,
    )
    # The builder re-saves the tokenizer in transformers 5's layout; the real ONNX repo
    # ships the same tokenizer files as the PyTorch repo, plus its config.json.
    (repos.onnx_model_dir / "chat_template.jinja").unlink(missing_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(repos.pytorch_dir / name, repos.onnx_model_dir / name)
    shutil.copyfile(repos.pytorch_dir / "config.json", repos.onnx_model_dir / "config.json")
    _write_text(repos.onnx_dir / "README.md", _onnx_model_card(recipe, repos.recipe_hash))
    _write_text(repos.onnx_dir / "LICENSE", _LICENSE)


def _library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("onnxruntime-genai", "tokenizers", "torch", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "missing"
    return versions


def _is_complete(root: Path) -> bool:
    return (root / _MANIFEST_NAME).is_file()


def _write_json(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# --- model cards and license (deterministic: no dates, no paths) ----------------------------


def _card_front_matter() -> str:
    return (
        "---\n"
        "license: mit\n"
        "language:\n- en\n"
        "pipeline_tag: text-generation\n"
        "tags:\n- nlp\n- phi3\n- tiny-random\n- phi3ops-offline\n"
        "---\n\n"
    )


def _recipe_table(recipe: TinyPhi3Recipe, recipe_hash: str) -> str:
    rows = "".join(f"| {key} | {value} |\n" for key, value in asdict(recipe).items())
    return (
        "| recipe field | value |\n|---|---|\n"
        + rows
        + f"| parameters | {recipe.num_parameters:,} |\n"
        + f"| recipe hash | {recipe_hash} |\n"
    )


def _pytorch_model_card(recipe: TinyPhi3Recipe, recipe_hash: str) -> str:
    return (
        _card_front_matter()
        + f"# Tiny random Phi-3 ({recipe.name}), laid out like {PYTORCH_REPO_ID}\n\n"
        "A randomly initialised `Phi3ForCausalLM` built offline by "
        "`phi3ops.offline.tiny_phi3` for tests, demos and benchmarks. It has Phi-3's "
        "architecture, special tokens and chat template, but it knows nothing: its output is "
        "noise. It is not Microsoft's model.\n\n"
        "Chat format:\n\n```\n<|system|>\nYou are helpful.<|end|>\n<|user|>\nHello<|end|>\n"
        "<|assistant|>\n```\n\n" + _recipe_table(recipe, recipe_hash)
    )


def _onnx_model_card(recipe: TinyPhi3Recipe, recipe_hash: str) -> str:
    return (
        _card_front_matter()
        + f"# Tiny random Phi-3 ({recipe.name}) for ONNX Runtime GenAI, laid out like "
        f"{ONNX_REPO_ID}\n\n"
        f"`{ONNX_CPU_INT4_SUBFOLDER}/` holds the int4 CPU build (RTN, block size 32, accuracy "
        "level 4) of the tiny random PyTorch model, made with "
        "`onnxruntime_genai.models.builder`. Load it with `onnxruntime_genai.Model`.\n\n"
        + _recipe_table(recipe, recipe_hash)
    )


_LICENSE = """\
MIT License

Copyright (c) phi3ops contributors. Tiny random test model; no weights of Microsoft's Phi-3.

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


# --- manual use ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or reuse) a tiny Phi-3 under OUT_DIR and print where its repositories are.

    Args:
        argv: Command-line arguments without the program name; ``sys.argv[1:]`` if None.

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(
        prog="python -m phi3ops.offline.tiny_phi3",
        description="Build a tiny random Phi-3 laid out like the Hugging Face repositories.",
    )
    parser.add_argument("out_dir", type=Path, help="cache folder; the build goes to a subfolder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    args = parser.parse_args(argv)
    recipe = PRESETS[args.preset]
    repos = ensure_tiny_phi3(args.out_dir, recipe)
    print(
        json.dumps(
            {
                "recipe": args.preset,
                "parameters": recipe.num_parameters,
                "recipe_hash": repos.recipe_hash,
                "root": str(repos.root),
                PYTORCH_REPO_ID: str(repos.pytorch_dir),
                ONNX_REPO_ID: str(repos.onnx_dir),
                "onnx_model_dir": str(repos.onnx_model_dir),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
