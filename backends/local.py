"""The local backend: a model loaded in this process, generating on the engine's worker thread."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from backends.base import BackendError, ChatJob, Constraint, InvalidField, Stream, Tokens, Tool
from backends.limits import check_limits
from backends.sampling import sampling_params
from engine import Engine, EngineStopped, QueueFull
from generation.constraints import CompiledConstraint, ConstraintError, grammars_for
from generation.output import ToolCalling
from generation.prompts import PromptTooLong, fit_chat
from generation.sampling import SamplingParams
from generation.structured import Constraint as Grammar
from models.chat_format import ChatRejected
from models.devices import clear_caches, memory_report
from models.loader import LoadedModel

log = logging.getLogger(__name__)

CLEAR_WAIT_S = 30.0  # /clear waits this long for the worker to finish its step (a long prefill chunk takes seconds)


def plan(lm: LoadedModel, job: ChatJob) -> tuple[list[int], SamplingParams]:
    """Prompt ids and sampling settings of a job. Runs off the event loop: its cost grows with the conversation.
    A chat template's refusal is the client's error.

    The ChatGLM API fits the history into the context and the server's history budget (oldest rounds go first);
    the OpenAI API refuses a conversation that does not fit."""
    try:
        return _plan(lm, job)
    except ChatRejected as exc:
        raise InvalidField(job.template_param, str(exc)) from exc


def _plan(lm: LoadedModel, job: ChatJob) -> tuple[list[int], SamplingParams]:
    calling = tool_calling(lm, job)  # first: a model without a tool format is refused for its tools
    defaults = lm.chat.defaults or job.defaults
    max_tokens = job.sampling.max_tokens
    # a length in ChatGLM's sense (prompt + answer): the request's max_length, else the family's default
    cap, field = None, job.prompt_param
    if max_tokens is None:
        if job.max_length is not None:
            cap, field = job.max_length, "max_length"
        else:
            cap = defaults.max_length
    limit = min(lm.context_length, cap) if cap is not None else lm.context_length
    if job.trim:
        # history goes only when the prompt would not fit, leaving room for the answer length a client asked for
        limits = job.limits
        budgets = [b for b in (limits.history_tokens, limits.max_prompt_tokens) if b is not None]
        try:
            ids, dropped = fit_chat(lm.chat, job.messages, limit, max_tokens or 1, min(budgets, default=None))
        except PromptTooLong as exc:
            raise InvalidField(field, str(exc)) from exc
        if dropped:
            log.info("dropped %d oldest history messages to fit the context", dropped)
    else:
        ids = prompt_ids(lm, job, calling)
        if not ids:
            raise InvalidField(job.prompt_param, f"'{job.prompt_param}' holds no tokens: there is nothing to continue")
        if len(ids) >= limit:
            message = (
                f"This model's maximum context length is {limit} tokens. "
                f"However, your {job.prompt_param} resulted in {len(ids)} tokens."
            )
            raise InvalidField(field, message, "context_length_exceeded")
    check_limits(job.limits, max_tokens, len(ids), job.prompt_param)
    wanted = limit - len(ids) if cap is not None else (max_tokens or job.limits.default_max_tokens)
    max_new = max(1, min(wanted, lm.context_length - len(ids), job.limits.max_tokens_limit))
    check_bias(lm, job.sampling.logit_bias)
    constraint = job.sampling.constraint
    if calling is not None and job.tool_choice.mode in ("required", "function"):
        if constraint is not None:
            why = f"'tool_choice' that forces a call cannot be sent with '{constraint.param}'"
            raise InvalidField("tool_choice", why)
        # the answer is held to the model's call format: a forced call is made, not hoped for
        try:
            grammar = calling.format.forced(calling.tools)
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:  # a schema it cannot use
            raise InvalidField(
                "tools", f"'tools' cannot be forced: a function's parameters do not work ({exc})"
            ) from exc
        # a schema the grammar library refuses is the tools' fault: the error names them
        constraint = Grammar("grammar", grammar, "tools")
    params = sampling_params(job.sampling, max_new, defaults, compiled(lm, constraint))
    return ids, replace(params, tools=calling, raw_text=job.prompt is not None)


def prompt_ids(lm: LoadedModel, job: ChatJob, calling: ToolCalling | None) -> list[int]:
    """A job's prompt ids: its raw prompt's, or its messages' through the chat format with the tools it offers."""
    if job.prompt is not None:
        return lm.chat.encode_text(job.prompt)
    return lm.chat.encode(job.messages, calling.tools if calling is not None else ())


def tokens_of(lm: LoadedModel, job: ChatJob) -> list[int]:
    """The ids `plan` would give a job, without its checks of length and sampling (/tokenize, count_tokens)."""
    try:
        return prompt_ids(lm, job, tool_calling(lm, job))
    except ChatRejected as exc:
        raise InvalidField(job.template_param, str(exc)) from exc


def text_of(lm: LoadedModel, ids: tuple[int, ...]) -> str:
    """The text of token ids; an id past the model's tokens is the client's error."""
    vocab = token_count(lm)
    if bad := [i for i in ids if not 0 <= i < vocab]:
        raise InvalidField("tokens", f"'tokens' holds {bad[0]}; this model's tokens are 0 to {vocab - 1}")
    return str(lm.tokenizer.decode(list(ids)))


def offered(job: ChatJob) -> tuple[Tool, ...]:
    """The tools the prompt tells the model of: none with tool_choice none, only the named one when one is named."""
    choice = job.tool_choice
    if choice.mode == "none":
        return ()
    if choice.mode == "function":
        return tuple(t for t in job.tools if t.name == choice.name)
    return job.tools


def tool_calling(lm: LoadedModel, job: ChatJob) -> ToolCalling | None:
    """How the answer's calls are read, when the request offers tools; a model without a call format is refused."""
    tools = offered(job)
    if not tools:
        return None
    fmt = lm.chat.tool_format
    if fmt is None:
        raise InvalidField(
            "tools",
            f"'tools' cannot be used: the model {lm.name} has no tool-call format (its chat template does not render "
            "tools); start the server with --tool-call-parser NAME if the model was trained on one",
        )
    return ToolCalling(fmt, tools, job.tool_choice.parallel, special_markers(lm.tokenizer, fmt.markers))


def special_markers(tokenizer: Any, markers: tuple[str, ...]) -> tuple[tuple[int, str], ...]:
    """The format's words that this tokenizer holds as special tokens (Mistral's `[TOOL_CALLS]`, some Hermes
    tokenizers' `<tool_call>`): their text is put back into the answer the call format reads."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return tuple(sorted((i, t.content) for i, t in added.items() if t.special and t.content in markers))


def check_bias(lm: LoadedModel, bias: tuple[tuple[int, float], ...]) -> None:
    if not bias:
        return
    vocab = token_count(lm)
    if bad := [token for token, _ in bias if token >= vocab]:
        raise InvalidField("logit_bias", f"'logit_bias' names token {bad[0]}; this model's tokens are 0 to {vocab - 1}")


def token_count(lm: LoadedModel) -> int:
    """The tokens a request may name: a Hugging Face tokenizer's with its added ones; a model's own tokenizer
    (ChatGLM's) says its vocabulary size."""
    try:
        return len(lm.tokenizer)
    except TypeError:
        return int(lm.tokenizer.vocab_size)


def compiled(lm: LoadedModel, constraint: Constraint | None) -> CompiledConstraint | None:
    """A request's constraint compiled for the model's tokenizer (cached): a schema keyword the grammar library
    does not enforce, a bad regex or grammar is the client's error, naming its field."""
    if constraint is None:
        return None
    try:
        grammars = grammars_for(lm.tokenizer, tuple(sorted(lm.eos_token_ids)))
    except Exception as exc:
        message = f"'{constraint.param}' needs a Hugging Face fast tokenizer; this model's cannot be read ({exc})"
        raise InvalidField(constraint.param, message) from exc
    try:
        return grammars.compile(constraint)
    except ConstraintError as exc:
        raise InvalidField(exc.param, exc.message) from exc


class LocalBackend:
    """An Engine and its model behind the Backend interface."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.started_at = engine.started_at
        # prompts are built here, off the event loop: chat templates, tokenizing and trimming grow with the request
        self._prompts: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self.engine.running

    @property
    def counts(self) -> tuple[int, int]:
        return self.engine.counts

    @property
    def max_batch_size(self) -> int:
        return self.engine.max_batch_size

    async def start(self) -> None:
        self._prompts = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prompts")
        self.engine.start()

    async def stop(self, grace: float) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop, grace)
        if self._prompts is not None:
            self._prompts.shutdown(wait=False, cancel_futures=True)

    async def ready(self) -> BaseException | None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.ready.wait)
        return self.engine.load_error

    def names(self) -> tuple[str, ...]:
        try:
            return (self.engine.model.name,)
        except EngineStopped as exc:  # still loading
            raise BackendError(503, str(exc)) from exc

    def describe(self) -> tuple[str, dict[str, Any]]:
        if (error := self.engine.load_error) is not None:  # the process stops soon (watch_loading); say why meanwhile
            return "failed", {"message": f"the model failed to load: {type(error).__name__}: {error}"[:500]}
        try:
            lm = self.engine.model
        except EngineStopped as exc:
            return "loading", {"message": str(exc)}
        body: dict[str, Any] = {
            "device": lm.device,
            "dtype": lm.dtype,
            "bits": lm.bits,
            "architecture": str(getattr(getattr(lm.model, "config", None), "model_type", "") or ""),
            "context_length": lm.context_length,
            "tool_calls": lm.chat.tool_format is not None,  # whether requests may offer it tools
            "weight_bytes": lm.weight_bytes,
            "max_batch_size": self.engine.max_batch_size,
            "prefill_tokens_per_step": self.engine.chunk_tokens if lm.chunked_prefill else None,
            "prefill_copy_bytes": sum(t.numel() * t.element_size() for t in (lm.prefill_copy or {}).values()),
        }
        if self.engine.tuner is not None:
            body.update(self.engine.tuner.describe())
        if lm.kernels is not None:
            body["kernels"] = lm.kernels
        prefix = self.engine.prefix
        body["prefix_cache"] = prefix.describe() if prefix is not None else None
        if memory := memory_report(list(lm.devices)):
            body["memory"] = memory
        return ("ok" if self.engine.running else "unavailable"), body

    async def clear(self) -> dict[str, Any]:
        devices = list(self.engine.model.devices)
        try:  # the worker forgets the prefix cache between two steps; a long step is waited for, a stuck one not
            freed = await asyncio.wait_for(asyncio.wrap_future(self.engine.clear_prefix_cache()), CLEAR_WAIT_S)
        except TimeoutError:
            freed = None
        clear_caches(devices)
        return {"prefix_cache_freed_bytes": freed}

    def _model(self) -> LoadedModel:
        try:
            return self.engine.model
        except EngineStopped as exc:
            raise BackendError(503, str(exc)) from exc

    async def tokenize(self, job: ChatJob) -> Tokens:
        lm = self._model()
        ids = await asyncio.get_running_loop().run_in_executor(self._prompts, lambda: tokens_of(lm, job))
        return Tokens(tuple(ids), lm.context_length)

    async def detokenize(self, ids: tuple[int, ...]) -> str:
        lm = self._model()
        return await asyncio.get_running_loop().run_in_executor(self._prompts, lambda: text_of(lm, ids))

    async def open(self, job: ChatJob) -> list[Stream]:
        lm = self._model()
        # a client that leaves meanwhile cancels the wait; the result is dropped
        ids, params = await asyncio.get_running_loop().run_in_executor(self._prompts, lambda: plan(lm, job))
        streams: list[Stream] = []
        try:
            for i in range(job.n):
                # each choice gets its own stream of randomness, reproducible from the request's seed
                seed = None if params.seed is None else params.seed + i
                streams.append(self.engine.submit(ids, replace(params, seed=seed)))
        except (QueueFull, EngineStopped) as exc:
            for s in streams:
                s.cancel()
            if isinstance(exc, QueueFull):
                raise BackendError(429, f"server busy: {exc}; retry later", {"Retry-After": "1"}) from exc
            raise BackendError(503, str(exc)) from exc
        except Exception:
            for s in streams:
                s.cancel()
            raise
        return streams
