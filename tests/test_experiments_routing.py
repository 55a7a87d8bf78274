"""Experiments inside the server, in-process: config checks, routing, and the low-priority shadow queue."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from serverproc import tiny_config

from mame_core import MergeSettings
from server.config import BatchingConfig, ConfigError, load_config, parse_config
from server.engine.batching import QueueFull, Scheduler, SchedulerClosed, WorkItem
from server.experiments.buckets import bucket_point, variant_at
from server.http.app import build_registry
from server.wire.errors import ApiError

# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("experiments", "message"),
    [
        ({"x": {"model": "nope", "split": {"baseline": 1}}}, "experiments.x.model: unknown model 'nope'"),
        ({"x": {"model": "tiny", "split": {"baseline": 0.5, "typo": 0.5}}},
         "experiments.x: split names unknown variant(s) ['typo']"),
        ({"x": {"model": "tiny", "split": {"baseline": 1}, "shadow": {"variant": "typo", "rate": 0.1}}},
         "experiments.x: shadow variant 'typo'"),
        ({"bad name": {"model": "tiny", "split": {"baseline": 1}}}, "experiment name 'bad name' is invalid"),
        ({"x": {"model": "tiny", "split": {"baseline": 0.5, "mame-0.5": 0.4}}}, "sum to 0.9"),
        ({"x": {"model": "tiny", "split": {"baseline": 1}, "sticky": "cookie:id"}}, "sticky must be"),
    ],
)
def test_config_refuses_experiments_that_cannot_run(experiments, message):
    with pytest.raises(ConfigError) as info:
        parse_config(tiny_config(experiments=experiments), "serve.yaml")
    assert message in str(info.value) and "serve.yaml" in str(info.value)


def test_the_shipped_experiment_takes_the_default_models_traffic():
    registry = build_registry(load_config())
    route = registry.choose(model=None, variant=None, experiment=None,
                         headers={"X-User-Id": "alice"}, query={}, client_host="10.0.0.1")
    assert (route.model, route.experiment, route.assignment) == ("vit-b16", "tau-ab", "assigned")
    assert route.variant in {"baseline", "mame-0.8"}
    expected = variant_at(registry.ranges("tau-ab"), bucket_point("tau-ab", "alice"))
    assert route.variant == expected
    for _ in range(5):  # sticky
        again = registry.choose(model="vit-b16", variant=None, experiment=None,
                             headers={"x-user-id": "alice"}, query={}, client_host=None)
        assert again.variant == expected


# ------------------------------------------------------------------------------------------ routing


def two_model_registry():
    config = tiny_config(
        experiments={
            "ab": {
                "model": "tiny",
                "split": {"mame-0.5": 1.0},
                "sticky": "query:user",
                "shadow": {"variant": "baseline", "rate": 1.0},
            }
        }
    )
    config["models"]["plain"] = {**config["models"]["tiny"], "variants": {"baseline": {"method": "none"}},
                                 "default_variant": "baseline"}
    return build_registry(parse_config(config))


def route(registry, **params):
    return registry.choose(**{"model": None, "variant": None, "experiment": None, "headers": {},
                                     "query": {}, "client_host": None, **params})


def test_routing_rule_explicit_variant_then_experiment_then_model_default():
    registry = two_model_registry()
    assigned = route(registry, query={"user": "u1"})
    assert (assigned.variant, assigned.experiment, assigned.assignment) == ("mame-0.5", "ab", "assigned")
    assert assigned.shadow_variant == "baseline"  # rate 1.0
    named = route(registry, experiment="ab", model="tiny")
    assert (named.variant, named.experiment, named.assignment) == ("mame-0.5", "ab", "assigned")
    override = route(registry, variant="tome-r8")
    assert (override.variant, override.experiment, override.assignment) == ("tome-r8", "ab", "override")
    assert override.shadow_variant is None
    default = route(registry, model="plain")
    assert (default.model, default.variant, default.experiment, default.assignment) == (
        "plain", "baseline", None, "default")


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"experiment": "nope"}, 404, "unknown_experiment"),
        ({"experiment": "ab", "model": "plain"}, 422, "invalid_parameter"),
        ({"model": "nope"}, 404, "unknown_model"),
        ({"variant": "nope"}, 404, "unknown_variant"),
        ({"model": "plain", "variant": "mame-0.5"}, 404, "unknown_variant"),
    ],
)
def test_routing_errors_become_contract_http_errors(params, status, code):
    with pytest.raises(ApiError) as info:
        route(two_model_registry(), **params)
    assert (info.value.status, info.value.code) == (status, code)
    assert info.value.detail


def test_a_stopped_experiment_no_longer_routes():
    registry = two_model_registry()
    registry.stop("ab")
    assert route(registry).assignment == "default"
    with pytest.raises(ApiError) as info:
        route(registry, experiment="ab")
    assert info.value.code == "unknown_experiment"


# ------------------------------------------------------------------------------------- shadow queue

NONE = MergeSettings()


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def item(loop, variant: str = "a", deadline_s: float = 60.0) -> WorkItem:
    return WorkItem("m", variant, NONE, torch.zeros(3, 8, 8), 1, time.monotonic() + deadline_s,
                    loop.create_future(), loop)


def scheduler(max_batch_size: int = 2, max_wait_ms: float = 0.0, max_queue: int = 3) -> Scheduler:
    return Scheduler({"m": BatchingConfig(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                          max_queue=max_queue)})


def test_shadow_items_do_not_count_against_max_queue(loop):
    s = scheduler(max_queue=3)
    s.submit([item(loop, "ref"), item(loop, "ref")], shadow=True)
    s.submit([item(loop) for _ in range(3)])  # the real queue is still empty enough for its full limit
    assert (s.pending("m"), s.shadow_pending("m")) == (3, 2)
    with pytest.raises(QueueFull):
        s.submit([item(loop)])


def test_a_full_shadow_queue_refuses_the_shadow_run_only(loop):
    s = scheduler(max_batch_size=2, max_queue=3)
    assert s.shadow_limit("m") == 2
    s.submit([item(loop, "ref")], shadow=True)
    with pytest.raises(QueueFull, match="shadow"):
        s.submit([item(loop, "ref"), item(loop, "ref")], shadow=True)  # all or nothing
    assert s.shadow_pending("m") == 1
    s.submit([item(loop) for _ in range(3)])


def test_shadow_batches_run_only_when_no_real_queue_has_work(loop):
    s = scheduler(max_batch_size=2, max_wait_ms=0)
    s.submit([item(loop, "ref"), item(loop, "ref")], shadow=True)  # older and full, still second
    s.submit([item(loop, "a")])
    s.submit([item(loop, "b")])
    assert [i.variant for i in s.next_batch({"m"})] == ["a"]
    assert [i.variant for i in s.next_batch({"m"})] == ["b"]
    assert [i.variant for i in s.next_batch({"m"})] == ["ref", "ref"]
    assert s.shadow_pending("m") == 0


def test_a_waiting_real_image_holds_shadow_batches_back(loop):
    s = scheduler(max_batch_size=4, max_wait_ms=200)
    s.submit([item(loop, "ref")], shadow=True)
    time.sleep(0.25)  # the shadow item is due now
    s.submit([item(loop, "a")])  # not due for 200 ms, but it is work: the shadow waits behind it
    started = time.monotonic()
    first = s.next_batch({"m"})
    assert [i.variant for i in first] == ["a"] and time.monotonic() - started > 0.1
    assert [i.variant for i in s.next_batch({"m"})] == ["ref"]


def test_a_waiting_worker_wakes_up_for_a_shadow_run(loop):
    s = scheduler(max_batch_size=1)
    taken = []
    worker = threading.Thread(target=lambda: taken.append(s.next_batch({"m"})))
    worker.start()
    time.sleep(0.1)
    s.submit([item(loop, "ref")], shadow=True)
    worker.join(5)
    assert not worker.is_alive() and [i.variant for i in taken[0]] == ["ref"]


def test_expired_shadow_runs_free_their_places(loop):
    s = scheduler(max_batch_size=2)
    stale = [item(loop, "ref", deadline_s=0.01), item(loop, "ref", deadline_s=0.01)]
    s.submit(stale, shadow=True)
    time.sleep(0.05)
    s.submit([item(loop, "ref")], shadow=True)  # fits: the stale ones are gone
    assert s.shadow_pending("m") == 1
    loop.run_until_complete(asyncio.sleep(0))
    for stale_item in stale:
        with pytest.raises(TimeoutError):
            stale_item.future.result()


def test_close_drops_queued_shadow_runs_and_drains_real_ones(loop):
    s = scheduler(max_batch_size=2, max_wait_ms=10_000)
    shadow = [item(loop, "ref")]
    s.submit(shadow, shadow=True)
    s.submit([item(loop, "a")])
    s.close()
    assert [i.variant for i in s.next_batch({"m"})] == ["a"]
    assert s.next_batch({"m"}) is None
    loop.run_until_complete(asyncio.sleep(0))
    with pytest.raises(SchedulerClosed):
        shadow[0].future.result()
    with pytest.raises(SchedulerClosed):
        s.submit([item(loop, "ref")], shadow=True)


# --------------------------------------------------------------------------- the PromQL of docs/ab_testing.md

DOC = Path(__file__).resolve().parent.parent / "docs" / "ab_testing.md"


def doc_promql() -> list[str]:
    """Each expression of the ```promql blocks of docs/ab_testing.md: a run of lines between comments."""
    expressions = []
    for block in re.findall(r"```promql\n(.*?)```", DOC.read_text(), re.DOTALL):
        current: list[str] = []
        for line in [*block.splitlines(), "#"]:
            if line.strip() and not line.lstrip().startswith("#"):
                current.append(line)
            elif current:
                expressions.append("\n".join(current))
                current = []
    return expressions


def test_the_doc_has_the_comparisons_the_issue_asks_for():
    text = "\n".join(doc_promql())
    for series in ("mame_request_duration_seconds_bucket", "mame_images_total", "mame_final_tokens_sum",
                   "mame_shadow_agreements_total", "mame_shadow_comparisons_total", "mame_experiment_weight"):
        assert series in text, series
    assert len(doc_promql()) >= 10


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) is not installed")
def test_the_docs_promql_parses_with_promtool(tmp_path):
    rules = {"groups": [{"name": "ab_testing_doc", "rules": [
        {"record": f"ab_testing_doc_query_{i}", "expr": expr} for i, expr in enumerate(doc_promql())]}]}
    path = tmp_path / "doc_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(doc_promql())} rules found" in result.stdout + result.stderr
    # and promtool does catch a broken expression in this set-up
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"record": "broken", "expr": "sum by (variant (rate(mame_images_total[5m]))"}]}]}))
    assert (
        subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, check=False).returncode
        != 0
    )
