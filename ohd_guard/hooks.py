"""Hooks that act only on the forward passes of the call that installed them.

A model is often shared: two guards, a guard and the application's own ``model(...)`` or
``generate`` calls, several threads or asyncio tasks. PyTorch hooks are global to a module, so a
hook installed for one screening would also capture, mask or read another caller's forward pass
(and replay into its KV cache). Every hook ohd-guard installs goes through :func:`scoped_hooks`:
it fires only in the context (thread / asyncio task, tracked by a :class:`contextvars.ContextVar`)
that entered the block, and it is removed when the block exits, also on exceptions and
cancellations.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator

from torch import nn

_active: ContextVar[frozenset[int]] = ContextVar("ohd_guard_active_hook_scopes", default=frozenset())
_ids = itertools.count()


class HookScope:
    """Registers hooks that fire only while their scope is active in the calling context."""

    def __init__(self) -> None:
        self.id = next(_ids)
        self._handles: list[Any] = []

    def active(self) -> bool:
        return self.id in _active.get()

    def forward_hook(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        """``fn(module, args, output)``; its return value replaces the output (None keeps it)."""
        self._handles.append(module.register_forward_hook(lambda m, a, out: fn(m, a, out) if self.active() else None))

    def forward_pre_hook(self, module: nn.Module, fn: Callable[..., Any], with_kwargs: bool = False) -> None:
        """``fn(module, args)`` (or ``fn(module, args, kwargs)``); a return value replaces the inputs."""
        hook: Callable[..., Any]
        if with_kwargs:
            hook = lambda m, a, kw: fn(m, a, kw) if self.active() else None  # noqa: E731
        else:
            hook = lambda m, a: fn(m, a) if self.active() else None  # noqa: E731
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextmanager
def scoped_hooks() -> Iterator[HookScope]:
    """Inside the block, hooks registered on the yielded scope act on this context's forward passes
    only; all of them are removed on exit."""
    scope = HookScope()
    token = _active.set(_active.get() | {scope.id})
    try:
        yield scope
    finally:
        _active.reset(token)
        scope.remove()
