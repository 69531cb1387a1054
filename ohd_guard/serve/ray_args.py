"""The typed, strict arguments of ``serve run ohd_guard.serve.ray_app:app_builder key=value ...``.

Ray Serve validates an app builder's arguments against the pydantic model its parameter is
annotated with (``call_user_app_builder_with_args_if_necessary``), so a typo'd key or a bad value is
an error naming it before any replica starts, instead of a key silently dropped. The keys are
:class:`~ohd_guard.serve.settings.GuardSpec`'s and
:class:`~ohd_guard.serve.settings.ServeSettings`' fields plus the deployment's own. Importable
without Ray, so the validation is tested where Ray is not installed.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, model_validator

from ohd_guard.serve.settings import GuardSpec, ServeSettings

__all__ = ["AppArgs"]

_DEPLOYMENT = ("replicas", "min_replicas", "max_replicas", "num_gpus", "num_cpus")


class AppArgs(ServeSettings, GuardSpec):
    """Every ``key=value`` ``serve run ... app_builder`` accepts: the guard (``model``, ``profile``,
    ``factory``, ``refusal``, ...), the server's settings (``model_name``, ``max_tokens_limit``,
    ``check_output``, ...) and the deployment's replicas and resources. Values arrive as strings and
    are converted (``replicas=2``, ``check_output=true``); unknown keys are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    replicas: int = Field(1, ge=1)
    """Fixed number of replicas (unless ``min_replicas``/``max_replicas`` ask for autoscaling)."""
    min_replicas: int | None = Field(None, ge=1)
    max_replicas: int | None = Field(None, ge=1)
    num_gpus: float = Field(0, ge=0)
    """GPUs per replica."""
    num_cpus: float = Field(1, gt=0)
    """CPUs per replica."""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        """A wrong key is named with the keys that exist (pydantic alone would say "extra inputs")."""
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown app_builder argument(s) {unknown}; accepted: {sorted(cls.model_fields)}")
        return data

    @model_validator(mode="after")
    def _replica_bounds(self) -> AppArgs:
        if self.min_replicas and self.max_replicas and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} is over max_replicas={self.max_replicas}")
        return self

    def spec(self) -> GuardSpec:
        return GuardSpec.model_validate({k: getattr(self, k) for k in GuardSpec.model_fields})

    def settings(self) -> ServeSettings:
        return ServeSettings.model_validate({k: getattr(self, k) for k in ServeSettings.model_fields})

    def autoscaling(self) -> dict[str, int] | None:
        """Ray's ``autoscaling_config`` bounds, or ``None`` for a fixed ``replicas``."""
        if self.min_replicas is None and self.max_replicas is None:
            return None
        lo = self.min_replicas or 1
        return {"min_replicas": lo, "max_replicas": self.max_replicas or lo}

    def actor_options(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {})}
