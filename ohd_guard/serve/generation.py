"""From an OpenAI request to the guard's generation arguments: token budget, sampling, and ``stop``
sequences (generation stops at one; like OpenAI, the returned text ends before it)."""

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


def generation_for(req: ChatCompletionRequest, settings: ServeSettings) -> Generation:
    n = req.max_completion_tokens or req.max_tokens or settings.default_max_tokens
    if n > settings.max_tokens_limit:
        raise APIError(400, "invalid_parameter", f"max_tokens: at most {settings.max_tokens_limit}", param="max_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
        raise APIError(400, "invalid_parameter", "stop: at most 4 non-empty sequences of up to 256 characters",
                       param="stop")
    t = 1.0 if req.temperature is None else req.temperature  # OpenAI's default temperature is 1
    kwargs: dict[str, Any] = {"do_sample": False}
    if t > 0:
        kwargs = {"do_sample": True, "temperature": t, "top_p": req.top_p or 1.0, "top_k": 0}
    return Generation(max_tokens=n, stops=stops, kwargs=kwargs)
