"""From an OpenAI request to the guard's generation arguments: token budget, sampling (a request
without ``temperature`` gets the model's ``generation_config``), and ``stop`` sequences (generation
stops at one; like OpenAI, the returned text ends before it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria

from ohd_guard.serve.errors import APIError
from ohd_guard.serve.schema import ChatCompletionRequest
from ohd_guard.serve.settings import ServeSettings


class StopTextCriteria(StoppingCriteria):
    """Stops once the decoded answer contains a stop sequence. The prompt length is taken at the first
    call (made after the first answer token), so text in the prompt never matches."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops, self.start = tokenizer, stops, None
        self.tail = max(len(s) for s in stops) + 8  # tokens decoded per step: enough for any stop sequence

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        if self.start is None:
            self.start = input_ids.shape[1] - 1
        ids = input_ids[0, max(self.start, input_ids.shape[1] - self.tail):].tolist()
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hit = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), hit, dtype=torch.bool, device=input_ids.device)


class TokenCounter(StoppingCriteria):
    """Never stops; counts the answer's tokens (one call per new token) and notes the prompt length,
    for ``usage`` and ``finish_reason``. ``prompt`` is 0 when nothing was generated (a static refusal)."""

    def __init__(self) -> None:
        self.prompt = self.n = 0

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        if self.n == 0:
            self.prompt = input_ids.shape[1] - 1
        self.n += 1
        return torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.n, "total_tokens": self.prompt + self.n}


@dataclass
class Generation:
    """What one request asks of the generator."""

    max_tokens: int
    stops: list[str] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def guard_kwargs(self, tokenizer: Any) -> tuple[dict[str, Any], TokenCounter]:
        """Keyword arguments of ``OhdGuard.agenerate``/``astream``, with fresh criteria for this call."""
        counter = TokenCounter()
        criteria: list[StoppingCriteria] = [counter]
        if self.stops:
            criteria.append(StopTextCriteria(tokenizer, self.stops))
        return {"max_new_tokens": self.max_tokens, **self.kwargs, "stopping_criteria": criteria}, counter

    def finish(self, refused: bool, stopped: bool, counter: TokenCounter) -> str:
        if refused:
            return "content_filter"
        return "length" if not stopped and counter.n >= self.max_tokens else "stop"


GREEDY: dict[str, Any] = {"do_sample": False}


def sampling_defaults(generation_config: Any) -> dict[str, Any]:
    """What a request that omits ``temperature`` gets: the model's own ``generation_config`` sampling
    (``do_sample``, ``temperature``, ``top_p``, ``top_k``), which is what the library uses too, and
    greedy when it says ``do_sample=False``, has a temperature of 0, or there is none. Not OpenAI's
    temperature 1: a model whose authors ship greedy decoding is not sampled behind their back."""
    if generation_config is None or not getattr(generation_config, "do_sample", False):
        return dict(GREEDY)
    t = getattr(generation_config, "temperature", None)
    t = 1.0 if t is None else float(t)
    if t <= 0:
        return dict(GREEDY)
    out: dict[str, Any] = {"do_sample": True, "temperature": t}
    if getattr(generation_config, "top_p", None) is not None:
        out["top_p"] = float(generation_config.top_p)
    if getattr(generation_config, "top_k", None) is not None:
        out["top_k"] = int(generation_config.top_k)
    return out


def generation_for(req: ChatCompletionRequest, settings: ServeSettings,
                   defaults: dict[str, Any] | None = None) -> Generation:
    """The request's budget, stops and sampling; ``defaults`` (:func:`sampling_defaults`, greedy when
    None) decide when the request sends no ``temperature``."""
    n = req.max_completion_tokens or req.max_tokens or settings.default_max_tokens
    if n > settings.max_tokens_limit:
        raise APIError(400, "invalid_parameter", f"max_tokens: at most {settings.max_tokens_limit}", param="max_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
        raise APIError(400, "invalid_parameter", "stop: at most 4 non-empty sequences of up to 256 characters",
                       param="stop")
    if req.temperature is None:  # the model's generation_config, not OpenAI's temperature 1
        kwargs = dict(defaults or GREEDY)
        if kwargs.get("do_sample") and req.top_p is not None:
            kwargs["top_p"] = req.top_p
    elif req.temperature > 0:
        kwargs = {"do_sample": True, "temperature": req.temperature, "top_p": req.top_p or 1.0, "top_k": 0}
    else:
        kwargs = dict(GREEDY)
    return Generation(max_tokens=n, stops=stops, kwargs=kwargs)
