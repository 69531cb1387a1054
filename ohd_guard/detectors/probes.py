"""Detectors that read the unmasked prefill only: safety-attention-head probes (SAHs) and HiddenDetect.

Both cost one forward pass that generation runs anyway, and share it (see
:class:`~ohd_guard.detectors.features.PrefillReader`).
"""

from __future__ import annotations

import time
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import model_validator

from ohd_guard.adapters import get_adapter
from ohd_guard.detectors.base import (
    Detector,
    check_sets,
    data_hash,
    evaluate_scores,
    probe_fields,
    probe_threshold,
    risk_or_none,
)
from ohd_guard.detectors.features import (
    Logistic,
    PrefillReader,
    balanced_accuracy,
    log_loss,
    out_of_fold,
    out_of_fold_many,
    stratified_folds,
)
from ohd_guard.errors import CalibrationError, InvalidInputError
from ohd_guard.metrics import auroc
from ohd_guard.profile import ModelFingerprint, Profile, library_version
from ohd_guard.rendering import tokenizer_of
from ohd_guard.screening import PrefillReads, Reads
from ohd_guard.types import HeadRef


class ProbeProfile(Profile):
    """What every linear-probe kind saves: ``log-odds = coef . (x - mean) / scale + intercept`` over its
    features, the L2 strength chosen by cross-validation, and the out-of-fold AUROC of the fit."""

    l2: float
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    cv_auroc: float
    """AUROC of the out-of-fold decision values of the final probe on the calibration prompts."""

    def check_probe(self, n_features: int) -> None:
        """The weights must fit the features and be able to move the score (raises ``ValueError``)."""
        sizes = {len(self.mean), len(self.scale), len(self.coef)}
        if sizes != {n_features}:
            raise ValueError(f"probe weights have sizes {sorted(sizes)}, its features {n_features}")
        if not np.all(np.isfinite(self.mean)) or not np.all(np.isfinite(self.coef)):
            raise ValueError("probe weights are not finite")
        scale = np.asarray(self.scale, dtype=float)
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0) or np.any(scale > 1e6):
            raise ValueError("probe scales must be positive and finite (a huge scale silences its feature)")
        if not np.any(np.asarray(self.coef) != 0):
            raise ValueError("probe weights are all zero: the score would never depend on the conversation")

    def logistic(self) -> Logistic:
        """The probe as a :class:`~ohd_guard.detectors.features.Logistic`."""
        return Logistic(np.array(self.mean), np.array(self.scale), np.array(self.coef), self.intercept)


# -- SAHs ---------------------------------------------------------------------------------------
class SAHsProfile(ProbeProfile):
    """The SAHs probe: which heads, their standardisation and logistic weights."""

    kind: Literal["sahs"] = "sahs"
    heads: list[HeadRef]
    head_cv_accuracy: list[float]
    """Cross-validated balanced accuracy of each chosen head's own probe (the ranking criterion)."""
    head_dim: int

    @model_validator(mode="after")
    def _is_a_detector(self) -> "SAHsProfile":
        self.check_heads(self.heads)
        self.check_probe(len(self.heads) * self.head_dim)
        self.check_detector()
        return self

    @classmethod
    def fit(cls, model: Any, processor: Any, unsafe: Sequence[Any], safe: Sequence[Any], **options: Any) -> "SAHsProfile":
        """Fit SAHs (options: :class:`SAHs`'s) and return its profile."""
        return SAHs(**options).fit(model, processor, unsafe, safe).profile



class SAHs(Detector):
    """Safety attention heads: a linear probe on the last-token outputs of the most telling heads.

    Every head's output (its slice of the ``o_proj`` input) at the last prompt token is read in one
    unmasked prefill. Heads are ranked by the cross-validated balanced accuracy of a logistic probe
    on that head alone (ties: lower log-loss); the ``top_k`` heads' outputs are concatenated and a
    logistic regression on them is the detector, its L2 strength chosen by cross-validated
    log-loss. Score = the probe's log-odds; threshold 0 (probability 0.5 under equal priors), the
    KDE crossing of the out-of-fold scores, or a target false-positive rate on the safe calibration
    prompts (``threshold=0.01``).
    """

    Profile = SAHsProfile
    name = "SAHs"
    kind = "sahs"

    def __init__(
        self, top_k: int = 16, folds: int = 5, head_l2: float = 0.1, l2_grid: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0),
        threshold: Literal["prob", "kde"] | float = "prob", batch_size: int = 8, seed: int = 0,
        select_top_k: Sequence[int] = (),
    ):
        super().__init__()
        if top_k < 1 or folds < 2 or any(k < 1 for k in select_top_k):
            raise InvalidInputError(f"need top_k >= 1 (and every select_top_k) and folds >= 2, got {top_k}, "
                                    f"{list(select_top_k)} and {folds}")
        self.top_k, self.folds, self.head_l2, self.l2_grid = top_k, folds, head_l2, tuple(l2_grid)
        self.threshold_rule, self.batch_size, self.seed = threshold, batch_size, seed
        self.select_top_k = tuple(sorted(set(select_top_k)))
        self._probe: Logistic | None = None
        self.oof_: np.ndarray | None = None
        """Out-of-fold calibration scores of the last fit (unsafe first), for a fused detector on top."""
        self.selection_: list[dict[str, Any]] = []
        """With ``select_top_k``: per candidate head count, its L2 and dev log-loss (and the dev scores)."""
        self.dev_mask_: np.ndarray | None = None

    def rank_heads(self, heads: np.ndarray, y: np.ndarray) -> list[tuple[float, float, int, int]]:
        """``(cv balanced accuracy, cv log-loss, layer, head)`` for every head, best first."""
        folds = stratified_folds(y, min(self.folds, int(min((y == 1).sum(), (y == 0).sum()))), self.seed)
        N, L, H, d = heads.shape
        oof = out_of_fold_many(heads.reshape(N, L * H, d).transpose(1, 0, 2), y, self.head_l2, folds)  # [L*H, N]
        rows = [(balanced_accuracy(oof[k], y), log_loss(oof[k], y), k // H, k % H) for k in range(L * H)]
        return sorted(rows, key=lambda r: (-r[0], r[1], r[2], r[3]))

    def fit(self, model, processor, unsafe: Sequence[Any], safe: Sequence[Any]) -> "SAHs":
        check_sets(unsafe, safe)
        t0 = time.perf_counter()
        feats = PrefillReader(model, processor).read(list(unsafe) + list(safe), self.batch_size).heads
        return self.fit_heads(model, processor, feats, unsafe, safe, t0)

    def fit_heads(self, model, processor, feats: np.ndarray, unsafe: Sequence[Any], safe: Sequence[Any],
                  started: float | None = None) -> "SAHs":
        """Fit on every head's last-token output already read (``PrefillReader(...).read(unsafe + safe).heads``,
        ``[N, layers, heads, head_dim]``): probe settings compared on one set of reads, without a prefill each."""
        check_sets(unsafe, safe)
        t0 = time.perf_counter() if started is None else started
        y = np.r_[np.ones(len(unsafe), int), np.zeros(len(safe), int)]
        if feats.ndim != 4 or feats.shape[0] != len(y):
            raise InvalidInputError(f"expected heads of shape [{len(y)}, layers, heads, head_dim], got {feats.shape}")
        if self.select_top_k:
            self.top_k = self.select_heads(feats, y, list(unsafe) + list(safe))
        ranked = self.rank_heads(feats, y)[: self.top_k]
        heads = [HeadRef(layer=r[2], head=r[3]) for r in ranked]
        X = self._design(feats, heads)
        l2, oof = self._cv_l2(X, y)
        probe = Logistic.fit(X, y, l2)
        profile = SAHsProfile(
            heads=heads, head_cv_accuracy=[r[0] for r in ranked], head_dim=int(feats.shape[-1]),
            **probe_fields(model, processor, probe, l2, oof, y, self.threshold_rule, time.perf_counter() - t0,
                           list(unsafe) + list(safe)),
        )
        self._bind(model, processor, profile)
        self.oof_ = oof
        return self

    def _cv_l2(self, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """The L2 strength of ``l2_grid`` with the lowest out-of-fold log-loss, and its out-of-fold scores."""
        folds = stratified_folds(y, min(self.folds, int(min((y == 1).sum(), (y == 0).sum()))), self.seed)
        cv = {l2: out_of_fold(X, y, l2, folds) for l2 in self.l2_grid}
        l2 = min(self.l2_grid, key=lambda v: (log_loss(cv[v], y), -v))
        return l2, cv[l2]

    def select_heads(self, feats: np.ndarray, y: np.ndarray, items: Sequence[Any]) -> int:
        """The head count of ``select_top_k`` to fit with: each fitted (heads ranked, L2 chosen) on the fit
        items outside a dev split of a quarter of the *requests* (:func:`ohd_guard.contexts.request_dev_mask`:
        a prompt's bare and placed copies on one side) and scored on the dev side by mean log-loss; the
        lowest wins, and within 0.005 of it the fewest heads. Chosen on fit data only: picking the count on
        evaluation sets would report a selected, not a measured, result."""
        from ohd_guard.contexts import request_dev_mask

        dev = np.array(request_dev_mask(items, 0.25, self.seed))
        if any(len(set(y[side].tolist())) < 2 for side in (dev, ~dev)):
            raise CalibrationError("too few calibration requests to hold back a dev split with both classes; "
                                   "fix the number of heads instead of select_top_k")
        ranked = self.rank_heads(feats[~dev], y[~dev])
        self.selection_, self.dev_mask_ = [], dev
        for k in (k for k in self.select_top_k if k <= len(ranked)):
            X = self._design(feats, [HeadRef(layer=r[2], head=r[3]) for r in ranked[:k]])
            l2, _ = self._cv_l2(X[~dev], y[~dev])
            z = Logistic.fit(X[~dev], y[~dev], l2).decision(X[dev])
            loss = float(np.mean(np.logaddexp(0.0, -np.where(y[dev] == 1, 1.0, -1.0) * z)))
            self.selection_.append({"heads": k, "l2": l2, "dev_log_loss": loss, "dev_scores": z})
        if not self.selection_:
            raise CalibrationError(f"no candidate head count {list(self.select_top_k)} is at most the model's "
                                   f"{len(ranked)} heads")
        best = min(r["dev_log_loss"] for r in self.selection_)
        return min(r["heads"] for r in self.selection_ if r["dev_log_loss"] <= best + 0.005)

    @staticmethod
    def _design(feats: np.ndarray, heads: Sequence[HeadRef]) -> np.ndarray:
        return np.concatenate([feats[:, h.layer, h.head] for h in heads], axis=1)

    def _bind(self, model, processor, profile) -> None:
        super()._bind(model, processor, profile)
        self._probe = profile.logistic()

    # -- the guard's side: the probe's log-odds from the screening prefill --------------------------
    def reads(self) -> Reads:
        self._require_fitted()
        return Reads(heads=tuple(self.profile.heads))

    @property
    def verdict_heads(self) -> tuple[HeadRef, ...]:
        return tuple(self.profile.heads) if self.profile is not None else ()

    def score_reads(self, reads: PrefillReads) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The probe's log-odds that each conversation is unsafe; details name the heads that pushed
        each score up most (their summed contribution ``w . z`` to the log-odds)."""
        heads = self.profile.heads
        X = np.concatenate([reads.heads[h].cpu().numpy().astype(np.float64) for h in heads], axis=1)
        p: Logistic = self._probe  # type: ignore[assignment]
        contrib = ((X - p.mean) / p.scale * p.coef).reshape(len(X), len(heads), -1).sum(-1)  # [B, K]
        scores = contrib.sum(1) + p.intercept
        details = []
        for row in contrib:
            top = np.argsort(-row, kind="stable")[:3]
            details.append({"top_heads": [{"head": str(heads[k]), "log_odds": round(float(row[k]), 4)} for k in top]})
        return scores, details

    def explain(self, score: float, flagged: bool, risk: float) -> str:
        return (f"SAHs probe log-odds {score:.3f} {'>' if flagged else '<='} threshold {self.threshold:.3f} over "
                f"{len(self.verdict_heads)} heads (risk {risk:.2f}): {'flagged as unsafe' if flagged else 'passed'}")

    @classmethod
    def _configured(cls, profile: SAHsProfile) -> "SAHs":  # type: ignore[override]
        return cls(top_k=len(profile.heads), threshold="kde" if profile.threshold_method != "probability_0.5" else "prob")


# -- HiddenDetect -------------------------------------------------------------------------------
REFUSAL_WORDS: tuple[str, ...] = (
    "Sorry", "sorry", "cannot", "can't", "unable", "illegal", "unethical", "harmful", "apologize", "I", "As",
    "Unfortunately", "unfortunately", "not", "No", "refuse", "inappropriate", "dangerous",
)
"""Words whose first token marks a refusal (HiddenDetect's refusal vector, extended a little)."""


def refusal_token_ids(processor: Any, words: Sequence[str] = REFUSAL_WORDS) -> list[int]:
    """First token of each word, written alone and after a space (how it starts an answer vs mid-text)."""
    tok = tokenizer_of(processor)
    ids = set()
    for w in words:
        for form in (w, " " + w):
            enc = tok.encode(form, add_special_tokens=False)
            if enc:
                ids.add(int(enc[0]))
    if not ids:
        raise InvalidInputError("no refusal word could be tokenized")
    return sorted(ids)


class HiddenDetectProfile(Profile):
    """HiddenDetect: the refusal tokens and the band of layers whose logit-lens cosines are summed."""

    kind: Literal["hiddendetect"] = "hiddendetect"
    refusal_words: list[str]
    refusal_token_ids: list[int]
    band: tuple[int, int]
    """First and last decoder layer (0-based, inclusive) whose refusal cosines are summed."""
    band_auroc: float
    layer_auroc: list[float]
    """AUROC of each single layer's refusal cosine on the calibration prompts."""

    @model_validator(mode="after")
    def _is_a_detector(self) -> "HiddenDetectProfile":
        a, b = self.band
        if not 0 <= a <= b < self.model.num_layers:
            raise ValueError(f"band {self.band} is not a range of the model's {self.model.num_layers} layers")
        if not self.refusal_token_ids or any(i < 0 for i in self.refusal_token_ids):
            raise ValueError("refusal_token_ids must be non-empty token ids (>= 0)")
        self.check_detector()
        return self

    @classmethod
    def fit(cls, model: Any, processor: Any, unsafe: Sequence[Any], safe: Sequence[Any],
            **options: Any) -> "HiddenDetectProfile":
        """Fit HiddenDetect (options: :class:`HiddenDetect`'s) and return its profile."""
        return HiddenDetect(**options).fit(model, processor, unsafe, safe).profile



class HiddenDetect(Detector):
    """Refusal signal in the logit lens: summed over the band of layers that separates best.

    At the last prompt token of every decoder layer, the residual state is put through the final
    norm and the LM head (logit lens); its cosine with a multi-hot vector over refusal words' first
    tokens says how much that layer already "wants" to refuse. The score sums the cosines over a
    contiguous band of layers, the band with the highest calibration AUROC (at least ``min_band``
    layers). Threshold: the KDE crossing of the calibration scores, or a target false-positive rate
    on the safe calibration prompts (``threshold=0.05``; the score has no fitted weights, so in-sample).
    """

    Profile = HiddenDetectProfile
    name = "HiddenDetect"
    kind = "hiddendetect"

    def __init__(self, words: Sequence[str] = REFUSAL_WORDS, min_band: int = 1, batch_size: int = 8,
                 chunk_rows: int = 64, threshold: Literal["kde"] | float = "kde"):
        super().__init__()
        if min_band < 1:
            raise InvalidInputError(f"min_band must be >= 1, got {min_band}")
        self.words, self.min_band, self.batch_size, self.chunk_rows = list(words), min_band, batch_size, chunk_rows
        self.threshold_rule = threshold
        self._ids: list[int] | None = None

    @torch.no_grad()
    def layer_cosines(self, convs: Sequence[Any]) -> np.ndarray:
        """[N, L] cosine of each layer's logit-lens logits with the refusal vector, at the last token."""
        if self._ids is None:
            raise CalibrationError("HiddenDetect is not fitted")
        reader = PrefillReader(self.model, self.processor)
        layers = reader.read(convs, self.batch_size).layers  # [N, L, D]
        flat = torch.as_tensor(layers.reshape(-1, layers.shape[-1]))
        return self._cosines(flat, reader.adapter).reshape(layers.shape[0], layers.shape[1])

    @torch.no_grad()
    def _cosines(self, states: torch.Tensor, adapter: Any) -> np.ndarray:
        """Refusal cosine [rows] of residual states [rows, D] through the final norm and the LM head."""
        param = next(self.model.parameters())
        head = self.model.get_output_embeddings()
        ids = torch.tensor(self._ids, device=param.device)
        out = []
        for s in range(0, states.shape[0], self.chunk_rows):
            h = adapter.final_norm(states[s : s + self.chunk_rows].to(param.device, param.dtype))
            logits = head(h).float()
            out.append((logits[:, ids].sum(-1) / (logits.norm(dim=-1).clamp_min(1e-12) * len(ids) ** 0.5)).cpu())
        return torch.cat(out).numpy().astype(np.float64)

    @staticmethod
    def best_band(cu: np.ndarray, cs: np.ndarray, min_band: int = 1) -> tuple[tuple[int, int], float, list[float]]:
        """The contiguous band of layers whose summed cosine has the highest AUROC.

        Ties (common when several bands separate the calibration set perfectly) go to the larger
        standardised mean difference, which drops layers that add only noise.
        """
        L = cu.shape[1]
        labels = np.r_[np.ones(len(cu)), np.zeros(len(cs))]
        both = np.concatenate([cu, cs])
        cum = np.concatenate([np.zeros((len(both), 1)), np.cumsum(both, axis=1)], axis=1)
        best: tuple[float, float, int, int] | None = None
        for a in range(L):
            for b in range(a + min_band - 1, L):
                x = cum[:, b + 1] - cum[:, a]
                pos, neg = x[: len(cu)], x[len(cu) :]
                sd = np.sqrt((pos.var() + neg.var()) / 2)
                sep = (pos.mean() - neg.mean()) / sd if sd > 0 else 0.0
                key = (round(auroc(x, labels), 9), float(sep), a, b)
                if best is None or key[:2] > best[:2]:
                    best = key
        assert best is not None
        return (best[2], best[3]), float(best[0]), [auroc(both[:, i], labels) for i in range(L)]

    def fit(self, model, processor, unsafe: Sequence[Any], safe: Sequence[Any]) -> "HiddenDetect":
        check_sets(unsafe, safe)
        t0 = time.perf_counter()
        self.model, self.processor = model, processor
        self._ids = refusal_token_ids(processor, self.words)
        cu, cs = self.layer_cosines(list(unsafe)), self.layer_cosines(list(safe))
        band, area, per_layer = self.best_band(cu, cs, self.min_band)
        su, ss = cu[:, band[0] : band[1] + 1].sum(1), cs[:, band[0] : band[1] + 1].sum(1)
        threshold, method = probe_threshold(self.threshold_rule, np.r_[su, ss],
                                            np.r_[np.ones(len(su), int), np.zeros(len(ss), int)], scored="")
        profile = HiddenDetectProfile(
            library_version=library_version(), model=ModelFingerprint.of(model, processor), threshold=threshold,
            threshold_method=method, n_unsafe=len(unsafe), n_safe=len(safe), refusal_words=self.words,
            refusal_token_ids=self._ids, band=band, band_auroc=area, layer_auroc=per_layer,
            seconds=round(time.perf_counter() - t0, 2), risk=risk_or_none(su, ss),
            data_hash=data_hash(list(unsafe) + list(safe)), metrics=[evaluate_scores("calibration", su, ss, threshold)],
        )
        self._bind(model, processor, profile)
        return self

    def _bind(self, model, processor, profile) -> None:
        vocab = model.get_output_embeddings().weight.shape[0]
        if max(profile.refusal_token_ids) >= vocab:
            raise InvalidInputError(f"refusal token id {max(profile.refusal_token_ids)} is outside the model's "
                                    f"vocabulary of {vocab}")
        super()._bind(model, processor, profile)
        self._ids = list(profile.refusal_token_ids)
        self._adapter = get_adapter(model)

    # -- the guard's side: refusal cosines of the band's layer states from the screening prefill ----
    def reads(self) -> Reads:
        self._require_fitted()
        a, b = self.profile.band
        return Reads(layers=tuple(range(a, b + 1)))

    def score_reads(self, reads: PrefillReads) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Refusal cosine summed over the chosen band of layers."""
        a, b = self.profile.band
        states = torch.stack([reads.layers[i] for i in range(a, b + 1)], 1)  # [B, band, D]
        cos = self._cosines(states.reshape(-1, states.shape[-1]), self._adapter).reshape(states.shape[0], -1)
        return cos.sum(1), [{"band": [a, b]} for _ in range(len(cos))]

    @classmethod
    def _configured(cls, profile: HiddenDetectProfile) -> "HiddenDetect":  # type: ignore[override]
        return cls(words=profile.refusal_words)
