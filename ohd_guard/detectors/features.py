"""Reads of one unmasked prefill at the last prompt token, and a small logistic regression.

SAHs needs every head's output, HiddenDetect every layer's residual state, both at the position
that produces the first answer token. One forward pass with hooks gives both, so one
:class:`PrefillReader` serves both detectors; inside :func:`shared_prefill` (used by evaluation) the
reads are memoised per model and conversation, so a second detector does not pay a second prefill.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit

from ohd_guard.adapters import ArchitectureAdapter
from ohd_guard.conversation import to_conversation
from ohd_guard.errors import InvalidInputError
from ohd_guard.screening import ConversationScreener, Reads, as_input, length_order
from ohd_guard.types import HeadRef

_CACHE: ContextVar[dict | None] = ContextVar("ohd_guard_prefill_cache", default=None)


@contextmanager
def shared_prefill() -> Iterator[dict]:
    """Memoise last-token reads inside the block (keyed by model and conversation content)."""
    token = _CACHE.set({})
    try:
        yield _CACHE.get()  # type: ignore[misc]
    finally:
        _CACHE.reset(token)


def conversation_key(conv: Any) -> str:
    """Content hash of a conversation (text and image pixels), for the prefill cache."""
    if isinstance(conv, str):
        return "s:" + hashlib.sha256(conv.encode("utf-8", "surrogatepass")).hexdigest()
    if not hasattr(conv, "digest"):
        try:
            conv = to_conversation(conv, allow_local_files=True)  # a cache key of data already accepted
        except Exception:  # noqa: BLE001 - only a cache key; fall back to the repr
            return "r:" + hashlib.sha256(repr(conv).encode()).hexdigest()
    return "c:" + conv.digest()


@dataclass
class LastToken:
    """Per-prompt reads at the last prompt position."""

    heads: np.ndarray  # [N, L, H, d] each head's output (the input of o_proj, per head)
    layers: np.ndarray  # [N, L, D] each decoder layer's output (residual stream, before the final norm)
    pooled: np.ndarray  # [N, L, D] each decoder layer's output averaged over the prompt's positions
    maxed: np.ndarray  # [N, L, D] each decoder layer's output, per dimension its maximum over the prompt
    content_pooled: np.ndarray  # [N, L, D] averaged over the user/tool-result text positions only
    content_maxed: np.ndarray  # [N, L, D] per dimension the maximum over the user/tool-result text positions


class PrefillReader:
    """Every head's output and every layer's state at the last prompt token, read from ONE unmasked
    prefill through the guard's own screening path (:class:`~ohd_guard.screening.ConversationScreener`:
    same conversion, limits, rendering and capture hooks), so a probe is fitted on exactly what the
    guard will read when it screens."""

    def __init__(self, model: Any, processor: Any, adapter: ArchitectureAdapter | None = None):
        self.model, self.processor = model, processor
        self.stage = ConversationScreener(model, processor, None, allow_local_files=True)
        self.adapter = adapter or self.stage.screener.adapter
        L, H = self.adapter.num_layers, self.adapter.num_heads
        self._reads = Reads(heads=tuple(HeadRef(layer=i, head=h) for i in range(L) for h in range(H)),
                            layers=tuple(range(L)), pooled=tuple(range(L)), maxed=tuple(range(L)),
                            content_pooled=tuple(range(L)), content_maxed=tuple(range(L)))  # fmt: skip

    @torch.no_grad()
    def _forward(self, convs: list[Any]) -> list[tuple[np.ndarray, ...]]:
        L, H = self.adapter.num_layers, self.adapter.num_heads
        got, _, _ = self.stage.prefill([self.stage.convert(c) for c in convs], self._reads, keep_cache=False)
        hs = torch.stack([torch.stack([got.heads[HeadRef(layer=i, head=h)] for h in range(H)], 1) for i in range(L)], 1)
        ls = torch.stack([got.layers[i] for i in range(L)], 1)
        ps = torch.stack([got.pooled[i] for i in range(L)], 1)
        ms = torch.stack([got.maxed[i] for i in range(L)], 1)
        cps = torch.stack([got.content_pooled[i] for i in range(L)], 1)
        cms = torch.stack([got.content_maxed[i] for i in range(L)], 1)
        arrays = [t.cpu().numpy() for t in (hs, ls, ps, ms, cps, cms)]  # [B, L, H, d], then [B, L, D] x5
        return [tuple(a[b] for a in arrays) for b in range(len(convs))]

    def read(self, items: Sequence[Any], batch_size: int = 8) -> LastToken:
        """Last-token reads of ``items`` (memoised inside :func:`shared_prefill`)."""
        convs = [as_input(x) for x in items]
        cache = _CACHE.get()
        if cache is None:
            return _stack(self._read(convs, batch_size))
        keys = [(id(self.model), conversation_key(c)) for c in convs]
        missing = {k: c for k, c in zip(keys, convs) if k not in cache}
        for k, row in zip(missing, self._read(list(missing.values()), batch_size)):
            cache[k] = row
        return _stack([cache[k] for k in keys])

    def _read(self, convs: list[Any], batch_size: int) -> list[tuple[np.ndarray, ...]]:
        rows: list = [None] * len(convs)
        order = length_order(convs)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            for i, r in zip(idx, self._forward([convs[i] for i in idx])):
                rows[i] = r
        return rows


def _stack(rows: list[tuple[np.ndarray, ...]]) -> LastToken:
    if not rows:
        raise InvalidInputError("no conversations to read")
    return LastToken(*(np.stack([r[k] for r in rows]) for k in range(6)))


# -- logistic regression ------------------------------------------------------------------------
@dataclass
class Logistic:
    """A standardised, L2-regularised, class-balanced logistic regression: ``z = w . (x - mean) / scale + b``.

    Class-balanced weights make ``z = 0`` (probability 0.5) the equal-priors decision, like the
    KDE crossing of One-head Defense.
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def decision(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale) @ self.coef + self.intercept

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> "Logistic":
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        mean, scale = X.mean(0), X.std(0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        Z = (X - mean) / scale
        sign = np.where(y == 1, 1.0, -1.0)
        n1, n0 = max(int((y == 1).sum()), 1), max(int((y == 0).sum()), 1)
        w = np.where(y == 1, 0.5 / n1, 0.5 / n0)

        def obj(p: np.ndarray) -> tuple[float, np.ndarray]:
            coef, b = p[:-1], p[-1]
            m = sign * (Z @ coef + b)
            g = -sign * w * expit(-m)
            loss = float(w @ np.logaddexp(0.0, -m) + 0.5 * l2 * coef @ coef)
            return loss, np.r_[Z.T @ g + l2 * coef, g.sum()]

        res = minimize(obj, np.zeros(Z.shape[1] + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500})
        return cls(mean, scale, res.x[:-1], float(res.x[-1]))


def _standardise(X: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and scale over ``train`` rows, per probe: X is [K, n, d]."""
    mean = X[:, train].mean(1, keepdim=True)
    scale = X[:, train].std(1, unbiased=False, keepdim=True)
    return mean, torch.where(scale > 1e-12, scale, torch.ones_like(scale))


def fit_many(Z: torch.Tensor, y: torch.Tensor, l2: float, iters: int = 30) -> torch.Tensor:
    """K independent logistic regressions at once by damped Newton steps: Z [K, n, d] (standardised),
    returns [K, d + 1] (coefficients, intercept last). Same objective as :meth:`Logistic.fit`.

    Ranking hundreds of heads with one scipy fit each takes minutes on a CPU; the batched Newton
    solve (K small (d+1)x(d+1) systems) takes a second.
    """
    K, n, d = Z.shape
    A = torch.cat([Z, torch.ones(K, n, 1, dtype=Z.dtype)], 2)  # [K, n, d+1]
    sign = torch.where(y == 1, 1.0, -1.0).to(Z.dtype)
    n1, n0 = max(int((y == 1).sum()), 1), max(int((y == 0).sum()), 1)
    w = torch.where(y == 1, 0.5 / n1, 0.5 / n0).to(Z.dtype)
    reg = torch.full((d + 1,), l2, dtype=Z.dtype)
    reg[-1] = 0.0
    theta = torch.zeros(K, d + 1, dtype=Z.dtype)

    def loss(t: torch.Tensor) -> torch.Tensor:
        m = sign * (A @ t.unsqueeze(-1)).squeeze(-1)
        return (w * torch.nn.functional.softplus(-m)).sum(1) + 0.5 * (reg * t * t).sum(1)

    cur = loss(theta)
    for _ in range(iters):
        m = sign * (A @ theta.unsqueeze(-1)).squeeze(-1)
        p = torch.sigmoid(-m)
        grad = (A.transpose(1, 2) @ (-sign * w * p).unsqueeze(-1)).squeeze(-1) + reg * theta
        h = w * p * (1 - p)
        H = (A * h.unsqueeze(-1)).transpose(1, 2) @ A + torch.diag(reg + 1e-9)
        step = torch.linalg.solve(H, grad.unsqueeze(-1)).squeeze(-1)
        t = torch.ones(K, 1, dtype=Z.dtype)
        for _ in range(20):  # halve the step until the loss does not rise (per probe)
            new = loss(theta - t * step)
            bad = new > cur + 1e-12
            if not bad.any():
                break
            t = torch.where(bad.unsqueeze(1), t / 2, t)
        theta = theta - t * step
        prev, cur = cur, loss(theta)
        if float((prev - cur).abs().max()) < 1e-10:
            break
    return theta


def out_of_fold_many(X: np.ndarray, y: np.ndarray, l2: float, folds: list[np.ndarray]) -> np.ndarray:
    """Cross-validated decision values of K probes at once: X [K, n, d] -> [K, n]."""
    Xt = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    yt = torch.as_tensor(np.asarray(y))
    out = torch.zeros(Xt.shape[0], Xt.shape[1], dtype=torch.float64)
    for test in folds:
        train = torch.as_tensor(np.setdiff1d(np.arange(len(y)), test))
        mean, scale = _standardise(Xt, train)
        Z = (Xt - mean) / scale
        theta = fit_many(Z[:, train], yt[train], l2)
        te = torch.as_tensor(test)
        out[:, te] = torch.einsum("knd,kd->kn", Z[:, te], theta[:, :-1]) + theta[:, -1:]
    return out.numpy()


def stratified_folds(y: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """``k`` test-index folds, each class spread evenly over them (deterministic for ``seed``)."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        for j, i in enumerate(idx):
            folds[j % k].append(int(i))
    return [np.array(sorted(f), dtype=int) for f in folds if f]


def out_of_fold(X: np.ndarray, y: np.ndarray, l2: float, folds: list[np.ndarray]) -> np.ndarray:
    """Cross-validated decision values: each row scored by a probe that never saw it."""
    out = np.zeros(len(y))
    for test in folds:
        train = np.setdiff1d(np.arange(len(y)), test)
        out[test] = Logistic.fit(X[train], y[train], l2).decision(X[test])
    return out


def balanced_accuracy(decision: np.ndarray, y: np.ndarray) -> float:
    pred = decision > 0
    return 0.5 * (float(pred[y == 1].mean()) + float((~pred[y == 0]).mean()))


def log_loss(decision: np.ndarray, y: np.ndarray) -> float:
    """Class-balanced mean log-loss of decision values (logits)."""
    sign = np.where(y == 1, 1.0, -1.0)
    m = np.logaddexp(0.0, -sign * decision)
    return 0.5 * (float(m[y == 1].mean()) + float(m[y == 0].mean()))
