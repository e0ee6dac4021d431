"""A request's sampling fields filled with the model family's (or the route's) defaults."""

from __future__ import annotations

from backends.base import Sampling
from generation.constraints import CompiledConstraint
from generation.sampling import SamplingParams
from models.chat_format import SamplingDefaults


def sampling_params(
    s: Sampling, max_new_tokens: int, defaults: SamplingDefaults, constraint: CompiledConstraint | None = None
) -> SamplingParams:
    """Fill a request's sampling fields with the defaults (the model family's, else the route's); `constraint`: the
    request's constraint compiled for the model's tokenizer."""
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=defaults.temperature if s.temperature is None else s.temperature,
        top_p=defaults.top_p if s.top_p is None else s.top_p,
        top_k=defaults.top_k if s.top_k is None else s.top_k,
        repetition_penalty=1.0 if s.repetition_penalty is None else s.repetition_penalty,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        stop=s.stop,
        seed=s.seed,
        min_tokens=s.min_tokens,
        ignore_eos=s.ignore_eos,
        logit_bias=s.logit_bias,
        logprobs=s.logprobs,
        constraint=constraint,
    )
