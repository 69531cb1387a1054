"""Calibration profiles: which head, which mask, which threshold, for exactly which model.

A threshold is only meaningful for the model, head, mask and score layer it was calibrated on
(the paper's thresholds range from 1.2 to 3.5 degrees across models), so a profile carries a real
fingerprint of the model — config, a weights sample, chat template — and refuses to load onto
another one. Profiles are frozen pydantic models stored as JSON with a schema version.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ohd_guard.errors import ProfileFormatError, ProfileMismatchError
from ohd_guard.masking import HeadRef, MaskSpec
from ohd_guard.threshold import RiskCalibration, ThresholdFit

log = logging.getLogger("ohd_guard.profile")

SCHEMA_VERSION = 1

# Config keys that change with the environment or the load call, not with the model.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "_name_or_path", "name_or_path", "dtype", "torch_dtype", "_commit_hash",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "quantization_config",
    "use_cache", "output_hidden_states", "output_attentions", "return_dict", "architectures",
}


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _stable_config(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _stable_config(v) for k, v in sorted(obj.items()) if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_stable_config(v) for v in obj]
    return obj


def config_hash(model: torch.nn.Module) -> str:
    return _sha(json.dumps(_stable_config(model.config.to_dict()), sort_keys=True, default=str))


@torch.no_grad()
def weights_hash(model: torch.nn.Module, samples_per_tensor: int = 1024) -> str:
    """Hash of every parameter's name, shape and an evenly strided sample of its values.

    Values are rounded to bfloat16 first so the same checkpoint loaded in float32, float16 or
    bfloat16 hashes the same (the dtype is recorded separately). Reads ~1k values per tensor, so it
    takes milliseconds rather than hashing gigabytes.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def chat_template_of(processor: Any) -> str:
    for obj in (processor, getattr(processor, "tokenizer", None)):
        tpl = getattr(obj, "chat_template", None)
        if isinstance(tpl, str):
            return tpl
        if isinstance(tpl, dict):  # named templates
            return json.dumps(tpl, sort_keys=True)
    return ""


def content_digest(obj: BaseModel) -> str:
    """sha256 of a saved model's content: every field but ``created_at`` and ``digest``."""
    body = obj.model_dump(mode="json", exclude={"created_at", "digest"})
    return _sha(json.dumps(body, sort_keys=True, separators=(",", ":")))


def check_digest(obj: Any, path: str | Path, allow_edited: bool, what_changed: str, fix: str) -> None:
    """Refuse (or, with ``allow_edited``, warn about) a loaded profile whose content no longer matches
    the digest written by its save: it was edited by hand after calibration, or predates digests."""
    if obj.digest == content_digest(obj):
        return
    what = "has no content digest" if obj.digest is None else "does not match its content digest"
    msg = f"{path} {what}: it was edited after calibration{what_changed}"
    if not allow_edited:
        raise ProfileFormatError(f"{msg}; {fix}")
    log.warning("%s; loaded anyway because allow_edited=True", msg)


class ModelFingerprint(BaseModel):
    """What identifies a model for calibration purposes."""

    model_config = ConfigDict(frozen=True, extra="forbid")  # a typo'd key is an error, not dropped
    architecture: str
    model_type: str
    num_layers: int
    num_heads: int
    config_hash: str
    weights_hash: str
    chat_template_hash: str
    dtype: str

    @classmethod
    def of(cls, model: torch.nn.Module, processor: Any = None) -> "ModelFingerprint":
        from ohd_guard.adapters import get_adapter

        adapter = get_adapter(model)
        return cls(
            architecture=type(model).__name__,
            model_type=adapter.model_type,
            num_layers=adapter.num_layers,
            num_heads=adapter.num_heads,
            config_hash=config_hash(model),
            weights_hash=weights_hash(model),
            chat_template_hash=_sha(chat_template_of(processor)) if processor is not None else "",
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        )

    def differences(self, other: "ModelFingerprint") -> list[str]:
        fields = ["architecture", "model_type", "num_layers", "num_heads", "config_hash", "weights_hash"]
        if other.chat_template_hash:  # the model's template is known: the profile must name the same one
            fields.append("chat_template_hash")
        return [
            f"{f}: profile has {getattr(self, f)!r}, model has {getattr(other, f)!r}"
            for f in fields
            if getattr(self, f) != getattr(other, f)
        ]


class HeadStats(BaseModel):
    """Calibration statistics of one head (angles in degrees)."""

    model_config = ConfigDict(frozen=True, extra="forbid")  # a typo'd key is an error, not dropped
    head: HeadRef
    unsafe_mean: float
    safe_mean: float
    gap: float
    auroc: float
    eligible: bool
    """Passed the selectivity rule (safe angle below the chosen percentile over all heads)."""


class CalibrationSummary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")  # a typo'd key is an error, not dropped
    n_unsafe: int
    n_safe: int
    data_hash: str
    sources: list[str] = Field(default_factory=list)
    search: str = ""
    """How the head was chosen: e.g. ``two-stage(fast->exact, k=8, p=80)`` or ``manual``."""
    seconds: float = 0.0
    length_auroc: float | None = None
    """AUROC of prompt length alone on the calibration sets (0.5: length tells nothing)."""
    question_auroc: float | None = None
    """AUROC of "the request ends in a question mark" alone on the calibration sets."""


class CalibrationMetrics(BaseModel):
    """Metrics of the chosen head and threshold on a set of prompts (calibration or held-out)."""

    model_config = ConfigDict(frozen=True, extra="forbid")  # a typo'd key is an error, not dropped
    split: str
    n_unsafe: int
    n_safe: int
    auroc: float
    detection_rate: float
    false_positive_rate: float
    balanced_accuracy: float


class Profile(BaseModel):
    """Everything the guard needs to screen with one model. Save/load with :meth:`save` / :meth:`load`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: Literal[1] = SCHEMA_VERSION
    library_version: str
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    model: ModelFingerprint
    heads: tuple[HeadRef, ...] = Field(min_length=1)
    mask: MaskSpec
    score_layer: int = Field(ge=1)
    threshold: ThresholdFit
    risk: RiskCalibration
    calibration: CalibrationSummary
    metrics: list[CalibrationMetrics] = Field(default_factory=list)
    top_heads: list[HeadStats] = Field(default_factory=list)
    digest: str | None = None
    """sha256 of everything above but ``created_at``, written by :meth:`save`: a profile edited by
    hand after calibration no longer matches it (an edit check, not a signature)."""

    @model_validator(mode="after")
    def _consistent(self) -> "Profile":
        """Hand edits that would silently disable the guard are errors, not settings."""
        if self.score_layer > self.model.num_layers:
            raise ValueError(f"score_layer {self.score_layer} is above the model's {self.model.num_layers} layers")
        for h in self.heads:
            if h.layer >= self.model.num_layers or h.head >= self.model.num_heads:
                raise ValueError(f"head {h} is outside the fingerprinted model's heads")
            if h.layer >= self.score_layer:
                raise ValueError(f"head {h} is at or above score_layer {self.score_layer}: masking it cannot move "
                                 "the angle read there, so nothing would ever be flagged")
        if not self.mask.alpha < 1.0:
            raise ValueError("mask.alpha must be below 1 (1.0 leaves the head unmasked: every angle is 0)")
        t = self.threshold
        if not 0.0 < t.value <= 180.0:
            raise ValueError(f"threshold.value {t.value} is not an angle in (0, 180] degrees")
        if t.method == "kde_crossing" and t.crossings and not any(abs(t.value - c) <= 1e-9 for c in t.crossings):
            raise ValueError(f"threshold.value {t.value} is not one of the KDE crossings {t.crossings} it was fitted as")
        calib = next((m for m in self.metrics if m.split == "calibration"), None)
        if calib is not None and (abs(calib.detection_rate - t.detection_rate) > 1e-9
                                  or abs(calib.false_positive_rate - t.false_positive_rate) > 1e-9):
            raise ValueError("threshold's detection/false-positive rates differ from the calibration metrics "
                             "(the threshold was changed after calibration)")
        return self

    def __eq__(self, other: object) -> bool:
        """Same content (the digest is derived from it, so it is not compared)."""
        if not isinstance(other, Profile):
            return NotImplemented
        return self.model_dump(exclude={"digest"}) == other.model_dump(exclude={"digest"})

    __hash__ = None  # type: ignore[assignment]

    def content_digest(self) -> str:
        """sha256 of the profile's content (all fields but ``created_at`` and ``digest``)."""
        return content_digest(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        signed = self.model_copy(update={"digest": self.content_digest()})
        path.write_text(signed.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, allow_edited: bool = False) -> "Profile":
        """Read a profile written by :meth:`save`. One whose content no longer matches its digest
        (edited by hand) is refused unless ``allow_edited=True``, which loads it with a warning."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProfileFormatError(f"profile not found: {path}") from None
        except IsADirectoryError:
            raise ProfileFormatError(f"profile path is a directory, not a file: {path}") from None
        except OSError as e:
            raise ProfileFormatError(f"cannot read profile {path}: {e}") from e
        except RecursionError:
            raise ProfileFormatError(f"{path} is not a valid profile: JSON nested too deeply") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ProfileFormatError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ProfileFormatError(f"{path}: a profile is a JSON object, got {type(raw).__name__}")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ProfileFormatError(
                f"{path}: schema_version {version!r} is not supported (this library reads {SCHEMA_VERSION})"
            )
        try:
            profile = cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
            raise ProfileFormatError(f"{path} is not a valid profile: {problems}") from e
        except RecursionError:
            raise ProfileFormatError(f"{path} is not a valid profile: nested too deeply") from None
        check_digest(profile, path, allow_edited, " (heads, threshold, mask or statistics changed)",
                     "recalibrate, or load it with Profile.load(path, allow_edited=True)")
        return profile

    def verify(self, model: torch.nn.Module, processor: Any = None, strict_dtype: bool = False) -> None:
        """Raise :class:`ProfileMismatchError` unless this profile was calibrated on ``model``."""
        actual = ModelFingerprint.of(model, processor)
        problems = self.model.differences(actual)
        if self.model.dtype != actual.dtype:
            msg = f"dtype: profile calibrated in {self.model.dtype}, model runs in {actual.dtype}"
            if strict_dtype:
                problems.append(msg)
            else:
                log.warning("%s; angles may shift slightly", msg)
        if problems:
            raise ProfileMismatchError("profile does not match this model:\n  " + "\n  ".join(problems))
