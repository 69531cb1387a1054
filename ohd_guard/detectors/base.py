"""The interface every detector shares, so One-head Defense and its baselines are fitted, scored,
thresholded, saved and evaluated the same way.

A detector is fitted on unsafe and safe calibration prompts for one model, scores conversations
(higher = more unsafe) and flags ``score > threshold``. Its saved state carries the model's
:class:`~ohd_guard.profile.ModelFingerprint`: a threshold or a probe is meaningless on another
model, so loading onto a different one raises :class:`~ohd_guard.errors.ProfileMismatchError`.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError

from ohd_guard.calibrate import as_conversation
from ohd_guard.datasets import LabelledPrompt
from ohd_guard.errors import CalibrationError, InvalidInputError, ProfileFormatError, ProfileMismatchError
from ohd_guard.profile import CalibrationMetrics, ModelFingerprint, check_digest, content_digest
from ohd_guard.threshold import RiskCalibration

log = logging.getLogger("ohd_guard.detectors")

STATE_SCHEMA_VERSION = 1
D = TypeVar("D", bound="Detector")


# -- inputs -------------------------------------------------------------------------------------
def as_input(item: Any) -> Any:
    """What the chat-template renderer takes: a LabelledPrompt becomes one user turn (with its image),
    a labelled multi-turn conversation (``.label`` + ``.messages``) its message list; others pass."""
    if isinstance(item, LabelledPrompt):
        return as_conversation(item)
    msgs = getattr(item, "messages", None)
    if hasattr(item, "label") and isinstance(msgs, list):
        return msgs
    return item


def _approx_len(conv: Any) -> int:
    """Rough rendered length, only to batch similar lengths together (less padding)."""
    if isinstance(conv, str):
        return len(conv)
    if hasattr(conv, "text") and hasattr(conv, "num_images"):  # Conversation
        return len(conv.text) + 1000 * conv.num_images
    if isinstance(conv, list):
        n = 0
        for m in conv:
            c = m.get("content") if isinstance(m, dict) else m
            if isinstance(c, str):
                n += len(c)
            elif isinstance(c, list):
                n += sum(len(p.get("text", "")) if isinstance(p, dict) and p.get("type") == "text" else 1000 for p in c)
        return n
    return 0


def length_order(convs: Sequence[Any]) -> list[int]:
    """Indices of ``convs`` from shortest to longest (stable)."""
    return sorted(range(len(convs)), key=lambda i: _approx_len(convs[i]))


def batched(fn: Callable[[list[Any]], np.ndarray], items: Sequence[Any], batch_size: int) -> np.ndarray:
    """``fn`` on length-sorted batches of ``items`` (rendered with :func:`as_input`), rows back in input order.

    Sorting by length keeps left padding small, which matters on CPU where padded positions cost as
    much as real ones.
    """
    if not len(items):
        raise InvalidInputError("no conversations to score")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    convs = [as_input(x) for x in items]
    order = length_order(convs)
    parts = [np.asarray(fn([convs[i] for i in order[s : s + batch_size]])) for s in range(0, len(order), batch_size)]
    out = np.concatenate(parts, axis=0)
    result = np.empty_like(out)
    result[np.asarray(order)] = out
    return result


def split_labelled(items: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """(unsafe, safe) of labelled items."""
    return [x for x in items if x.label == 1], [x for x in items if x.label == 0]


# -- saved state --------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class DetectorState(BaseModel):
    """What every non-OhD detector saves (OhD saves a :class:`~ohd_guard.profile.Profile`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: Literal[1] = STATE_SCHEMA_VERSION
    kind: str
    library_version: str
    created_at: str = Field(default_factory=_now)
    model: ModelFingerprint
    threshold: FiniteFloat
    threshold_method: str
    n_unsafe: int = Field(ge=0)
    n_safe: int = Field(ge=0)
    seconds: float = 0.0
    risk: RiskCalibration | None = None
    """Graded risk of a score (fitted on out-of-fold calibration scores); None: the logistic of the score."""
    data_hash: str = ""
    """sha256 of the calibration prompts (as for One-head Defense profiles)."""
    sources: list[str] = Field(default_factory=list)
    metrics: list[CalibrationMetrics] = Field(default_factory=list)
    digest: str | None = None
    """sha256 of the content but ``created_at``, written on save: a hand-edited state no longer matches."""

    def __eq__(self, other: object) -> bool:
        """Same content (the digest is derived from it, so it is not compared)."""
        if not isinstance(other, DetectorState):
            return NotImplemented
        return type(self) is type(other) and self.model_dump(exclude={"digest"}) == other.model_dump(exclude={"digest"})

    __hash__ = None  # type: ignore[assignment]

    def content_digest(self) -> str:
        return content_digest(self)

    def verify(self, model: Any, processor: Any = None) -> None:
        """Raise :class:`ProfileMismatchError` unless this state was fitted on ``model``."""
        check_fingerprint(self.model, model, processor, f"{self.kind} profile")


def check_fingerprint(expected: ModelFingerprint, model: Any, processor: Any, what: str) -> None:
    """Raise :class:`ProfileMismatchError` unless ``model`` is the one ``expected`` describes."""
    actual = ModelFingerprint.of(model, processor)
    problems = expected.differences(actual)
    if expected.dtype != actual.dtype:
        log.warning("%s: fitted in %s, model runs in %s; scores may shift slightly", what, expected.dtype, actual.dtype)
    if problems:
        raise ProfileMismatchError(f"{what} does not match this model:\n  " + "\n  ".join(problems))


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileFormatError(f"detector file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProfileFormatError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ProfileFormatError(f"{path}: a detector file is a JSON object, got {type(raw).__name__}")
    return raw


# -- the interface ------------------------------------------------------------------------------
class Detector(ABC):
    """A prompt-safety detector bound to one model. Higher score = more unsafe; flag ``score > threshold``."""

    name: str = "detector"

    def __init__(self) -> None:
        self.model: Any = None
        self.processor: Any = None

    @property
    @abstractmethod
    def threshold(self) -> float: ...

    @property
    def fitted(self) -> bool:
        return self.model is not None

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise CalibrationError(f"{self.name} is not fitted: call fit() or load() first")

    @abstractmethod
    def fit(self: D, model: Any, processor: Any, unsafe: Sequence[Any], safe: Sequence[Any]) -> D:
        """Calibrate on unsafe and safe prompts (LabelledPrompt, str, message lists or Conversations)."""

    @abstractmethod
    def score(self, convs: Sequence[Any]) -> np.ndarray:
        """One float per conversation, higher = more unsafe."""

    def predict(self, convs: Sequence[Any]) -> np.ndarray:
        """True where the conversation is flagged unsafe."""
        return self.score(convs) > self.threshold

    @abstractmethod
    def save(self, path: str | Path) -> Path: ...

    @classmethod
    @abstractmethod
    def load(cls: type[D], path: str | Path, model: Any, processor: Any) -> D:
        """Read a saved detector and bind it to ``model``, refusing a model it was not fitted on."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, fitted={self.fitted})"


class StateDetector(Detector):
    """A detector whose fitted state is one pydantic model (``State``) saved as JSON."""

    State: ClassVar[type[DetectorState]]

    def __init__(self) -> None:
        super().__init__()
        self.state: DetectorState | None = None

    @property
    def threshold(self) -> float:
        self._require_fitted()
        return float(self.state.threshold)  # type: ignore[union-attr]

    def _bind(self, model: Any, processor: Any, state: DetectorState) -> None:
        self.model, self.processor, self.state = model, processor, state

    def save(self, path: str | Path) -> Path:
        self._require_fitted()
        return save_state(self.state, path)  # type: ignore[arg-type]

    @classmethod
    def read_state(cls, path: str | Path, allow_edited: bool = False) -> DetectorState:
        raw = read_json(path)
        if raw.get("schema_version") != STATE_SCHEMA_VERSION:
            raise ProfileFormatError(f"{path}: schema_version {raw.get('schema_version')!r} is not supported")
        try:
            state = cls.State.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
            raise ProfileFormatError(f"{path} is not a valid {cls.__name__} state: {problems}") from e
        check_digest(state, path, allow_edited, "", "refit it, or load it with allow_edited=True")
        return state

    @classmethod
    def from_state(cls, state: DetectorState, model: Any, processor: Any):
        """Bind a state to a model after checking the fingerprint; configuration comes from the state."""
        check_fingerprint(state.model, model, processor, f"{cls.__name__} state")
        det = cls._from_state(state)
        det._bind(model, processor, state)
        return det

    @classmethod
    @abstractmethod
    def _from_state(cls, state: DetectorState): ...

    @classmethod
    def load(cls, path: str | Path, model: Any, processor: Any, allow_edited: bool = False):
        return cls.from_state(cls.read_state(path, allow_edited), model, processor)


def save_state(state: DetectorState, path: str | Path) -> Path:
    """Write a detector state as JSON with its content digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    signed = state.model_copy(update={"digest": state.content_digest()})
    path.write_text(signed.model_dump_json(indent=2) + "\n")
    return path


class GuardScored:
    """``score()`` through the guard's own screening path (one :class:`~ohd_guard.screening.Screener`
    prefill per batch), so evaluation measures exactly what the guard runs and times."""

    batch_size: int = 8
    _scoring_guard: Any = None

    def scoring_guard(self) -> Any:
        if self._scoring_guard is None:
            from ohd_guard.guard import OhdGuard

            self._scoring_guard = OhdGuard(self.model, self.processor, self, on_error="raise", verify=False,  # type: ignore[attr-defined]
                                           allow_local_files=True, max_batch_size=self.batch_size)  # fmt: skip
        return self._scoring_guard

    def score(self, convs: Sequence[Any]) -> np.ndarray:
        """One score per conversation (higher = more unsafe), as the guard computes it."""
        self._require_fitted()  # type: ignore[attr-defined]
        return batched(lambda b: [v.score for v in self.scoring_guard().screen_batch(b)], convs, self.batch_size)


def library_version() -> str:
    from ohd_guard import __version__

    return __version__
