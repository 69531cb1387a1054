"""#25.8: ``serve run ohd_guard.serve.ray_app:app_builder key=value`` takes typed, strict arguments
(:class:`ohd_guard.serve.ray_args.AppArgs`): checked without starting Ray, and through Ray's own
argument handling (``call_user_app_builder_with_args_if_necessary``) where Ray is installed."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ohd_guard.serve.ray_args import AppArgs


def test_values_arrive_as_strings_and_are_typed():
    a = AppArgs.model_validate({"replicas": "2", "factory": "ohd_guard.serve.demo:planted_guard",
                                "check_output": "true", "max_tokens_limit": "64", "num_gpus": "0.5"})
    assert (a.replicas, a.check_output, a.settings().max_tokens_limit, a.settings().default_max_tokens) == (2, True, 64, 64)
    assert a.spec().factory == "ohd_guard.serve.demo:planted_guard" and a.actor_options() == {"num_cpus": 1, "num_gpus": 0.5}
    assert a.autoscaling() is None
    assert AppArgs.model_validate({"min_replicas": "2"}).autoscaling() == {"min_replicas": 2, "max_replicas": 2}


@pytest.mark.parametrize(("args", "message"), [
    ({"replica": "2"}, "unknown app_builder argument(s) ['replica']; accepted: ["),
    ({"replicas": "two"}, "replicas"),
    ({"replicas": "0"}, "replicas"),
    ({"refusal": "maybe"}, "refusal"),
    ({"max_body_bytes": "-1"}, "max_body_bytes"),
    ({"min_replicas": "3", "max_replicas": "2"}, "min_replicas=3 is over max_replicas=2"),
])
def test_a_bad_key_or_value_is_an_error_naming_it(args, message):
    with pytest.raises(ValidationError) as e:
        AppArgs.model_validate(args)
    assert message in str(e.value)


def test_rays_own_argument_handling_validates_against_the_model():
    pytest.importorskip("ray.serve")
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as call

    from ohd_guard.serve.ray_app import app_builder

    app = call(app_builder, {"replicas": "2", "factory": "ohd_guard.serve.demo:planted_guard", "check_output": "true"})
    deployment = app._bound_deployment  # built, not deployed: no Ray cluster is started
    assert deployment.num_replicas == 2 and deployment.init_args[1]["check_output"] is True
    with pytest.raises(ValidationError, match=r"unknown app_builder argument\(s\) \['replica'\]"):
        call(app_builder, {"replica": "2"})
