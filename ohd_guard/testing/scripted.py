"""Scripted answers for tiny models: a logits processor that makes ``model.generate`` write given
texts. The real model decodes (prefill, cache, stopping); only its choice of tokens is scripted,
because a random tiny model cannot decide to call a tool or write JSON by itself."""

from __future__ import annotations

from typing import Any

__all__ = ["Scripted"]


class Scripted:
    """Makes the model write ``texts[k]`` (then EOS) on its k-th generation, the last text again
    after that. Hand it to ``generate`` as ``logits_processor=[Scripted(tok, ...)]``. ``prompts``
    records each generation's prompt (token ids of row 0), to read back what the model answered from."""

    def __init__(self, tok: Any, *texts: str):
        self.texts = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
        self.k, self.start, self.last = -1, 0, -1
        self.prompts: list[list[int]] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        n = input_ids.shape[1]
        if n != self.last + 1:  # a new generation
            self.k, self.start = self.k + 1, n
            self.prompts.append(input_ids[0].tolist())
        self.last = n
        ids = self.texts[min(self.k, len(self.texts) - 1)]
        out = torch.full_like(scores, -float("inf"))
        out[:, ids[min(n - self.start, len(ids) - 1)]] = 0.0
        return out
