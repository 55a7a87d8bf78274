"""A/B experiments end to end: a real `python -m server` process on loopback, real HTTP, real /metrics."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest
from serverproc import metric_values, running_server, sample_images, tiny_config
from test_experiments_routing import doc_promql

from server.experiments.buckets import SCALE, bucket_point

pytestmark = pytest.mark.e2e

TOKEN = "test-admin-token-0123456789"
PNG = {"content-type": "image/png"}


def labelled(text: str, name: str, **labels: str) -> float:
    """Sum of the series of `name` whose labels include all of `labels`."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(v for k, v in metric_values(text, name).items() if all(w in k for w in wanted))


def wait_for(condition, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def expected_variant(report: dict, experiment: str, key: str) -> str:
    """The variant the report's bucket ranges give a sticky key (the same hash as the server)."""
    point = bucket_point(experiment, key) / SCALE
    return next(variant for start, end, variant in report["ranges"] if start <= point < end)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return list(sample_images().values())


# --------------------------------------------------------- a server without admin: routing and shadows


# Each server runs as one process, and with HTTP front-end processes (server/frontend/): routing, sticky
# keys, shadows, reports and admin changes must not differ.
LAYOUTS = {"single": ["--layout", "single"], "frontends": ["--layout", "frontends", "--http-processes", "2"]}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def server(request):
    variants = {"baseline": {"method": "none"}, "twin": {"method": "none"},
                "mame-0.5": {"method": "mame", "tau": 0.5, "blocks": 3}}
    config = tiny_config(variants, experiments={"twins": {
        "model": "tiny", "split": {"twin": 1.0}, "sticky": "header:X-User-Id",
        "shadow": {"variant": "baseline", "rate": 1.0}}})
    plain = config["models"]["tiny"]
    config["models"]["plain"] = {
        **plain,
        "variants": {"baseline": {"method": "none"}},
        "default_variant": "baseline",
    }
    with running_server(config, env={"MAME_ADMIN_TOKEN": ""}, args=LAYOUTS[request.param]) as proc:
        yield proc


def classify(url: str, data: bytes, headers: dict | None = None, **params) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", params=params, content=data, headers={**PNG, **(headers or {})},
                      timeout=60)


def test_identical_variants_agree_fully_in_the_report_and_in_metrics(server, images):
    n = 12
    for i in range(n):
        answer = classify(server.url, images[i % len(images)], {"X-User-Id": f"user-{i}"}).json()
        assert (answer["experiment"], answer["variant"], answer["assignment"]) == (
            "twins",
            "twin",
            "assigned",
        )

    def compared() -> dict | None:
        report = httpx.get(f"{server.url}/v1/experiments/twins").json()
        return report if report["variants"]["twin"]["shadow"]["comparisons"] >= n else None

    report = wait_for(compared, what="12 shadow comparisons")
    twin = report["variants"]["twin"]
    assert twin["shadow"] == {"comparisons": n, "agreements": n, "agreement": 1.0,
                              "mean_top1_prob_abs_diff": pytest.approx(0.0, abs=1e-5)}
    assert twin["requests"] == n and twin["errors"] == 0 and twin["images"] == n
    assert twin["mean_final_tokens"] == 65  # no merging: 8x8 patches + cls
    assert twin["mean_gflops"] > 0 and twin["images_per_s"] > 0
    assert 0 < twin["latency_ms"]["p50"] <= twin["latency_ms"]["p95"]

    metrics = httpx.get(f"{server.url}/metrics").text
    series = {"model": "tiny", "experiment": "twins", "variant": "twin", "reference": "baseline"}
    assert labelled(metrics, "mame_shadow_comparisons_total", **series) == n
    assert labelled(metrics, "mame_shadow_agreements_total", **series) == n
    assert labelled(metrics, "mame_shadow_top1_prob_abs_diff_total", **series) < 1e-4
    assert labelled(metrics, "mame_shadow_dropped_total", **series) == 0
    # the shadow runs really ran on the reference variant: no request was routed to baseline
    assert labelled(metrics, "mame_batch_size_sum", model="tiny", variant="baseline") >= n
    assert labelled(metrics, "mame_requests_total", model="tiny", variant="baseline") == 0
    assert labelled(metrics, "mame_requests_total", experiment="twins", variant="twin", status="200") >= n


def test_answers_say_experiment_variant_and_assignment(server, images):
    data = images[0]
    cases = [
        ({}, ("tiny", "twins", "twin", "assigned")),  # the model's default experiment assigns
        ({"experiment": "twins"}, ("tiny", "twins", "twin", "assigned")),
        ({"variant": "mame-0.5"}, ("tiny", "twins", "mame-0.5", "override")),
        ({"experiment": "twins", "variant": "baseline"}, ("tiny", "twins", "baseline", "override")),
        ({"model": "plain"}, ("plain", None, "baseline", "default")),  # no experiment on that model
    ]
    for params, expected in cases:
        response = classify(server.url, data, **params)
        assert response.status_code == 200, (params, response.text)
        answer = response.json()
        assert (answer["model"], answer["experiment"], answer["variant"], answer["assignment"]) == expected, (
            params
        )
    for params, status, code in [({"experiment": "twins", "model": "plain"}, 422, "invalid_parameter"),
                                 ({"experiment": "nope"}, 404, "unknown_experiment"),
                                 ({"experiment": "twins", "top_k": "99"}, 422, "invalid_parameter"),
                                 ({"experiment": "twins", "variant": "nope"}, 404, "unknown_variant")]:
        response = classify(server.url, data, **params)
        assert (response.status_code, response.json()["error"]) == (status, code), params

    report = httpx.get(f"{server.url}/v1/experiments/twins").json()
    assert (
        report["variants"]["mame-0.5"]["overrides"] >= 1 and report["variants"]["mame-0.5"]["weight"] == 0.0
    )
    assert report["variants"]["mame-0.5"]["shadow"]["comparisons"] == 0  # overrides are never shadowed
    metrics = httpx.get(f"{server.url}/metrics").text
    assert labelled(metrics, "mame_requests_total", experiment="twins", variant="mame-0.5", status="200") >= 1
    assert labelled(metrics, "mame_requests_total", experiment="", model="plain", variant="baseline",
                    status="200") >= 1
    assert labelled(metrics, "mame_final_tokens_count", experiment="twins", variant="mame-0.5") >= 1
    # A refusal of a request naming only an experiment counts under that experiment's model, not model "".
    assert labelled(metrics, "mame_requests_total", experiment="twins", model="tiny", variant="",
                    status="422") >= 1
    assert labelled(metrics, "mame_requests_total", experiment="twins", model="tiny", variant="",
                    status="404") >= 1
    assert labelled(metrics, "mame_requests_total", experiment="twins", model="", status="422") == 0
    assert metric_values(metrics, "mame_experiment_weight") == {'{experiment="twins",variant="twin"}': 1.0}

    listed = httpx.get(f"{server.url}/v1/experiments").json()["experiments"]
    assert listed == [{"name": "twins", "model": "tiny", "status": "running", "split": {"twin": 1.0},
                       "sticky": "header:X-User-Id", "shadow": {"variant": "baseline", "rate": 1.0}}]
    missing = httpx.get(f"{server.url}/v1/experiments/nope")
    assert (missing.status_code, missing.json()["error"]) == (404, "unknown_experiment")
    assert 'experiment="nope"' not in metrics  # client-made names do not become series


def test_the_docs_promql_names_series_this_server_exports(server):
    exported = set()
    for kind_line in re.findall(
        r"^# TYPE (\S+) (\S+)$", httpx.get(f"{server.url}/metrics").text, re.MULTILINE
    ):
        name, kind = kind_line
        exported |= {"counter": {name}, "gauge": {name},  # the text format names counters with _total
                     "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"}}.get(kind, set())
    named = set(re.findall(r"\bmame_[a-z0-9_]+", "\n".join(doc_promql())))
    assert named and named <= exported, named - exported


def test_admin_endpoints_do_not_exist_without_a_token(server):
    auth = {"authorization": f"Bearer {TOKEN}"}
    calls = [
        httpx.post(
            f"{server.url}/v1/admin/experiments",
            headers=auth,
            json={"name": "x", "model": "tiny", "split": {"baseline": 1}},
        ),
        httpx.put(
            f"{server.url}/v1/admin/experiments/twins/split", headers=auth, json={"split": {"twin": 1}}
        ),
        httpx.delete(f"{server.url}/v1/admin/experiments/twins", headers=auth),
        httpx.get(f"{server.url}/v1/admin/changes"),
    ]
    for response in calls:
        assert (response.status_code, response.json()["error"]) == (404, "admin_disabled"), (
            response.request.url
        )
    assert httpx.get(f"{server.url}/v1/experiments/twins").json()["status"] == "running"


# ------------------------------------------------------- a server with admin and a small queue


@pytest.fixture(scope="module", params=list(LAYOUTS))
def admin_server(request):
    config = tiny_config(
        # 8 places sure for each variant the tests send (tome-r8 takes no traffic here)
        batching={"max_batch_size": 4, "max_wait_ms": 10, "max_queue": 25,
                  "queue_shares": {"mame-0.5": 1, "baseline": 1, "mame-0.9": 1, "tome-r8": 0}},
        experiments={"burst": {"model": "tiny", "split": {"mame-0.5": 1.0},
                               "shadow": {"variant": "baseline", "rate": 1.0}}})
    with running_server(config, env={"MAME_ADMIN_TOKEN": TOKEN}, args=LAYOUTS[request.param]) as proc:
        yield proc


def test_admin_auth_over_http(admin_server):
    url = f"{admin_server.url}/v1/admin/experiments"
    body = {"name": "auth-check", "model": "tiny", "split": {"baseline": 1.0}}
    missing = httpx.post(url, json=body)
    assert (missing.status_code, missing.json()["error"]) == (401, "unauthorized")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    for header in ("Basic dXNlcjpwdw==", "Bearer", f"Bearer {TOKEN} extra"):
        malformed = httpx.post(url, json=body, headers={"authorization": header})
        assert (malformed.status_code, malformed.json()["error"]) == (401, "unauthorized"), header
    wrong = httpx.post(url, json=body, headers={"authorization": "Bearer not-the-token"})
    assert (wrong.status_code, wrong.json()["error"]) == (403, "forbidden")
    # auth is checked before the body: a caller without the token learns nothing about the API
    assert httpx.post(url, json={"split": "junk"}).status_code == 401
    junk = {"authorization": "Bearer wrong", "content-type": "application/json"}
    # FastAPI parsed it first: 422
    assert httpx.post(url, content=b"{not json", headers=junk).status_code == 403
    assert httpx.get(f"{admin_server.url}/v1/admin/nope").status_code == 401  # as through front-ends
    for call in (lambda h: httpx.put(f"{url}/burst/split", json={"split": {"baseline": 1}}, headers=h),
                 lambda h: httpx.delete(f"{url}/burst", headers=h),
                 lambda h: httpx.get(f"{admin_server.url}/v1/admin/changes", headers=h)):
        assert call({}).status_code == 401
        assert call({"authorization": "Bearer wrong"}).status_code == 403
    assert httpx.get(f"{admin_server.url}/v1/experiments").json()["experiments"][0]["split"] == {
        "mame-0.5": 1.0
    }

    auth = {"authorization": f"Bearer {TOKEN}"}
    changes = httpx.get(f"{admin_server.url}/v1/admin/changes", headers=auth)
    assert changes.status_code == 200
    assert changes.json()["changes"][0] | {"time": 0} == {
        "time": 0, "action": "create", "experiment": "burst", "source": "config",
        "split_before": None, "split_after": {"mame-0.5": 1.0}, "reason": "", "version": 1}
    refusals = [
        (httpx.post(url, headers=auth, json={**body, "split": {"baseline": 0.9}}), 422, "invalid_parameter"),
        (
            httpx.post(url, headers={**auth, "content-type": "application/json"}, content=b"{not json"),
            422,
            "invalid_parameter",
        ),
        (
            httpx.post(
                url, headers={**auth, "content-type": "application/json"}, content=b'{"name": "\xff"}'
            ),
            422,
            "invalid_parameter",
        ),  # not UTF-8: FastAPI's 400, answered as the contract's 422
        (httpx.post(url, headers=auth, json={**body, "split": {"typo": 1.0}}), 404, "unknown_variant"),
        (httpx.post(url, headers=auth, json={**body, "model": "nope"}), 404, "unknown_model"),
        (httpx.post(url, headers=auth, json={**body, "name": "burst"}), 409, "experiment_exists"),
        (
            httpx.put(f"{url}/nope/split", headers=auth, json={"split": {"baseline": 1}}),
            404,
            "unknown_experiment",
        ),
        (httpx.delete(f"{url}/nope", headers=auth), 404, "unknown_experiment"),
        (
            httpx.post(url, headers=auth, json={**body, "name": "trailing-newline\n"}),
            422,
            "invalid_parameter",
        ),
    ]
    for response, status, code in refusals:
        assert (response.status_code, response.json()["error"]) == (status, code), response.text
    # Weights of 1e308 overflowed the sum: a text/plain 500 without an id, and the connection closed under
    # the client's next request. Now a 422, and the same connection serves the next call.
    with httpx.Client(base_url=admin_server.url, headers=auth) as client:
        huge = client.post("/v1/admin/experiments",
                           json={**body, "split": {"baseline": 1e308, "mame-0.5": 1e308}})
        assert (huge.status_code, huge.json()["error"]) == (422, "invalid_parameter"), huge.text
        assert "share of 1" in huge.json()["detail"] and huge.headers["x-request-id"]
        assert client.get("/v1/admin/changes").status_code == 200
        assert client.get("/healthz").status_code == 200


def test_runtime_split_change_moves_assignment_and_weight_gauge(admin_server, images):
    base, auth = admin_server.url, {"authorization": f"Bearer {TOKEN}"}
    created = httpx.post(
        f"{base}/v1/admin/experiments",
        headers=auth,
        json={
            "name": "split",
            "model": "tiny",
            "split": {"baseline": 0.3, "mame-0.9": 0.7},
            "sticky": "header:X-User-Id",
        },
    )
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "running" and created.json()["split"] == {
        "baseline": 0.3,
        "mame-0.9": 0.7,
    }

    def weights() -> dict[str, float]:
        return metric_values(httpx.get(f"{base}/metrics").text, "mame_experiment_weight")

    assert weights() == {'{experiment="burst",variant="mame-0.5"}': 1.0,
                         '{experiment="split",variant="baseline"}': 0.3,
                         '{experiment="split",variant="mame-0.9"}': 0.7}
    users = [f"user-{i}" for i in range(100)]

    async def assign() -> dict[str, str]:
        async with httpx.AsyncClient(timeout=60) as client:
            got = {}
            for start in range(0, len(users), 8):  # 8 at a time: each variant is sure of 8 places
                batch = users[start:start + 8]
                responses = await asyncio.gather(*(
                    client.post(f"{base}/v1/classify", params={"experiment": "split"}, content=images[0],
                                headers={**PNG, "X-User-Id": user}) for user in batch))
                for user, response in zip(batch, responses):
                    assert response.status_code == 200, response.text
                    answer = response.json()
                    assert (answer["experiment"], answer["assignment"]) == ("split", "assigned")
                    got[user] = answer["variant"]
            return got

    before = asyncio.run(assign())
    assert before == {u: expected_variant(created.json(), "split", u) for u in users}
    assert asyncio.run(assign()) == before  # sticky

    changed = httpx.put(f"{base}/v1/admin/experiments/split/split", headers=auth,
                        json={"split": {"baseline": 0.6, "mame-0.9": 0.4}})
    assert changed.status_code == 200, changed.text
    assert weights()['{experiment="split",variant="baseline"}'] == 0.6
    assert weights()['{experiment="split",variant="mame-0.9"}'] == 0.4
    after = asyncio.run(assign())
    assert after == {u: expected_variant(changed.json(), "split", u) for u in users}
    moved = [u for u in users if before[u] != after[u]]
    assert all(before[u] == "mame-0.9" and after[u] == "baseline" for u in moved)  # only to the growing one
    assert 0.15 <= len(moved) / len(users) <= 0.45, len(moved)  # 30 % of the hash space moved
    print(f"30/70 -> 60/40: {len(moved)} of {len(users)} users moved, all to the growing variant")

    stopped = httpx.delete(f"{base}/v1/admin/experiments/split", headers=auth)
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    assert stopped.json()["variants"]["baseline"]["requests"] >= 1
    assert set(weights()) == {'{experiment="burst",variant="mame-0.5"}'}
    gone = classify(base, images[0], experiment="split")
    assert (gone.status_code, gone.json()["error"]) == (404, "unknown_experiment")
    log = httpx.get(f"{base}/v1/admin/changes", headers=auth).json()["changes"]
    mine = [(c["action"], c["split_before"], c["split_after"]) for c in log if c["experiment"] == "split"]
    assert mine == [("create", None, {"baseline": 0.3, "mame-0.9": 0.7}),
                    ("update", {"baseline": 0.3, "mame-0.9": 0.7}, {"baseline": 0.6, "mame-0.9": 0.4}),
                    ("stop", {"baseline": 0.6, "mame-0.9": 0.4}, None)]
    assert "experiment split update by admin" in admin_server.log()


def test_shadow_load_never_gives_real_traffic_a_503(admin_server, images):
    """8 clients keep the variant's real queue (its share: 8 places of 25) full to the brim; every request
    is shadowed too."""
    clients, per_client = 8, 12
    statuses: list[int] = []

    async def client(index: int, http: httpx.AsyncClient) -> None:
        for i in range(per_client):
            response = await http.post(
                f"{admin_server.url}/v1/classify", content=images[(index + i) % len(images)], headers=PNG
            )
            statuses.append(response.status_code)
            if response.status_code == 200:
                assert response.json()["experiment"] == "burst"

    async def burst() -> None:
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            await asyncio.gather(*(client(i, http) for i in range(clients)))

    asyncio.run(burst())
    assert statuses == [200] * (clients * per_client), sorted(set(statuses))
    series = {"model": "tiny", "experiment": "burst", "variant": "mame-0.5", "reference": "baseline"}
    total = clients * per_client

    def accounted() -> tuple[float, float] | None:
        metrics = httpx.get(f"{admin_server.url}/metrics").text
        done = (labelled(metrics, "mame_shadow_comparisons_total", **series),
                labelled(metrics, "mame_shadow_dropped_total", **series))
        return done if sum(done) == total else None

    compared, dropped = wait_for(accounted, what="every shadow run compared or dropped")
    print(f"{total} requests, all 200; shadow runs: {compared:.0f} compared, {dropped:.0f} dropped")
    assert compared > 0
    report = httpx.get(f"{admin_server.url}/v1/experiments/burst").json()["variants"]["mame-0.5"]
    assert report["shadow"]["comparisons"] == compared and report["errors"] == 0
    assert 0 <= report["shadow"]["agreement"] <= 1
