"""Profiles: the fitted artefact of a detector, for exactly one model.

A profile is what calibration produces and the guard consumes: which heads or layers a detector
reads, its weights, its threshold and risk curve. Every detector kind saves the same frozen
pydantic shape (:class:`Profile`, told apart by a required ``kind``; the kind-specific fields live
in the kind's own subclass beside its scorer in :mod:`ohd_guard.detectors`). A threshold is only
meaningful for the model it was fitted on (the One-head Defense paper's thresholds range from 1.2
to 3.5 degrees across models), so a profile carries a real fingerprint of the model (config, a
weights sample, chat template) and refuses to bind to another one; its content digest refuses a
hand-edited file. ``Profile.bind(model, processor)`` turns a profile into the scorer the guard runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, TypeAdapter, ValidationError

from ohd_guard.errors import ProfileFormatError, ProfileMismatchError
from ohd_guard.threshold import RiskCalibration
from ohd_guard.types import HeadRef

if TYPE_CHECKING:
    from ohd_guard.screening import PrefillDetector

log = logging.getLogger("ohd_guard.profile")

SCHEMA_VERSION: Literal[1] = 1
_P = TypeVar("_P", bound="Profile")  # Kind.load returns that kind

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
    return _sha(json.dumps(_stable_config(model.config.to_dict()), sort_keys=True, default=str))  # type: ignore[union-attr, operator]


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


def check_digest(stored: str | None, actual: str, path: str | Path, allow_edited: bool) -> None:
    """Refuse (or, with ``allow_edited``, warn about) a profile whose content no longer matches the
    digest written by its save: it was edited by hand after calibration, or predates digests."""
    if stored == actual:
        return
    what = "has no content digest" if stored is None else "does not match its content digest"
    msg = f"{path} {what}: it was edited after calibration (heads, weights, threshold or statistics changed)"
    if not allow_edited:
        raise ProfileFormatError(f"{msg}; refit it, or load it with allow_edited=True")
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_version() -> str:
    from ohd_guard import __version__  # the package root, not a module cycle: __init__ defines it first

    return __version__


class Profile(BaseModel):
    """What every detector kind saves: the model it was fitted on, its threshold and risk curve, how
    it was fitted, and a content digest. Subclasses (one per ``kind``) add what their scorer needs
    and implement :meth:`bind` and :meth:`check_detector`.

    Save with :meth:`save`; load any kind with :func:`ohd_guard.detectors.load_profile`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")  # a typo'd key is an error, not dropped
    schema_version: Literal[1] = SCHEMA_VERSION
    kind: str
    library_version: str
    created_at: str = Field(default_factory=_now)
    model: ModelFingerprint
    threshold: FiniteFloat
    """Flag iff ``score > threshold`` (degrees for One-head Defense, log-odds for the probes)."""
    threshold_method: str
    n_unsafe: int = Field(ge=0)
    n_safe: int = Field(ge=0)
    seconds: float = 0.0
    risk: RiskCalibration | None = None
    """Graded risk of a score (fitted on calibration scores); None: the logistic of the score."""
    data_hash: str = ""
    """sha256 of the calibration prompts."""
    sources: list[str] = Field(default_factory=list)
    metrics: list[CalibrationMetrics] = Field(default_factory=list)
    digest: str | None = None
    """sha256 of the content but ``created_at``, written by :meth:`save`: a profile edited by hand
    after calibration no longer matches it (an edit check, not a signature)."""

    KINDS: ClassVar[dict[str, type["Profile"]]] = {}
    """Every profile kind defined so far (``kind`` -> class), filled by subclassing."""
    LEGACY: ClassVar[Callable[[dict[str, Any]], dict[str, Any]] | None] = None
    """Migrates a file of the first layout (One-head Defense, no ``kind``); set by that kind's module."""
    SCORERS: ClassVar[dict[str, Any]] = {}
    """The detector class that binds each kind (``kind`` -> class with ``from_profile``), filled by
    :class:`~ohd_guard.detectors.base.Detector` subclasses: a profile binds without importing them."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kw: Any) -> None:
        super().__pydantic_init_subclass__(**kw)
        default = cls.model_fields["kind"].default
        if isinstance(default, str):
            Profile.KINDS[default] = cls

    def __eq__(self, other: object) -> bool:
        """Same content (the digest is derived from it, so it is not compared)."""
        if not isinstance(other, Profile):
            return NotImplemented
        return type(self) is type(other) and self.model_dump(exclude={"digest"}) == other.model_dump(exclude={"digest"})

    __hash__ = None  # type: ignore[assignment]

    def content_digest(self) -> str:
        """sha256 of the profile's content (all fields but ``created_at`` and ``digest``)."""
        return content_digest(self)

    @classmethod
    def load(cls: type[_P], path: str | Path, allow_edited: bool = False) -> _P:
        """Read a profile written by :meth:`save` (any kind when called on :class:`Profile`, else that
        kind). Every failure is a :class:`ProfileFormatError`; a file edited after fitting is refused
        unless ``allow_edited=True`` (then loaded with a warning, still validated as a detector)."""
        profile = parse_profile(read_profile_json(path), str(path), allow_edited)
        if not isinstance(profile, cls):
            raise ProfileFormatError(f"{path} is a {profile.kind!r} profile, not a {cls.__name__}")
        return profile

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON with its content digest."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        signed = self.model_copy(update={"digest": self.content_digest()})
        path.write_text(signed.model_dump_json(indent=2) + "\n")
        return path

    def verify(self, model: torch.nn.Module, processor: Any = None, strict_dtype: bool = False) -> None:
        """Raise :class:`ProfileMismatchError` unless this profile was fitted on ``model``."""
        check_fingerprint(self.model, model, processor, f"{self.kind} profile", strict_dtype)

    def bind(self, model: torch.nn.Module, processor: Any, *, verify: bool = True) -> "PrefillDetector":
        """The scorer the guard runs for this profile on ``model`` (fingerprint checked unless ``verify=False``)."""
        scorer = Profile.SCORERS.get(self.kind)
        if scorer is None:
            raise ProfileFormatError(f"no scorer for {self.kind!r} profiles (import ohd_guard.detectors)")
        return scorer.from_profile(self, model, processor, verify=verify)

    def check_detector(self) -> None:
        """Raise ``ValueError`` when the profile could not detect anything (weights all zero, a threshold
        no score can reach, heads outside the model, ...). Run on every load, ``allow_edited`` or not."""
        if self.risk is not None:
            r = float(self.risk.risk(self.threshold))
            if not 1e-6 < r < 1 - 1e-6:
                raise ValueError(f"threshold {self.threshold:g} lies outside the calibrated score range (its risk "
                                 f"is {r:.3g}): every conversation would be {'passed' if r > 0.5 else 'flagged'}")

    def check_heads(self, heads: Any, what: str = "head") -> None:
        """Heads must exist in the fingerprinted model and be distinct."""
        heads = list(heads)
        for h in heads:
            if h.layer >= self.model.num_layers or h.head >= self.model.num_heads:
                raise ValueError(f"{what} {h} is outside the fingerprinted model's "
                                 f"{self.model.num_layers} layers x {self.model.num_heads} heads")
        if len(set(heads)) != len(heads):
            raise ValueError(f"{what}s repeat: {', '.join(map(str, heads))}")


MEASURED_DTYPES = {"float32", "bfloat16"}
"""The dtype pair whose effect on verdicts is measured (``benchmarks/bench_dtype.py``): a profile
fitted in one runs in the other with an INFO line, not a warning. It is the pair every user meets:
``load_model(dtype="auto")`` runs bfloat16 on an accelerator and float32 on a CPU, and the shipped
profiles are fitted in one of the two."""
MEASURED_DTYPE_SHIFT = ("measured on both Qwen models: scores move 0.06 log-odds on average, at most 0.27, "
                        "1 verdict of 240 flipped (benchmarks/bench_dtype.py)")


def check_fingerprint(expected: ModelFingerprint, model: Any, processor: Any, what: str,
                      strict_dtype: bool = False) -> None:
    """Raise :class:`ProfileMismatchError` unless ``model`` is the one ``expected`` describes."""
    actual = ModelFingerprint.of(model, processor)
    problems = expected.differences(actual)
    if expected.dtype != actual.dtype:
        msg = f"dtype: profile fitted in {expected.dtype}, model runs in {actual.dtype}"
        if strict_dtype:
            problems.append(msg)
        elif {expected.dtype, actual.dtype} == MEASURED_DTYPES:
            log.info("%s: %s; %s", what, msg, MEASURED_DTYPE_SHIFT)
        else:
            log.warning("%s: %s; scores may shift slightly", what, msg)
    if problems:
        raise ProfileMismatchError(f"{what} does not match this model:\n  " + "\n  ".join(problems))


MAX_PROFILE_BYTES = 64 * 2**20
"""Largest profile file read (the shipped ones are under 1 MB): anything bigger is not a profile."""


def read_profile_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``; every way a path can fail to be a profile file is a
    :class:`ProfileFormatError` naming it (missing, a directory, unreadable, a symlink loop, a device,
    too large, not JSON, nested too deeply, not an object)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ProfileFormatError(f"profile path is a directory, not a file: {path}")
        with path.open("rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
    except FileNotFoundError:
        raise ProfileFormatError(f"profile not found: {path}") from None
    except OSError as e:  # permissions, ELOOP, EIO (/proc files), ...
        raise ProfileFormatError(f"cannot read profile {path}: {e.strerror or e}") from None
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileFormatError(f"{path} is over {MAX_PROFILE_BYTES // 2**20} MiB: not a profile")
    try:
        raw = json.loads(data)
    except RecursionError:
        raise ProfileFormatError(f"{path} is not a valid profile: JSON nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProfileFormatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ProfileFormatError(f"{path}: a profile is a JSON object, got {type(raw).__name__}")
    return raw


def raw_digest(raw: dict[str, Any]) -> str:
    """:func:`content_digest` of a profile as read from its file (for files of an older layout that are
    migrated before validation: their digest is checked on the content they were saved with)."""
    body = {k: v for k, v in raw.items() if k not in ("created_at", "digest")}
    return _sha(json.dumps(body, sort_keys=True, separators=(",", ":")))


def _adapter() -> TypeAdapter[Any]:
    """One pydantic discriminated union over every kind defined (rebuilt when a kind is added)."""
    kinds = tuple(Profile.KINDS.values())
    if _ADAPTERS.get("kinds") != kinds:
        union = kinds[0] if len(kinds) == 1 else Union[kinds]  # type: ignore[valid-type]  # noqa: UP007 (built at run time)
        _ADAPTERS.update(kinds=kinds, adapter=TypeAdapter(Annotated[union, Field(discriminator="kind")]))  # type: ignore[arg-type]
    return _ADAPTERS["adapter"]


_ADAPTERS: dict[str, Any] = {}


def parse_profile(raw: dict[str, Any], where: str = "profile", allow_edited: bool = False) -> Profile:
    """Validate a profile's JSON object: schema version, migration of the first One-head Defense layout,
    content digest (a hand edit is refused unless ``allow_edited``), every field of its kind and the
    checks that keep it a detector (run with or without ``allow_edited``)."""
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ProfileFormatError(f"{where}: schema_version {version!r} is not supported (this library reads {SCHEMA_VERSION})")
    legacy = "kind" not in raw
    if legacy:  # its digest is checked on the content it was saved with, then it is migrated
        check_digest(raw.get("digest"), raw_digest(raw), where, allow_edited)
        if Profile.LEGACY is None:
            raise ProfileFormatError(f"{where}: a profile needs a 'kind'")
        try:
            raw = Profile.LEGACY(raw)
        except ValueError as e:
            raise ProfileFormatError(f"{where}: {e}") from None
    elif raw.get("kind") not in Profile.KINDS:
        raise ProfileFormatError(f"{where}: unknown detector kind {raw.get('kind')!r}; known: {', '.join(Profile.KINDS)}")
    try:
        profile = _adapter().validate_python(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        raise ProfileFormatError(f"{where} is not a valid profile: {problems}") from None
    except RecursionError:
        raise ProfileFormatError(f"{where} is not a valid profile: nested too deeply") from None
    if legacy:
        return profile.model_copy(update={"digest": profile.content_digest()})
    check_digest(profile.digest, profile.content_digest(), where, allow_edited)
    return profile
