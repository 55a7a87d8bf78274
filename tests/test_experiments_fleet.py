"""One split for the fleet: replicas (registries) following a shared split file, and admin changes written
through it. Real files and the real split store; the judge's side is tests/test_abtest_*.py."""

from __future__ import annotations

import logging
import os

import pytest

from abtest.split_store import FileSplitStore, SplitState, with_change
from server.experiments.buckets import SCALE, bucket_point, variant_at
from server.experiments.config import ExperimentConfig
from server.experiments.fleet import SplitSync
from server.experiments.registry import ExperimentRegistry, ModelVariants, UnknownVariant
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
