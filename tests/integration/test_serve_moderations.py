"""``POST /v1/moderations`` and blank input on every route (issue 25) against a real uvicorn on 127.0.0.1 with the real ``openai``
client and LangChain's ``OpenAIModerationMiddleware``; the planted guard flags its trigger prompts."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from ohd_guard.serve.app import create_app  # noqa: E402
from ohd_guard.serve.moderations import CATEGORIES  # noqa: E402
from ohd_guard.serve.server import ServerThread  # noqa: E402
from ohd_guard.serve.settings import ServeSettings  # noqa: E402
from ohd_guard.testing.fixtures import GUARD_CLEAN_PROMPTS, GUARD_TRIGGER_PROMPTS  # noqa: E402

KEY = "mod-key"


@pytest.fixture(scope="module")
def server(planted_guard):
    with ServerThread(create_app(planted_guard, ServeSettings(model_name="planted", api_key=KEY,
                                                              max_screen_batch=4))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_string_input_trigger_flagged_with_every_category(client):
    r = client.moderations.create(input=GUARD_TRIGGER_PROMPTS[0], model="omni-moderation-latest")
    assert r.id.startswith("modr-") and r.model == "omni-moderation-latest"  # any id, echoed
    (res,) = r.results
    assert res.flagged is True and res.categories.illicit is True and res.categories.violence is False
    assert 0.5 < res.category_scores.illicit <= 1.0 and res.category_scores.hate == 0.0
    raw = res.model_dump(by_alias=True)
    assert set(raw["categories"]) == set(CATEGORIES) == set(raw["category_scores"])
    assert res.model_extra["ohd_guard"]["flagged"] is True  # the verdict travels with each result


def test_list_input_one_result_each_in_order(client):
    texts = [GUARD_CLEAN_PROMPTS[0], GUARD_TRIGGER_PROMPTS[1], GUARD_CLEAN_PROMPTS[2]]
    r = client.moderations.create(input=texts, model="planted")
    assert r.model == "planted"
    assert [x.flagged for x in r.results] == [False, True, False]
    assert r.results[0].category_scores.illicit < r.results[1].category_scores.illicit


def test_model_defaults_to_served_name(server):
    r = httpx.post(server.url + "/v1/moderations", json={"input": GUARD_CLEAN_PROMPTS[1]},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["model"] == "planted"
    assert r.headers["X-OHD-Guard-Flagged"] == "false"


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"), ({"input": "  \n\t"}, "input"), ({"input": ["ok there", " "]}, "input[1]"),
    ({"input": []}, "input"), ({"input": ["a", "b", "c", "d", "e"]}, "input"), ({"input": [1, 2]}, "input"),
    ({"input": "x", "tempo": 1}, "tempo"),
])
def test_bad_input_is_typed_400(server, body, param):
    r = httpx.post(server.url + "/v1/moderations", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_auth_required(server):
    r = httpx.post(server.url + "/v1/moderations", json={"input": "hello there"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_langchain_moderation_middleware(client):
    mw_mod = pytest.importorskip("langchain_openai.middleware", reason="langchain-openai without middleware")
    from langchain_core.messages import AIMessage, HumanMessage

    mw = mw_mod.OpenAIModerationMiddleware(client=client, check_output=False, exit_behavior="end")
    assert mw.before_model({"messages": [HumanMessage(GUARD_CLEAN_PROMPTS[0])]}, None) is None
    out = mw.before_model({"messages": [HumanMessage(GUARD_TRIGGER_PROMPTS[2])]}, None)
    assert out is not None and out.get("jump_to") == "end"
    assert isinstance(out["messages"][-1], AIMessage)
    raising = mw_mod.OpenAIModerationMiddleware(client=client, check_output=False, exit_behavior="error")
    with pytest.raises(mw_mod.OpenAIModerationError):
        raising.before_model({"messages": [HumanMessage(GUARD_TRIGGER_PROMPTS[3])]}, None)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "  "}], "max_tokens": 2}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "be kind"},
                                           {"role": "user", "content": [{"type": "text", "text": ""}]}]}, "messages"),
    ("/v1/screen", {"conversations": ["hello there", "\n"]}, "conversations[1]"),
])
def test_blank_content_is_400_invalid_input_on_every_route(server, path, body, param):
    r = httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_input" and err["param"] == param and "blank" in err["message"]
