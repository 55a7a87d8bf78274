"""One split for the fleet: replicas (registries) following a shared split file, and admin changes written
through it. Real files and the real split store; the judge's side is tests/test_abtest_*.py."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest
from serverproc import metric_values, sample_images, tiny_config
from test_http_app import app_of, running

from abtest.split_store import FileSplitStore, SplitState, with_change
from server.config import parse_config
from server.experiments.buckets import SCALE, bucket_point, variant_at
from server.experiments.config import ExperimentConfig
from server.experiments.fleet import FleetOptions, SplitSync
from server.experiments.registry import Assignment, ExperimentRegistry, ModelVariants, UnknownVariant
from server.wire.errors import ApiError

VARIANTS = frozenset({"baseline", "mame-0.8", "mame-0.2"})
CONFIG = ExperimentConfig(
    model="vit",
    split={"baseline": 0.5, "mame-0.8": 0.25, "mame-0.2": 0.25},
    sticky="header:X-User-Id",
    shadow={"variant": "baseline", "rate": 1.0},
    guardrails=[{"metric": "shadow_agreement", "min": 0.98}],
)
KEYS = [f"user-{i}" for i in range(2000)]


def replica() -> ExperimentRegistry:
    return ExperimentRegistry({"vit": ModelVariants(VARIANTS, "baseline")}, "vit", {"tau-ab": CONFIG})


def assigned(registry: ExperimentRegistry) -> list[str]:
    return [registry.choose(experiment="tau-ab", headers={"X-User-Id": k}).variant for k in KEYS]


def history(path) -> FileSplitStore:
    """A store whose ranges went through a few changes, so they differ from a fresh split's."""
    store = FileSplitStore(path)
    state = SplitState()
    for split in ({"baseline": 0.5, "mame-0.8": 0.25, "mame-0.2": 0.25},
                  {"baseline": 0.25, "mame-0.8": 0.5, "mame-0.2": 0.25},
                  {"baseline": 0.5, "mame-0.8": 0.25, "mame-0.2": 0.25}):
        state = with_change(state, "tau-ab", split, action="set", source="operator", now=1.0)
    store.write(state)
    return store


def test_replicas_take_the_stores_ranges_as_they_are_and_assign_alike(tmp_path):
    store = history(tmp_path / "splits.yaml")
    entry = store.read().experiments["tau-ab"]
    fresh = replica()
    assert [(r.start, r.end, r.variant) for r in fresh.ranges("tau-ab")] != list(entry.ranges)
    one, two = replica(), replica()
    SplitSync(one, store.path).poll()
    SplitSync(two, store.path).poll()
    assert [(r.start, r.end, r.variant) for r in one.ranges("tau-ab")] == list(entry.ranges)
    assert assigned(one) == assigned(two)
    assert assigned(one) == [variant_at(one.ranges("tau-ab"), bucket_point("tau-ab", k)) for k in KEYS]
    assert assigned(one) != assigned(fresh)  # what a replica rebalancing its own history would do
    assert one.version("tau-ab") == (3, True)
    assert one.report("tau-ab")["version"] == 3


def test_a_rollback_in_the_store_reaches_a_replica_logged_with_its_reason(tmp_path, caplog):
    store = history(tmp_path / "splits.yaml")
    registry, gauges = replica(), []
    sync = SplitSync(registry, store.path, on_change=lambda: gauges.append(registry.current_weights()))
    sync.poll()
    assert sync.poll() == []  # nothing changed: nothing applied, nothing logged
    rolled = {"baseline": 0.75, "mame-0.8": 0.25, "mame-0.2": 0.0}
    store.update(lambda s: with_change(s, "tau-ab", rolled, action="rollback", source="judge",
                                       reason="mame-0.2: shadow_agreement 0.7 fails >= 0.98"))
    os.utime(store.path, ns=(1, 1))  # a change within the file system's timestamp resolution still shows
    with caplog.at_level(logging.INFO, logger="server.experiments"):
        applied = sync.poll()
    assert [(c.action, c.source, c.version) for c in applied] == [("rollback", "store/judge", 4)]
    assert applied[0].split_after == rolled and "shadow_agreement" in applied[0].reason
    assert "rollback by store/judge" in caplog.text and "fails >= 0.98" in caplog.text
    assert registry.current_weights()["tau-ab"] == rolled and gauges[-1]["tau-ab"] == rolled
    assert "mame-0.2" not in assigned(registry)
    assert registry.changes()[-1].reason.startswith("mame-0.2")


def test_a_store_that_does_not_fit_the_config_keeps_the_split_in_force(tmp_path, caplog):
    store = FileSplitStore(tmp_path / "splits.yaml")
    store.write(with_change(SplitState(), "tau-ab", {"baseline": 0.5, "tome-r8": 0.5}, action="set",
                            source="operator"))
    store.update(lambda s: with_change(s, "other", {"a": 1.0}, action="set", source="operator"))
    registry = replica()
    with caplog.at_level(logging.ERROR, logger="server.experiments"):
        sync = SplitSync(registry, store.path)
        assert sync.poll() == []
        sync.apply(store.read())  # the same problem again: logged once
    assert registry.current_weights()["tau-ab"] == dict(CONFIG.split)
    assert caplog.text.count("tome-r8") == 1 and caplog.text.count("'other'") == 1
    with pytest.raises(UnknownVariant):
        registry.set_ranges("tau-ab", {"baseline": 0.5, "tome-r8": 0.5}, [(0, SCALE // 2, "baseline"),
                                                                          (SCALE // 2, SCALE, "tome-r8")],
                            version=9)


def test_admin_changes_go_through_the_store_and_reach_the_other_replica(tmp_path):
    path = tmp_path / "splits.yaml"
    one, two = replica(), replica()
    sync_one, sync_two = SplitSync(one, path), SplitSync(two, path)
    assert sync_one.poll() == [] and sync_two.poll() == []  # no file yet: the config's split
    entry = sync_one.change("tau-ab", {"baseline": 0.8, "mame-0.8": 0.1, "mame-0.2": 0.1}, action="set")
    # first the split in force, then the change: ranges rebalanced from the config's, as a replica did
    assert [(c.action, c.source) for c in entry.changes] == [("set", "config"), ("set", "admin")]
    assert entry.version == 2 and one.version("tau-ab") == (2, True)  # applied here at once
    assert [c.action for c in sync_two.poll()] == ["update"]
    assert assigned(one) == assigned(two) and two.changes()[-1].source == "store/admin"
    sync_one.change("tau-ab", None, action="stop")
    sync_two.poll()
    assert two.version("tau-ab") == (3, False) and two.changes()[-1].action == "stop"
    # a restarted replica: the config starts the experiment, the store stops it again
    restarted = replica()
    SplitSync(restarted, path).poll()
    assert restarted.version("tau-ab") == (3, False)
    # an operator's new split starts it again everywhere
    FileSplitStore(path).update(lambda s: with_change(s, "tau-ab", dict(CONFIG.split), action="set",
                                                      source="operator"))
    assert [c.action for c in sync_two.poll()] == ["create"]
    assert two.version("tau-ab") == (4, True)


def test_an_unwritable_store_is_a_503_and_changes_nothing(tmp_path):
    store = history(tmp_path / "splits.yaml")
    registry = replica()
    # the writer cannot write (as a read-only mount, or a ConfigMap the server may not patch)
    sync = SplitSync(registry, store.path, writer=f"file:{tmp_path / 'missing' / 'splits.yaml'}")
    sync.poll()
    with pytest.raises(ApiError) as refused:
        sync.change("tau-ab", {"baseline": 1.0, "mame-0.8": 0.0, "mame-0.2": 0.0}, action="set")
    assert refused.value.status == 503 and refused.value.code == "split_store_unavailable"
    assert registry.version("tau-ab") == (3, True) and store.read().experiments["tau-ab"].version == 3


# ------------------------------------------------------------------------------------------- intervals


def test_report_intervals_are_the_judges_from_this_replicas_whole_life_counts():
    from abtest import stats
    from server.experiments.stats import ShadowComparison

    registry = replica()
    route = {v: Assignment("vit", v, "tau-ab", "assigned") for v in ("baseline", "mame-0.2")}
    for i in range(3000):  # more than the 2,048-request window
        registry.record_request(route["baseline"], status=200, latency_s=0.006 + 0.00003 * (i % 100))
    for i in range(1000):
        registry.record_request(route["mame-0.2"], status=200, latency_s=0.03 + 0.0001 * (i % 100))
    for status, n in ((500, 20), (503, 50), (404, 30)):  # refusals and client errors are not the variant's
        for _ in range(n):
            registry.record_request(route["mame-0.2"], status=status, latency_s=0.001)
    for i in range(400):
        registry.record_shadow(route["mame-0.2"], ShadowComparison(i % 10 != 0, 0.1))
    report = registry.report("tau-ab", confidence=0.9)
    bad = report["variants"]["mame-0.2"]["intervals"]
    assert report["confidence"] == 0.9 and report["control"] == "baseline"
    assert bad["shadow_agreement"] == stats.wilson_interval(360, 400, 0.9).as_dict()
    assert bad["error_rate"] == stats.wilson_interval(20, 1020, 0.9).as_dict()
    assert bad["error_rate_diff"] == stats.rate_difference_interval(20, 1020, 0, 3000, 0.9).as_dict()
    ratio = bad["p95_latency_ratio"]
    assert 2 < ratio["low"] < ratio["estimate"] < ratio["high"] < 10  # as fine as the buckets
    base = report["variants"]["baseline"]["intervals"]
    assert base["p50_latency_s"]["low"] <= 0.0075 <= base["p50_latency_s"]["high"] <= 0.01
    assert "error_rate_diff" not in base  # the control is not compared with itself
    assert report["variants"]["baseline"]["latency_ms"]["samples"] == 2048  # the window; intervals: all


def test_report_over_http_takes_a_confidence_and_the_judges_fleet_view(tmp_path):
    from abtest import judge as jd

    judge = jd.Judge(tmp_path / "serving.yaml", FileSplitStore(tmp_path / "s.yaml"), None)
    judge.reports["tau-ab"] = {"experiment": "tau-ab", "verdict": "rollback", "ramp_step": None}
    server = jd.serve(judge, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    config = parse_config(tiny_config(experiments={"tau-ab": {
        "model": "tiny", "split": {"baseline": 0.5, "mame-0.9": 0.5}, "shadow": {"variant": "baseline",
                                                                                 "rate": 0.5}}}))

    async def check(client):
        await client.post("/v1/classify", params={"experiment": "tau-ab"}, content=sample_images()["flat"])
        report = (await client.get("/v1/experiments/tau-ab", params={"confidence": 0.99})).json()
        assert report["confidence"] == 0.99 and report["fleet"]["verdict"] == "rollback"
        assert (await client.get("/v1/experiments/tau-ab", params={"confidence": 1.5})).status_code == 422
        metrics = (await client.get("/metrics")).text
        ok = metric_values(metrics, "mame_successful_request_duration_seconds_count")
        assert sum(ok.values()) == 1

    try:
        asyncio.run(running(app_of(config, fleet=FleetOptions(judge_url=url)), check))
    finally:
        server.shutdown()

    async def no_judge(client):  # nothing listens there: the replica's own report, fleet null
        assert (await client.get("/v1/experiments/tau-ab")).json()["fleet"] is None

    asyncio.run(running(app_of(config, fleet=FleetOptions(judge_url=url)), no_judge))


def test_admin_split_over_http_goes_through_the_store(tmp_path, monkeypatch):
    path = tmp_path / "splits.yaml"
    history(path)
    experiment = {k: v for k, v in CONFIG.model_dump().items() if v is not None}
    config = parse_config(tiny_config(
        variants={"baseline": {"method": "none"}, "mame-0.8": {"method": "mame", "tau": 0.8},
                  "mame-0.2": {"method": "mame", "tau": 0.2}},
        experiments={"tau-ab": {**experiment, "model": "tiny"}}))
    monkeypatch.setenv("MAME_ADMIN_TOKEN", "secret")
    admin = {"authorization": "Bearer secret"}
    app = app_of(config, fleet=FleetOptions(split_store=path, poll_s=0.1))
    other = replica()
    watcher = SplitSync(other, path)
    watcher.poll()

    async def check(client):
        metrics = (await client.get("/metrics")).text
        assert metric_values(metrics, "mame_experiment_split_version") == {'{experiment="tau-ab"}': 3.0}
        new = {"baseline": 0.6, "mame-0.8": 0.2, "mame-0.2": 0.2}
        changed = await client.put("/v1/admin/experiments/tau-ab/split", json={"split": new}, headers=admin)
        assert changed.status_code == 200 and changed.json()["version"] == 4
        bad = await client.put("/v1/admin/experiments/tau-ab/split", headers=admin,
                               json={"split": {"baseline": 0.5, "tome-r8": 0.5}})
        assert bad.status_code == 404 and bad.json()["error"] == "unknown_variant"
        assert FileSplitStore(path).read().experiments["tau-ab"].version == 4  # a bad split never got there
        # the judge rolls back in the store: this replica's poller applies it
        FileSplitStore(path).update(lambda s: with_change(
            s, "tau-ab", {"baseline": 0.8, "mame-0.8": 0.2, "mame-0.2": 0.0}, action="rollback",
            source="judge", reason="mame-0.2 fails"))
        for _ in range(100):
            metrics = (await client.get("/metrics")).text
            if metric_values(metrics, "mame_experiment_split_version") == {'{experiment="tau-ab"}': 5.0}:
                break
            await asyncio.sleep(0.05)
        weights = metric_values(metrics, "mame_experiment_weight")
        assert weights['{experiment="tau-ab",variant="mame-0.2"}'] == 0.0
        changes = (await client.get("/v1/admin/changes", headers=admin)).json()["changes"]
        assert [(c["action"], c["source"], c["version"]) for c in changes[-3:]] == [
            ("update", "store/operator", 3), ("update", "store/admin", 4), ("rollback", "store/judge", 5)]
        assert changes[-1]["reason"] == "mame-0.2 fails"
        stopped = await client.delete("/v1/admin/experiments/tau-ab", headers=admin)
        assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"

    asyncio.run(running(app, check))
    watcher.poll()
    assert other.version("tau-ab") == (6, False)  # the other replica: the admin's stop, through the store
