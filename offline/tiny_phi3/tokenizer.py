"""The tiny Phi-3's tokenizer: a byte-level BPE carrying Phi-3's special tokens and chat template.

The tokenizer is trained on a fixed English corpus, so equal vocabulary sizes give identical
files. ``tokenizers`` and ``transformers`` are imported only when a tokenizer is built.
"""

from __future__ import annotations

from pathlib import Path

from offline.tiny_phi3.files import write_json

__all__ = [
    "ADDED_SPECIAL_TOKENS",
    "LEADING_SPECIAL_TOKENS",
    "MIN_TOKENIZER_VOCAB",
    "PHI3_CHAT_TEMPLATE",
    "STOP_TOKENS",
    "save_tokenizer",
]

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
LEADING_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
ADDED_SPECIAL_TOKENS = (
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
STOP_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|end|>")
# Byte-level BPE starts from 256 byte symbols plus the three leading special tokens.
MIN_TOKENIZER_VOCAB = 256 + len(LEADING_SPECIAL_TOKENS) + 1

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


def save_tokenizer(
    pytorch_dir: Path, *, vocab_size: int, max_vocab_size: int, model_max_length: int
) -> dict[str, int]:
    """Train the byte-level BPE tokenizer, save it like Phi-3's, and return special ids.

    Args:
        pytorch_dir: The PyTorch repo folder to save ``tokenizer.json``,
            ``tokenizer_config.json`` and ``special_tokens_map.json`` into.
        vocab_size: Size of the trained vocabulary, the leading special tokens included.
        max_vocab_size: The model's embedding rows; the tokenizer must not outgrow them.
        model_max_length: The context length written to ``tokenizer_config.json``.

    Returns:
        The id of every special token, by token.
    """
    # Imported here: building is rare, importing the package must stay light.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # Byte-level BPE: onnxruntime-genai's tokenizer handles BPE (not word-level) models.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_special(token) for token in LEADING_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # BPE training is deterministic for a fixed corpus (checked across processes).
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    # Phi-3 strips the whitespace after its chat markers (rstrip), not after <|endoftext|>.
    tokenizer.add_special_tokens(
        [_special(token, rstrip=token != "<|endoftext|>") for token in ADDED_SPECIAL_TOKENS]
    )
    ids = {token: tokenizer.token_to_id(token) for token in _all_special_tokens()}
    if tokenizer.get_vocab_size() > max_vocab_size:
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
    write_json(pytorch_dir / "tokenizer_config.json", _tokenizer_config(ids, model_max_length))
    write_json(pytorch_dir / "special_tokens_map.json", _special_tokens_map())
    return ids


def _special(content: str, *, rstrip: bool = False) -> object:
    from tokenizers import AddedToken

    return AddedToken(content, special=True, normalized=False, rstrip=rstrip)


def _all_special_tokens() -> tuple[str, ...]:
    return LEADING_SPECIAL_TOKENS + ADDED_SPECIAL_TOKENS


def _tokenizer_config(ids: dict[str, int], model_max_length: int) -> dict[str, object]:
    added_tokens_decoder = {
        str(ids[token]): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": token in ADDED_SPECIAL_TOKENS and token != "<|endoftext|>",
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
        "model_max_length": model_max_length,
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
