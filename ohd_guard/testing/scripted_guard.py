"""A guard whose model's answers are scripted, for server tests: the real tiny model decodes (prefill,
cache, stopping), only its token choices are forced (:class:`~ohd_guard.testing.scripted.Scripted`),
because a random tiny model cannot decide to write the trigger, a tool call or JSON by itself.
Screening, checking and refusing are the guard's own and untouched; only ``agenerate``/``astream``
(what the server calls to answer) get the script."""

from __future__ import annotations

from typing import Any

from ohd_guard.guard import OhdGuard
from ohd_guard.testing.scripted import Scripted

__all__ = ["ScriptedGuard", "scripted_planted_guard"]


class ScriptedGuard(OhdGuard):
    """An :class:`OhdGuard` whose model writes ``self.says`` on every answer (set it per request);
    ``self.last`` is the last answer's :class:`Scripted` (its ``prompts``: what the model answered from)."""

    says = "the cats are here"
    last: Scripted | None = None

    def _script(self) -> list[Scripted]:
        self.last = Scripted(self.tokenizer, self.says)
        return [self.last]

    def agenerate(self, conversation: Any, max_new_tokens: int = 256, **kw: Any) -> Any:
        return super().agenerate(conversation, max_new_tokens, logits_processor=self._script(), **kw)

    def astream(self, conversation: Any, max_new_tokens: int = 256, **kw: Any) -> Any:
        return super().astream(conversation, max_new_tokens, logits_processor=self._script(), **kw)


def scripted_planted_guard(**options: Any) -> ScriptedGuard:
    """A :class:`ScriptedGuard` on the planted tiny Llama (head L1.H2 fires on "zorblax")."""
    from ohd_guard.testing.fixtures import planted_text_calibrated

    model, tok, profile = planted_text_calibrated()
    return ScriptedGuard(model, tok, profile, **options)
