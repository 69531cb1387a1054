"""Server settings (issue 25): sampling defaults from the model's ``generation_config``, settings from
``OHD_GUARD_*`` environment variables under the flags, ``max_model_len`` in ``/v1/models``; against a
real uvicorn on 127.0.0.1 with the planted guard (whose tiny model ships no sampling config)."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
from transformers import GenerationConfig  # noqa: E402

from ohd_guard.serve.app import create_app  # noqa: E402
from ohd_guard.serve.generation import generation_for, sampling_defaults  # noqa: E402
from ohd_guard.serve.schema import ChatCompletionRequest  # noqa: E402
from ohd_guard.serve.server import ServerThread  # noqa: E402
from ohd_guard.serve.settings import ServeSettings  # noqa: E402
from ohd_guard.testing.fixtures import GUARD_CLEAN_PROMPTS  # noqa: E402


@pytest.fixture(scope="module")
def server(planted_guard):
    with ServerThread(create_app(planted_guard, ServeSettings(model_name="planted"))) as srv:
        yield srv


def _req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **kw)


def test_sampling_defaults_follow_generation_config():
    assert sampling_defaults(None) == sampling_defaults(GenerationConfig()) == {"do_sample": False}
    assert sampling_defaults(GenerationConfig(do_sample=True, temperature=0.0)) == {"do_sample": False}
    qwen = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20)
    assert sampling_defaults(qwen) == {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    s = ServeSettings()
    assert generation_for(_req(), s, sampling_defaults(GenerationConfig())).kwargs == {"do_sample": False}
    assert generation_for(_req(), s).kwargs == {"do_sample": False}  # no defaults given: greedy, never temperature 1
    assert generation_for(_req(top_p=0.5), s, sampling_defaults(qwen)).kwargs["top_p"] == 0.5
    assert generation_for(_req(temperature=0.9), s, sampling_defaults(qwen)).kwargs == {
        "do_sample": True, "temperature": 0.9, "top_p": 1.0, "top_k": 0}  # an explicit temperature is the client's
    assert generation_for(_req(temperature=0), s, sampling_defaults(qwen)).kwargs == {"do_sample": False}


def test_request_without_temperature_is_greedy_on_a_greedy_model(server, planted_guard):
    assert not planted_guard.model.generation_config.do_sample
    body = {"messages": [{"role": "user", "content": GUARD_CLEAN_PROMPTS[0]}], "max_tokens": 12}
    texts = [httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
             ["choices"][0]["message"]["content"] for _ in range(3)]
    greedy = httpx.post(server.url + "/v1/chat/completions", json={**body, "temperature": 0}, timeout=60).json()
    assert texts == [greedy["choices"][0]["message"]["content"]] * 3  # sampled at temperature 1, these would differ


def test_models_list_max_model_len(server, planted_guard):
    (entry,) = httpx.get(server.url + "/v1/models").json()["data"]
    assert entry["id"] == "planted"
    assert entry["max_model_len"] == planted_guard.model.config.max_position_embeddings > 0


def test_settings_from_env_under_flags(monkeypatch):
    env = {"OHD_GUARD_MAX_TOKENS_LIMIT": "64", "OHD_GUARD_MODEL_NAME": "env-name", "OHD_GUARD_CACHE": "/x",
           "OHD_GUARD_DISCONNECT_POLL_S": "0.5"}
    s = ServeSettings.from_env(env)
    assert (s.max_tokens_limit, s.default_max_tokens, s.model_name, s.disconnect_poll_s) == (64, 64, "env-name", 0.5)
    assert ServeSettings.from_env(env, model_name="flag").model_name == "flag"
    with pytest.raises(ValueError, match="OHD_GUARD_MAX_BODY_BYTES or --max-body-bytes"):
        ServeSettings.from_env({"OHD_GUARD_MAX_BODY_BYTES": "lots"})

    from ohd_guard.serve.cli import _settings, _spec, add_parser

    cli = argparse.ArgumentParser()
    add_parser(cli.add_subparsers())
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("OHD_GUARD_MAX_SCREEN_BATCH", "7")
    args = cli.parse_args(["serve", "--max-screen-batch", "9", "--default-max-tokens", "32", "--max-batch-size", "4"])
    s = _settings(args)
    assert (s.max_screen_batch, s.default_max_tokens, s.max_tokens_limit, s.model_name) == (9, 32, 64, "env-name")
    assert _spec(args).max_batch_size == 4
