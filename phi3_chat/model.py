"""The pyfunc: ``OnnxChatModel``, Phi-3 chat on onnxruntime-genai.

Each input row is one request, in one of two shapes:

* chat, as in MLflow's ``llm/v1/chat``: ``messages`` (a list of ``{role, content}``) with
  optional ``temperature``, ``max_tokens``, ``top_p``, ``top_k``, ``stop``, ``n`` (only 1),
  ``stream`` (ignored by ``predict``), ``response_format`` (structured outputs:
  `phi3_chat.guidance`), ``tools`` / ``tool_choice`` / ``parallel_tool_calls``
  (`phi3_chat.tools`), ``seed`` and ``logprobs`` / ``top_logprobs`` (`phi3_chat.sampler`). The
  answer is a ``chat.completion`` dict (`phi3_chat.answers`).
* prompt, as in the original Phi-3 MLflow sample (``{"prompt": "..."}``), with the same
  optional generation fields. The answer is the generated string. A prompt that already holds
  the model's chat markers (that sample's callers wrote ``<|user|>...<|end|><|assistant|>``
  themselves) is used verbatim; any other prompt becomes a single user message
  (``model_config["prompt_format"]``: ``auto``, the default, or always ``chat`` / ``raw``).

How requests are checked is `phi3_chat.validate`'s business; how concurrent calls share
batches, `phi3_chat.batcher`'s; how one batch steps, `phi3_chat.steps`'; what the model folder
may hold, `phi3_chat.folder`'s.
"""

import json
import os
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnxruntime_genai as og
import pandas as pd
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR
from mlflow.pyfunc import PythonModel, PythonModelContext  # mypy sees mlflow.pyfunc as a LazyLoader

from phi3_chat.admission import (
    DEFAULT_PREFILL_SLICE_S,
    _Rates,
    default_kv_budget,
    kv_bytes_per_token,
    machine_memory_bytes,
    prefill_slice_setting,
    shared_kv_budget,
)
from phi3_chat.answers import StreamWriter, chat_answer
from phi3_chat.batcher import (
    DEFAULT_BATCH_WAIT_MS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE,
    _Batcher,
    _Ticket,
)
from phi3_chat.folder import model_folder_problems, usable_context
from phi3_chat.request import _Request, _RowState, _Sampling
from phi3_chat.steps import GrammarCache, batch_steps, guidance_problem
from phi3_chat.validate import (
    _GENERATION_FIELDS,
    FEATURE_FIELDS,
    _as_int,
    _as_milliseconds,
    _as_timeout,
    _invalid,
    _is_missing,
    _rows,
    _validated_setting,
    validated_params,
    validated_row,
)

__all__ = ["DEFAULT_MAX_TOKENS", "MODEL_DIR_ARTIFACT", "OnnxChatModel"]

#: Name of the artifact holding the ONNX folder (the one with ``genai_config.json``).
MODEL_DIR_ARTIFACT = "model_dir"
#: New tokens per request when neither the request nor ``model_config`` says otherwise.
DEFAULT_MAX_TOKENS = 256
_PROMPT_FORMATS = ("auto", "chat", "raw")
# Rendered through the chat template to find the markers that open a user turn.
_SENTINEL = "\x00phi3ops-sentinel\x00"


def _generation_failed(error: BaseException) -> MlflowException:
    return MlflowException(
        f"generation failed inside onnxruntime-genai: {error}", error_code=INTERNAL_ERROR
    )


class OnnxChatModel(PythonModel):
    """Phi-3 chat on onnxruntime-genai: ``llm/v1/chat`` requests and plain prompts.

    ``load_context`` loads the ONNX model and its tokenizer once and creates the `_Batcher`,
    the one owner of what concurrent calls share: ``predict`` and ``predict_stream`` calls from
    any number of threads (MLflow's scoring server, phi3ops' server, evaluation) validate their
    rows in their own thread, then queue them; one engine thread runs waiting rows with the same
    grammar (or none) as one onnxruntime-genai batch and hands each call its own rows or stream
    pieces.
    A greedy answer is token for token the one the request gets alone.

    ``chat_features`` names the request fields beyond MLflow's chat columns it honours
    (`phi3_chat.validate.FEATURE_FIELDS`); the serving layer refuses the others, and every
    one of them for a model without this attribute.
    """

    chat_features: frozenset[str] = frozenset(FEATURE_FIELDS)

    def load_context(self, context: PythonModelContext) -> None:
        """Loads the ONNX model, tokenizer and generation defaults.

        Args:
            context: MLflow context; ``artifacts["model_dir"]`` is the ONNX folder and
                ``model_config`` may set ``max_tokens``, ``temperature``, ``top_p``,
                ``top_k``, ``model_name``, ``prompt_format`` (``auto``, ``chat`` or ``raw``)
                and the batcher's ``max_batch_size`` (rows per batch, default 8),
                ``max_queue`` (requests that may wait, default 64; one more gets
                ``RESOURCE_EXHAUSTED``), ``batch_wait_ms`` (how long a request waits for others
                to join its batch, default 5) and ``request_timeout_s`` (default
                ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``, 60), ``admission`` (default true:
                refuse at once what the measured speed cannot finish in time; a tiny warm-up
                at load seeds the rates) and ``kv_budget_bytes`` (the KV cache batches may
                take; default: the full batch at full context, at most a quarter of the
                machine's memory; one budget for every model of the process that comes to
                the same bytes, `phi3_chat.admission.shared_kv_budget`: both arms of a
                server), ``structured_outputs`` (default true: check at load that
                onnxruntime-genai really constrains decoding, and fail loudly when it does not;
                false serves without ``response_format`` and ``tools``, refused with a 400).

        Raises:
            MlflowException: The artifact is missing, holds a file or ``genai_config.json``
                setting that is not model data (see `model_folder_problems`), or
                ``model_config`` holds a bad value.
        """
        model_dir = (context.artifacts or {}).get(MODEL_DIR_ARTIFACT)
        config_path = os.path.join(model_dir or "", "genai_config.json")
        if not model_dir or not os.path.isfile(config_path):
            raise MlflowException(
                f"artifact {MODEL_DIR_ARTIFACT!r} must be an onnxruntime-genai model folder "
                f"(with genai_config.json); got {model_dir!r}. Log the model with "
                f"artifacts={{{MODEL_DIR_ARTIFACT!r}: '<ONNX folder>'}}."
            )
        problems = model_folder_problems(model_dir)
        if problems:
            raise MlflowException(
                f"Refusing to load the model in {model_dir}: {'; '.join(problems)}. The folder "
                f"was altered after packaging, or packaged from an untrusted source; package a "
                f"freshly fetched snapshot again."
            )
        with open(config_path, encoding="utf-8") as handle:
            genai_config = json.load(handle)["model"]

        self._model = og.Model(model_dir)
        self._tokenizer = og.Tokenizer(self._model)
        self.context_length = usable_context(genai_config)
        eos = genai_config["eos_token_id"]
        self.eos_token_ids = frozenset(int(t) for t in (eos if isinstance(eos, list) else [eos]))
        self._pad_token_id = int(genai_config.get("pad_token_id", min(self.eos_token_ids)))

        config = dict(context.model_config or {})
        defaults: dict[str, Any] = {"temperature": 0.0, "max_tokens": DEFAULT_MAX_TOKENS}
        for name in _GENERATION_FIELDS:
            if not _is_missing(config.get(name)):
                defaults[name] = _validated_setting(name, config[name], f"model_config[{name!r}]")
        self._defaults = defaults
        self.model_name = str(config.get("model_name") or genai_config.get("type", "phi3"))
        self._request_timeout_s = _as_timeout(
            config.get("request_timeout_s", MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()),
            "model_config['request_timeout_s']",
        )
        self._rates = _Rates()
        kv_per_token = kv_bytes_per_token(genai_config)
        max_batch_size = _as_int(
            config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE),
            "model_config['max_batch_size']",
            minimum=1,
        )
        kv_budget = config.get("kv_budget_bytes")
        kv_budget = (
            default_kv_budget(
                genai_config, self.context_length, max_batch_size, machine_memory_bytes()
            )
            if _is_missing(kv_budget)
            else _as_int(kv_budget, "model_config['kv_budget_bytes']", minimum=kv_per_token)
        )
        self._prefill_slice_s = prefill_slice_setting(  # og holds the GIL in a prefill
            config.get("prefill_slice_s", DEFAULT_PREFILL_SLICE_S)
        )
        admission = config.get("admission", True)
        if not isinstance(admission, bool):
            raise _invalid(f"model_config['admission'] must be true or false, got {admission!r}")
        self._batcher = _Batcher(
            self._steps,
            self._fits,
            max_batch_size=max_batch_size,
            max_queue=_as_int(
                config.get("max_queue", DEFAULT_MAX_QUEUE), "model_config['max_queue']", minimum=1
            ),
            wait_s=_as_milliseconds(
                config.get("batch_wait_ms", DEFAULT_BATCH_WAIT_MS), "model_config['batch_wait_ms']"
            )
            / 1000,
            rates=self._rates if admission else None,
            kv_per_token=kv_per_token,
            kv_budget=shared_kv_budget(kv_budget),  # shared with the other arm's model
            prefill_slice_s=self._prefill_slice_s,
        )
        self._prompt_format = config.get("prompt_format", "auto")
        if self._prompt_format not in _PROMPT_FORMATS:
            raise _invalid(
                f"model_config['prompt_format'] must be one of {', '.join(_PROMPT_FORMATS)}, "
                f"got {self._prompt_format!r}"
            )
        self._grammars = GrammarCache(self._model)
        # Fed to rows that finished their constrained value while their batch goes on.
        self._filler_token_id = int(self._tokenizer.encode("x")[-1])
        structured = config.get("structured_outputs", True)
        if not isinstance(structured, bool):
            raise _invalid(
                f"model_config['structured_outputs'] must be true or false, got {structured!r}"
            )
        if structured:
            problem = guidance_problem(self._constrained_answer)
            if problem is not None:
                raise MlflowException(
                    f"onnxruntime-genai {og.__version__} here does not constrain decoding "
                    f"({problem}), so response_format and tools cannot be honoured. Install a "
                    "build with guidance (the CPU wheel of onnxruntime-genai 0.18 has it), or "
                    "log the model with model_config={'structured_outputs': False} to serve "
                    "it without them."
                )
        else:
            self.chat_features = self.chat_features - {
                "response_format",
                "tools",
                "tool_choice",
                "parallel_tool_calls",
            }
        # What opens a user turn in this model's own template (e.g. "<|user|>"): a prompt that
        # already holds it was formatted by the caller.
        rendered = self._render([{"role": "user", "content": _SENTINEL}])
        self._user_marker = rendered.split(_SENTINEL, 1)[0].strip()
        if admission:  # measured, never assumed: one tiny generation seeds the rates
            warm_up = self._request(0, {"prompt": "Hi", "max_tokens": 2}, {}, "")
            for _ in self._steps([warm_up]):
                pass

    # --- public API ---------------------------------------------------------------------------

    def predict(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[dict[str, Any] | str]:
        """Answers every row: a ``chat.completion`` dict for chat rows, a string for prompts.

        Args:
            context: Unused (everything was loaded in ``load_context``).
            model_input: One request per row: a DataFrame (what pyfunc passes), a dict, or a
                list of dicts. The hint is exactly ``pd.DataFrame`` so that MLflow validates
                against the logged signature instead of inferring one from the hint.
            params: Generation fields for rows that do not set them, and ``timeout_s``: how
                long this call may take (default ``model_config['request_timeout_s']``).

        Returns:
            One answer per row, in row order.

        Raises:
            MlflowException: A request is invalid (``INVALID_PARAMETER_VALUE``, HTTP 400);
                nothing was generated. Too many requests already wait (``RESOURCE_EXHAUSTED``,
                HTTP 429): retry later. The call ran past its timeout (``DEADLINE_EXCEEDED``,
                HTTP 504): its rows were cancelled.
        """
        requests = self._requests(model_input, params)
        ticket = self._batcher.submit(
            requests,
            timeout_s=self._timeout(params),
            stream=False,
            flexible=self._flexible(model_input, params),
        )
        states: list[_RowState | None] = [None] * len(requests)
        left = len(requests)
        try:
            while left:
                event = ticket.next()
                if event[0] == "error":
                    raise _generation_failed(event[1]) from event[1]
                states[event[1]] = event[2]
                left -= 1
        finally:
            if left:
                self._batcher.cancel(ticket)
        return [self._answer(state) for state in states if state is not None]

    def predict_stream(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> Iterator[dict[str, Any] | str]:
        """Streams one request: ``chat.completion.chunk`` dicts, or string pieces for prompts.

        The request is validated and queued before this returns; the last chat chunk carries
        ``finish_reason`` and ``usage``. Closing the iterator early (or dropping it) cancels
        the request: its row stops generating and leaves its batch.

        Args:
            context: Unused.
            model_input: Exactly one request (DataFrame row, dict, or one-element list).
            params: Generation fields the request does not set, and ``timeout_s``: how long
                the request may wait for the engine before its first token (default
                ``model_config['request_timeout_s']``); once it streams, it runs to its end.

        Returns:
            An iterator of chunks whose contents join into what ``predict`` returns.

        Raises:
            MlflowException: The request is invalid, or more than one was sent (both
                ``INVALID_PARAMETER_VALUE``); too many requests already wait
                (``RESOURCE_EXHAUSTED``). Iterating raises ``DEADLINE_EXCEEDED`` when the
                request waited past its timeout.
        """
        requests = self._requests(model_input, params)
        if len(requests) != 1:
            raise _invalid(f"predict_stream takes exactly one request, got {len(requests)}")
        ticket = self._batcher.submit(
            requests,
            timeout_s=self._timeout(params),
            stream=True,
            flexible=self._flexible(model_input, params),
        )
        stream = self._stream(requests[0], ticket)
        # A stream dropped unstarted never runs its finally: cancel it when it is collected.
        weakref.finalize(stream, self._batcher.cancel, ticket)
        return stream

    def close(self) -> None:
        """Ends every call of this model at once (503) and takes no more: the server stops, or
        it serves another version (`phi3_chat.batcher._Batcher.close`).
        """
        self._batcher.close()

    def _flexible(self, model_input: Any, params: dict[str, Any] | None) -> list[bool]:
        """Which rows left ``max_tokens`` out (the call's params too): they get what fits."""
        rows = _rows(model_input)
        if not _is_missing((params or {}).get("max_tokens")):
            return [False] * len(rows)
        return ["max_tokens" not in row for row in rows]

    def _timeout(self, params: dict[str, Any] | None) -> float:
        value = (params or {}).get("timeout_s")
        if _is_missing(value):
            return self._request_timeout_s
        return _as_timeout(value, "params['timeout_s']")

    # --- input -> requests ----------------------------------------------------------------------

    def _requests(self, model_input: Any, params: dict[str, Any] | None) -> list[_Request]:
        rows = _rows(model_input)
        shared = validated_params(params)
        where_prefix = len(rows) > 1
        return [
            self._request(index, row, shared, f"request[{index}]." if where_prefix else "")
            for index, row in enumerate(rows)
        ]

    def _request(
        self, index: int, row: dict[str, Any], shared: dict[str, Any], where: str
    ) -> _Request:
        own, messages = validated_row(row, where)
        settings = {**self._defaults, **shared, **own}
        for name in FEATURE_FIELDS:
            if name in row and name not in self.chat_features:
                raise _invalid(
                    f"{where}{name} is not supported: this model was loaded without structured "
                    "outputs (model_config['structured_outputs'] is false)"
                )
        tools = settings.get("tools")
        guidance = tools.guidance() if tools is not None else settings.get("guidance")
        if guidance is not None:
            problem = self._grammars.problem(guidance)
            if problem is not None:
                what = "tools" if tools is not None else "response_format"
                raise _invalid(f"{where}{what}: the grammar cannot be built: {problem}")
        if messages is not None:
            shape, field_name = "chat", "messages"
            text = self._render(tools.render(messages) if tools is not None else messages)
        else:
            shape, field_name = "prompt", "prompt"
            prompt = row["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise _invalid(f"{where}prompt must be a non-empty string, got {prompt!r}")
            text = self._prompt_text(prompt)

        input_ids = np.asarray(self._tokenizer.encode(text), dtype=np.int32)
        used, context_length = len(input_ids), self.context_length
        if used >= context_length:
            raise _invalid(
                f"{where}{field_name} is too long: the prompt uses {used} tokens and the "
                f"context holds {context_length}, leaving no room to answer"
            )
        max_tokens = settings["max_tokens"]
        if used + max_tokens > context_length:
            if "max_tokens" in row or "max_tokens" in shared:
                raise _invalid(
                    f"{where}max_tokens={max_tokens} does not fit: prompt uses {used} of "
                    f"{context_length} tokens (at most {context_length - used} new tokens)"
                )
            # Only the deployment's default asked for more: answer as much as fits.
            max_tokens = context_length - used

        temperature = settings["temperature"]
        sampling = _Sampling(
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 0.0,
            top_p=settings.get("top_p", 1.0) if temperature > 0 else 1.0,
            top_k=settings.get("top_k", 0) if temperature > 0 else 0,
            seed=settings.get("seed"),
        )
        return _Request(
            index=index,
            shape=shape,
            input_ids=input_ids,
            max_tokens=max_tokens,
            stop=settings.get("stop", ()),
            sampling=sampling,
            guidance=guidance,
            logprobs=settings.get("logprobs"),
            tools=tools,
        )

    def _render(self, messages: list[dict[str, Any]]) -> str:
        # The model's own chat template (tokenizer_config.json), never a hand-written one.
        return self._tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def _prompt_text(self, prompt: str) -> str:
        if self._prompt_format == "raw":
            return prompt
        if self._prompt_format == "auto" and self._user_marker and self._user_marker in prompt:
            return prompt
        return self._render([{"role": "user", "content": prompt}])

    # --- generation -------------------------------------------------------------------------

    def _fits(self, batch: list[_Request]) -> bool:
        """Whether these rows fit one batch (else they run one by one)."""
        # Padded rows share one max_length: the longest prompt plus the most new tokens.
        width = max(len(request.input_ids) for request in batch)
        return width + max(request.max_tokens for request in batch) <= self.context_length

    def _steps(self, batch: list[_Request]) -> Iterator[list[_RowState]]:
        """Generates a batch of requests (one grammar, or none); yields the rows after each
        token (`phi3_chat.steps.batch_steps`).
        """
        return batch_steps(
            self._model,
            self._tokenizer,
            batch,
            pad_token_id=self._pad_token_id,
            eos_token_ids=self.eos_token_ids,
            filler_token_id=self._filler_token_id,
            rates=self._rates,
            prefill_slice_s=self._prefill_slice_s,
        )

    def _constrained_answer(self, kind: str, data: str) -> str:
        """A short answer to "Hi" under a grammar: the engine check at load."""
        params = og.GeneratorParams(self._model)
        prompt = self._render([{"role": "user", "content": "Hi"}])
        ids = np.asarray(self._tokenizer.encode(prompt), dtype=np.int32)
        params.set_search_options(batch_size=1, max_length=len(ids) + 4, do_sample=False)
        params.set_guidance(kind, data)
        generator = og.Generator(self._model, params)
        generator.append_tokens(ids[None, :])
        tokens: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self.eos_token_ids:
                break
            tokens.append(token)
        return str(self._tokenizer.decode(np.asarray(tokens, dtype=np.int32)))

    def load_stats(self) -> dict[str, int]:
        """What the batcher holds now (`phi3_chat.batcher._Batcher.load_stats`): queue depth,
        running rows, last batch size and the KV budget's use. Cheap and thread-safe.
        """
        return self._batcher.load_stats()

    # --- output -----------------------------------------------------------------------------

    def _answer(self, state: _RowState) -> dict[str, Any] | str:
        if state.request.shape == "prompt":
            return state.text
        return chat_answer(state, model_name=self.model_name, tokenizer=self._tokenizer)

    def _stream(self, request: _Request, ticket: _Ticket) -> Iterator[dict[str, Any] | str]:
        chat = request.shape == "chat"
        writer = StreamWriter(request, model_name=self.model_name, tokenizer=self._tokenizer)
        try:
            if chat:
                yield writer.first()
            while True:
                event = ticket.next()
                if event[0] == "error":
                    raise _generation_failed(event[1]) from event[1]
                if event[0] == "row":
                    state = event[2]
                    break
                if chat:
                    yield from writer.text(event[1], event[2] if len(event) > 2 else None)
                else:
                    yield event[1]
            if chat:
                yield from writer.last(state)
        finally:  # a consumer that stops early (GeneratorExit) frees the row's batch slot
            self._batcher.cancel(ticket)
