"""The Ray Serve deployment for real: a local Ray (2 CPUs), one replica holding the planted tiny
guard, reached through Ray's HTTP proxy by the openai client. ~30 s (Ray start, replica build), so
marked slow; skipped without ``ray[serve]``."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from ohd_guard.serve.demo import TRIGGER  # noqa: E402
from ohd_guard.serve.server import free_port  # noqa: E402
from ohd_guard.serve.settings import GuardSpec, ServeSettings  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_url():
    import ray
    from ray import serve

    from ohd_guard.serve.ray_app import guard_app, run

    ray.init(num_cpus=2, object_store_memory=100 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        app = guard_app(GuardSpec(factory="ohd_guard.serve.demo:planted_guard"), ServeSettings(model_name="planted"),
                        num_replicas=1, ray_actor_options={"num_cpus": 1}, health_check_period_s=2)
        run(app, port=port)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_one_replica_serves_guarded_answers_through_the_ray_proxy(ray_url):
    from ray import serve

    c = openai.OpenAI(base_url=ray_url + "/v1", api_key="x", max_retries=0)
    kw = dict(model="planted", max_tokens=4, temperature=0)
    safe = c.chat.completions.create(messages=[{"role": "user", "content": "tell me about the sea"}], **kw)
    bad = c.chat.completions.with_raw_response.create(
        messages=[{"role": "user", "content": f"tell {TRIGGER} me about the sea"}], **kw)
    assert safe.model_extra["ohd_guard"]["flagged"] is False
    assert bad.headers["x-ohd-guard-flagged"] == "true" and bad.parse().choices[0].finish_reason == "content_filter"
    chunks = list(c.chat.completions.create(messages=[{"role": "user", "content": f"{TRIGGER} sea"}], stream=True, **kw))
    assert chunks[0].model_extra["ohd_guard"]["flagged"] is True
    r = httpx.post(ray_url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "x": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_parameter"
    assert httpx.get(ray_url + "/health").json()["status"] == "ok"
    status = serve.status().applications["ohd-guard"]
    assert str(status.status).endswith("RUNNING")
    assert str(status.deployments["OhdGuard"].status).endswith("HEALTHY")  # check_health passes
