"""Residual-stream probes: a logistic probe on a few decoder layers' states, read from the screening
prefill at the last prompt token (``pool="last"``), averaged over every prompt position
(``pool="mean"``) or max-pooled per dimension over them (``pool="max"``), or the same two over the
positions of the user and tool-result messages' text only (``"content-mean"``, ``"content-max"``:
the operator's system prompt, tool definitions and the template's tokens left out).

The 2026 residual-probe results on 0.5-1.3B hosts (``../shared/docs/anchors.md``) and the token-pooling
results on ToxicChat motivate both: the residual stream carries more than a few heads' outputs, and
pooling over the whole prompt keeps a request visible when a long benign context (tool definitions,
RAG passages, chat history) separates it from the last token. Both cost nothing beyond the prefill
generation needs anyway: the hooks copy one [hidden] vector per layer and row. Layers are chosen by
the cross-validated log-loss of a one-layer probe; the threshold is the probability 0.5, the KDE
crossing of out-of-fold scores, or the score that keeps a target false-positive rate on the benign
calibration prompts (``threshold=0.01``).
"""

from __future__ import annotations

import time
from typing import Any, Literal, Sequence, get_args

import numpy as np
from pydantic import Field, model_validator

from ohd_guard.detectors.base import Detector, check_sets, probe_fields
from ohd_guard.detectors.features import (
    Logistic,
    PrefillReader,
    log_loss,
    out_of_fold,
    out_of_fold_many,
    stratified_folds,
)
from ohd_guard.detectors.probes import ProbeProfile
from ohd_guard.errors import CalibrationError, InvalidInputError
from ohd_guard.screening import PrefillReads, Reads

Pool = Literal["last", "mean", "max", "content-mean", "content-max"]
POOLS: tuple[str, ...] = get_args(Pool)
READ_FIELD: dict[str, str] = {"last": "layers", "mean": "pooled", "max": "maxed", "content-mean": "content_pooled",
                              "content-max": "content_maxed"}
"""The field each pool is read into: the same name on ``Reads``, ``PrefillReads`` and ``LastToken``."""


class ResidualProfile(ProbeProfile):
    """A residual-stream probe: which layers, how their states are pooled, the probe's weights."""

    kind: Literal["residual"] = "residual"
    layers: list[int] = Field(min_length=1)
    pool: Pool
    hidden: int = Field(ge=1)
    layer_cv_log_loss: list[float]
    """Cross-validated log-loss of a one-layer probe on each chosen layer (the ranking criterion)."""

    @model_validator(mode="after")
    def _is_a_detector(self) -> ResidualProfile:
        if any(not 0 <= i < self.model.num_layers for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers} are not distinct layers of the model's {self.model.num_layers}")
        self.check_probe(len(self.layers) * self.hidden)
        self.check_detector()
        return self

    @classmethod
    def fit(cls, model: Any, processor: Any, unsafe: Sequence[Any], safe: Sequence[Any],
            **options: Any) -> ResidualProfile:
        """Fit a residual probe (options: :class:`ResidualProbe`'s) and return its profile."""
        return ResidualProbe(**options).fit(model, processor, unsafe, safe).profile


class ResidualProbe(Detector):
    """Logistic probe on ``top_k`` decoder layers' residual states (last token or mean over the prompt).

    Args:
        pool: ``"last"`` (the state that produces the first answer token), ``"mean"`` (averaged over
            every prompt position) or ``"max"`` (per dimension the maximum over positions, so a signal
            on one token deep inside a long benign context is not averaged away); ``"content-mean"`` /
            ``"content-max"``: the same over the user and tool-result text only, so tool definitions
            and operator prompts, the same for every request, do not dilute or dominate the pool.
        top_k: how many layers (best single-layer cross-validated log-loss first).
        threshold: ``"prob"`` (0: probability 0.5 under equal priors), ``"kde"`` (crossing of the
            out-of-fold score densities) or a target false-positive rate on the safe prompts (``0.01``).
    """

    Profile = ResidualProfile
    kind = "residual"

    def __init__(self, pool: Pool = "last", top_k: int = 2, folds: int = 5, layer_l2: float = 1.0,
                 l2_grid: Sequence[float] = (0.1, 1.0, 10.0, 100.0), threshold: Literal["prob", "kde"] | float = "prob",
                 batch_size: int = 8, seed: int = 0):
        super().__init__()
        if pool not in POOLS:
            raise InvalidInputError(f"pool must be one of {', '.join(map(repr, POOLS))}, not {pool!r}")
        if top_k < 1 or folds < 2:
            raise InvalidInputError(f"need top_k >= 1 and folds >= 2, got {top_k} and {folds}")
        self.pool, self.top_k, self.folds, self.layer_l2, self.l2_grid = pool, top_k, folds, layer_l2, tuple(l2_grid)
        self.threshold_rule, self.batch_size, self.seed = threshold, batch_size, seed
        self._probe: Logistic | None = None
        self.oof_: np.ndarray | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"Residual ({self.pool})"

    def states(self, reads: Any) -> np.ndarray:
        """[N, L, D] of a :class:`~ohd_guard.detectors.features.LastToken` read, as this probe pools."""
        return getattr(reads, READ_FIELD[self.pool])

    def fit(self, model: Any, processor: Any, unsafe: Sequence[Any], safe: Sequence[Any]) -> ResidualProbe:
        check_sets(unsafe, safe)
        t0 = time.perf_counter()
        states = self.states(PrefillReader(model, processor).read(list(unsafe) + list(safe), self.batch_size))
        y = np.r_[np.ones(len(unsafe), int), np.zeros(len(safe), int)]
        if float(np.ptp(states, axis=0).max()) < 1e-9:
            raise CalibrationError(f"the {self.pool} states are constant over the calibration prompts: "
                                  "this read cannot see what separates them")
        folds = stratified_folds(y, min(self.folds, int(min((y == 1).sum(), (y == 0).sum()))), self.seed)
        per_layer = out_of_fold_many(states.transpose(1, 0, 2), y, self.layer_l2, folds)  # [L, N]
        ranked = sorted(range(states.shape[1]), key=lambda i: (log_loss(per_layer[i], y), i))[: self.top_k]
        X = states[:, ranked].reshape(len(y), -1)
        cv = {l2: out_of_fold(X, y, l2, folds) for l2 in self.l2_grid}
        l2 = min(self.l2_grid, key=lambda v: (log_loss(cv[v], y), -v))
        oof = cv[l2]
        probe = Logistic.fit(X, y, l2)
        profile = ResidualProfile(
            layers=ranked, pool=self.pool, hidden=int(states.shape[-1]),
            layer_cv_log_loss=[log_loss(per_layer[i], y) for i in ranked],
            **probe_fields(model, processor, probe, l2, oof, y, self.threshold_rule, time.perf_counter() - t0,
                           list(unsafe) + list(safe)),
        )
        self._bind(model, processor, profile)
        self.oof_ = oof
        return self

    def _bind(self, model: Any, processor: Any, profile: Any) -> None:
        super()._bind(model, processor, profile)
        self._probe = profile.logistic()

    @classmethod
    def _configured(cls, profile: ResidualProfile) -> ResidualProbe:  # type: ignore[override]
        rule: Any = "prob" if profile.threshold_method == "probability_0.5" else "kde"
        return cls(pool=profile.pool, top_k=len(profile.layers), threshold=rule)

    # -- the guard's side --------------------------------------------------------------------------
    def reads(self) -> Reads:
        self._require_fitted()
        layers = tuple(self.profile.layers)
        return Reads(**{READ_FIELD[self.profile.pool]: layers})  # type: ignore[arg-type]

    def score_reads(self, reads: PrefillReads) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The probe's log-odds; details give each layer's share of it."""
        src = getattr(reads, READ_FIELD[self.profile.pool])
        layers = self.profile.layers
        X = np.concatenate([src[i].cpu().numpy().astype(np.float64) for i in layers], axis=1)
        p = self._probe
        assert p is not None
        contrib = ((X - p.mean) / p.scale * p.coef).reshape(len(X), len(layers), -1).sum(-1)  # [B, layers]
        scores = contrib.sum(1) + p.intercept
        return scores, [{"layers": {str(i): round(float(c), 4) for i, c in zip(layers, row)}} for row in contrib]

    def explain(self, score: float, flagged: bool, risk: float) -> str:
        return (f"residual probe ({self.profile.pool}) log-odds {score:.3f} {'>' if flagged else '<='} threshold "
                f"{self.threshold:.3f} at layers {', '.join(map(str, self.profile.layers))} (risk {risk:.2f}): "
                f"{'flagged as unsafe' if flagged else 'passed'}")
