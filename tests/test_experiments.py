"""The pure core of A/B experiments: config, bucket ranges, routing, reports, shadow, admin auth."""

from __future__ import annotations

import logging
import random
import threading

import pytest
from pydantic import ValidationError

from server.experiments.buckets import (
    SCALE,
    BucketRange,
    bucket_point,
    check_ranges,
    initial_ranges,
    key_for_request,
    range_shares,
    rebalance,
    should_shadow,
    variant_at,
)
from server.experiments.config import ExperimentConfig, NewExperiment, SplitChange
from server.experiments.registry import (
    Assignment,
    ExperimentError,
    ExperimentExists,
    ExperimentRegistry,
    ModelVariants,
    UnknownExperiment,
    UnknownModel,
    UnknownVariant,
)
from server.experiments.stats import ShadowComparison, Top1, VariantStats, compare_top1, percentile
from server.wire.admin import admin_token_from_env, check_admin

KEYS = [f"user-{i}" for i in range(10_000)]
VARIANTS = frozenset({"baseline", "mame-0.9", "mame-0.8", "tome-r13"})


def assign_all(ranges: tuple[BucketRange, ...], experiment: str = "tau-ab") -> dict[str, str]:
    return {k: variant_at(ranges, bucket_point(experiment, k)) for k in KEYS}


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_registry(clock: FakeClock | None = None, **experiments: ExperimentConfig) -> ExperimentRegistry:
    models = {
        "vit": ModelVariants(VARIANTS, "mame-0.9"),
        "deit": ModelVariants(frozenset({"baseline", "mame-0.8"}), "baseline"),
    }
    return ExperimentRegistry(
        models, "vit", experiments, rng=random.Random(7), clock=clock or FakeClock(), wall_clock=lambda: 0.0
    )


def ab(split: dict[str, float], **kw) -> ExperimentConfig:
    return ExperimentConfig(model="vit", split=split, **{"sticky": "header:X-User-Id", **kw})


def user(key: str) -> dict[str, str]:
    return {"x-user-id": key}


# --------------------------------------------------------------------------------------------- config


def test_config_accepts_the_design_example():
    cfg = ExperimentConfig.model_validate(
        {
            "model": "vit-b16",
            "split": {"baseline": 0.5, "mame-0.8": 0.5},
            "sticky": "header:X-User-Id",
            "shadow": {"variant": "baseline", "rate": 0.05},
        }
    )
    assert cfg.split == {"baseline": 0.5, "mame-0.8": 0.5}
    assert cfg.shadow is not None and cfg.shadow.rate == 0.05


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ({"a": 0.3, "b": 0.6}, "sum to 0.9"),
        ({"a": 1.2, "b": -0.2}, "negative"),
        ({}, "split is empty"),
        ({"a": float("nan"), "b": 1.0}, "finite"),
        ({"a": True}, "finite number"),
        ({"": 1.0}, "empty variant name"),
        ([("a", 1.0)], "must be a mapping"),
        ({"a": 1e308, "b": 1e308}, "share of 1"),  # overflowed math.fsum: a 500, a traceback at start-up
    ],
)
def test_config_rejects_bad_splits_with_specific_errors(split, message):
    with pytest.raises(ValidationError, match=message):
        ExperimentConfig(model="vit", split=split)


def test_config_sum_tolerance_is_1e6():
    ExperimentConfig(model="vit", split={"a": 0.3, "b": 0.7000005})
    with pytest.raises(ValidationError, match="not 1"):
        ExperimentConfig(model="vit", split={"a": 0.3, "b": 0.700002})


@pytest.mark.parametrize("sticky", ["header:X-User-Id", "query:user", "client", None])
def test_config_sticky_forms(sticky):
    assert ab({"baseline": 1.0}, sticky=sticky).sticky == sticky


@pytest.mark.parametrize(
    ("sticky", "message"),
    [
        ("cookie:id", "must be 'header"),
        ("header:", "names no header"),
        ("header:X User", "valid HTTP header"),
        ("query:", "names no query"),
        ("ip", "must be 'header"),
        ("header:X-Mame-User", "reserved"),  # dropped on arrival: the key would never be seen
    ],
)
def test_config_rejects_bad_sticky(sticky, message):
    with pytest.raises(ValidationError, match=message):
        ab({"baseline": 1.0}, sticky=sticky)


def test_config_forbids_extra_keys_and_bad_shadow():
    with pytest.raises(ValidationError, match="Extra inputs"):
        ExperimentConfig(model="vit", split={"a": 1.0}, stickiness="client")
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        ab({"baseline": 1.0}, shadow={"variant": "baseline", "rate": 1.5})
    with pytest.raises(ValidationError, match="Extra inputs"):
        ab({"baseline": 1.0}, shadow={"variant": "baseline", "rate": 0.1, "prio": 1})


JUDGED = {
    "control": "baseline",
    "level": 0.05,
    "guardrails": [
        {"metric": "shadow_agreement", "min": 0.98},
        {"metric": "p95_latency_ratio", "max": 1.1},
        {"metric": "error_rate_diff", "max": 0.005},
    ],
    "ramp": {"steps": [0.01, 0.05, 0.25, 0.5], "min_samples": 2000},
    "on_fail": "rollback",
}


def test_config_accepts_the_judges_keys_with_the_judges_schema():
    from abtest.guardrails import JUDGE_KEYS, JudgedExperiment

    cfg = ab({"baseline": 0.99, "mame-0.8": 0.01}, shadow={"variant": "baseline", "rate": 0.05}, **JUDGED)
    assert set(JUDGE_KEYS) <= set(ExperimentConfig.model_fields)
    judged = JudgedExperiment.model_validate(cfg.model_dump())  # what the judge reads, round-tripped
    assert judged.guardrails == cfg.guardrails and judged.ramp == cfg.ramp
    assert cfg.control_variant == "baseline" and cfg.ramp.steps[-1] == 0.5
    # no control named: the shadow's reference is the control
    assert ab({"a": 0.5, "b": 0.5}, shadow={"variant": "b", "rate": 0.1}).control_variant == "b"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"control": "nope"}, "control 'nope' is not in the split"),
        ({"guardrails": [{"metric": "shadow_agreement", "min": 1.5}]}, "rate limit must be in"),
        ({"guardrails": [{"metric": "latency", "max": 1}]}, "unknown guardrail metric"),
        ({"ramp": {"steps": [0.5, 0.1]}}, "ramp steps must increase"),
        ({"on_fail": "panic"}, "on_fail"),
        ({"level": 1.5}, "level"),
        ({"shadow": None}, "shadow_agreement guardrail needs shadow"),
        ({"control": None, "shadow": None, "guardrails": [{"metric": "error_rate", "max": 0.01}]},
         "compare against a control"),
    ],
)
def test_config_refuses_bad_judge_keys_with_specific_errors(change, message):
    body = {"split": {"baseline": 0.99, "mame-0.8": 0.01}, "shadow": {"variant": "baseline", "rate": 0.05},
            **JUDGED, **change}
    with pytest.raises(ValidationError, match=message):
        ExperimentConfig(model="vit", **body)


def test_config_check_variants_names_the_unknown_one():
    cfg = ab({"baseline": 0.5, "mame-0.7": 0.5}, shadow={"variant": "base", "rate": 0.1})
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['mame-0.7'\]"):
        cfg.check_variants(VARIANTS)
    with pytest.raises(ValueError, match="shadow variant 'base'"):
        ab({"baseline": 1.0}, shadow={"variant": "base", "rate": 0.1}).check_variants(VARIANTS)


# ----------------------------------------------------------------------------------------- assignment


def test_hash_is_stable_and_depends_on_experiment():
    assert bucket_point("tau-ab", "alice") == bucket_point("tau-ab", "alice")
    assert bucket_point("tau-ab", "alice") != bucket_point("other", "alice")
    # pinned value: the assignment must not change across processes, hosts or Python versions
    assert bucket_point("tau-ab", "alice") == int.from_bytes(
        __import__("hashlib").blake2b(b"tau-ab\x00alice", digest_size=8).digest(), "big"
    )
    assert all(0 <= bucket_point("e", k) < SCALE for k in KEYS[:100])


def test_10000_keys_at_30_70_land_within_2_points():
    ranges = initial_ranges({"baseline": 0.3, "mame-0.8": 0.7})
    counts = {"baseline": 0, "mame-0.8": 0}
    for v in assign_all(ranges).values():
        counts[v] += 1
    assert abs(counts["baseline"] / len(KEYS) - 0.3) <= 0.02, counts
    assert abs(counts["mame-0.8"] / len(KEYS) - 0.7) <= 0.02, counts


def test_same_key_always_gets_the_same_variant():
    reg = make_registry(e=ab({"baseline": 0.3, "mame-0.8": 0.7}))
    first = {k: reg.choose(headers=user(k)).variant for k in KEYS[:500]}
    for _ in range(3):
        assert {k: reg.choose(headers=user(k)).variant for k in KEYS[:500]} == first
    assert set(first.values()) == {"baseline", "mame-0.8"}


def test_30_70_to_40_60_moves_about_10_percent_and_never_from_growing_to_shrinking():
    old = initial_ranges({"baseline": 0.3, "mame-0.8": 0.7})
    new = rebalance(old, {"baseline": 0.4, "mame-0.8": 0.6})
    before, after = assign_all(old), assign_all(new)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert abs(len(moved) / len(KEYS) - 0.10) <= 0.02, len(moved)
    # baseline grows: none of its keys leave; every moved key goes mame-0.8 -> baseline
    assert all(before[k] == "mame-0.8" and after[k] == "baseline" for k in moved)
    assert range_shares(new) == pytest.approx({"baseline": 0.4, "mame-0.8": 0.6}, abs=1e-15)
    # mame-0.8 keeps its lowest part; the freed top tenth goes to baseline
    assert [r.variant for r in new] == ["baseline", "mame-0.8", "baseline"]
    assert [r.end / SCALE for r in new] == pytest.approx([0.3, 0.9, 1.0])


def test_rehash_would_move_more_keys_than_rebalance():
    """The point of bucket ranges: a naive re-layout of contiguous ranges moves more keys."""
    old = initial_ranges({"a": 0.3, "b": 0.4, "c": 0.3})
    new_weights = {"a": 0.2, "b": 0.4, "c": 0.4}
    before = assign_all(old)
    moved_rebalance = sum(before[k] != v for k, v in assign_all(rebalance(old, new_weights)).items())
    moved_relayout = sum(before[k] != v for k, v in assign_all(initial_ranges(new_weights)).items())
    assert moved_rebalance < 0.12 * len(KEYS) < moved_relayout


def _measure_moved(old: tuple[BucketRange, ...], new: tuple[BucketRange, ...]) -> dict[tuple[str, str], int]:
    """Exact size of the hash space that moves from variant x to y (from range intersections)."""
    moved: dict[tuple[str, str], int] = {}
    for a in old:
        for b in new:
            overlap = min(a.end, b.end) - max(a.start, b.start)
            if overlap > 0 and a.variant != b.variant:
                moved[(a.variant, b.variant)] = moved.get((a.variant, b.variant), 0) + overlap
    return moved


def test_rebalance_invariants_over_random_weight_changes():
    rng = random.Random(1)
    names = ["a", "b", "c", "d", "e"]
    ranges = initial_ranges({"a": 0.5, "b": 0.5})
    most_intervals = 1
    for _ in range(300):
        chosen = rng.sample(names, rng.randint(1, len(names)))
        raw = [rng.choice([0.0, rng.random()]) for _ in chosen]
        if sum(raw) == 0:
            raw[0] = 1.0
        weights = {v: w / sum(raw) for v, w in zip(chosen, raw)}
        old_sizes = {v: s * SCALE for v, s in range_shares(ranges).items()}
        new = rebalance(ranges, weights)
        check_ranges(new)
        new_share = range_shares(new)
        for v, w in weights.items():
            assert new_share.get(v, 0.0) == pytest.approx(w, abs=1e-12)
        moved = _measure_moved(ranges, new)
        for src, dst in moved:
            # keys leave only variants that shrink and land only in variants that grow
            assert weights.get(src, 0.0) * SCALE < old_sizes.get(src, 0) + 1e4, (src, dst)
            assert weights.get(dst, 0.0) * SCALE > old_sizes.get(dst, 0) - 1e4, (src, dst)
        # the least possible share moves: the total variation distance between the splits
        tv = sum(max(0.0, weights.get(v, 0.0) - old_sizes.get(v, 0) / SCALE) for v in names)
        assert sum(moved.values()) / SCALE == pytest.approx(tv, abs=1e-12)
        ranges = new
        most_intervals = max(most_intervals, *(sum(r.variant == v for r in ranges) for v in names))
    assert most_intervals > 1  # the invariants were checked on fragmented splits too


def test_rebalance_handles_removed_and_added_variants():
    old = initial_ranges({"a": 0.5, "b": 0.5})
    new = rebalance(old, {"a": 0.5, "c": 0.5})  # b removed, c added: c takes exactly b's range
    assert [(r.start, r.end, r.variant) for r in new] == [(0, SCALE // 2, "a"), (SCALE // 2, SCALE, "c")]


def test_a_shrinking_variant_keeps_its_lowest_intervals():
    fragmented = rebalance(initial_ranges({"a": 0.3, "b": 0.7}), {"a": 0.4, "b": 0.6})  # a: [0, .3) + [.9, 1)
    new = rebalance(fragmented, {"a": 0.2, "b": 0.8})
    assert [r.variant for r in new] == ["a", "b"]  # b's pieces [.2, .3), [.3, .9), [.9, 1) are joined
    assert [r.end / SCALE for r in new] == pytest.approx([0.2, 1.0])


def test_check_ranges_rejects_gaps():
    with pytest.raises(ValueError, match="gap or overlap"):
        check_ranges([BucketRange(0, 10, "a"), BucketRange(11, SCALE, "b")])
    with pytest.raises(ValueError, match="reach the end"):
        check_ranges([BucketRange(0, 10, "a")])


# -------------------------------------------------------------------------------------------- sticky


def test_key_for_request():
    headers = {"x-user-id": " 42 ", "Accept": "image/*"}
    assert key_for_request("header:X-User-Id", headers, {}, "10.0.0.1") == "42"
    assert key_for_request("header:X-Other", headers, {}, "10.0.0.1") is None
    assert key_for_request("header:X-User-Id", {"X-User-Id": "  "}, {}, None) is None
    assert key_for_request("query:user", {}, {"user": "bob"}, None) == "bob"
    assert key_for_request("query:user", {}, {}, None) is None
    assert key_for_request("client", headers, {}, "10.0.0.1") == "10.0.0.1"
    assert key_for_request("client", headers, {}, None) is None
    assert key_for_request(None, headers, {"user": "bob"}, "10.0.0.1") is None


# ------------------------------------------------------------------------------------------- routing


def test_routing_default_assigned_override():
    reg = make_registry()
    assert reg.choose() == Assignment("vit", "mame-0.9", None, "default")
    assert reg.choose(model="deit") == Assignment("deit", "baseline", None, "default")
    assert reg.choose(variant="tome-r13") == Assignment("vit", "tome-r13", None, "override")

    reg.create("tau-ab", ab({"baseline": 0.5, "mame-0.8": 0.5}))
    a = reg.choose(headers=user("alice"))  # the model's default experiment applies without naming it
    assert (a.experiment, a.assignment) == ("tau-ab", "assigned") and a.variant in {"baseline", "mame-0.8"}
    assert reg.choose(experiment="tau-ab", headers=user("alice")) == a
    assert reg.choose(model="deit", headers=user("alice")).experiment is None


def test_override_wins_over_the_split():
    reg = make_registry(e=ab({"baseline": 1.0}))
    for key in KEYS[:50]:
        a = reg.choose(variant="mame-0.8", headers=user(key))
        assert a == Assignment("vit", "mame-0.8", "e", "override")
    assert reg.choose(headers=user("x")).variant == "baseline"


def test_routing_errors_carry_contract_codes():
    reg = make_registry(e=ab({"baseline": 1.0}))
    with pytest.raises(UnknownExperiment) as err:
        reg.choose(experiment="nope")
    assert (err.value.code, err.value.status) == ("unknown_experiment", 404)
    with pytest.raises(UnknownModel):
        reg.choose(model="resnet")
    with pytest.raises(UnknownVariant, match="no variant 'mame-0.1'"):
        reg.choose(variant="mame-0.1")
    with pytest.raises(ExperimentError, match="runs on model 'vit', not 'deit'") as err:
        reg.choose(model="deit", experiment="e")
    assert err.value.status == 422


def test_the_experiments_sticky_setting_picks_the_key():
    by_query = make_registry(e=ab({"baseline": 0.5, "mame-0.8": 0.5}, sticky="query:user"))
    by_client = make_registry(e=ab({"baseline": 0.5, "mame-0.8": 0.5}, sticky="client"))
    unsticky = make_registry(e=ab({"baseline": 0.5, "mame-0.8": 0.5}, sticky=None))
    for k in KEYS[:100]:
        expected = variant_at(initial_ranges({"baseline": 0.5, "mame-0.8": 0.5}), bucket_point("e", k))
        assert by_query.choose(query={"user": k}, headers=user("ignored")).variant == expected
        assert by_client.choose(client_host=k).variant == expected
    # without a sticky setting even a request with a user header is drawn afresh each time
    assert len({unsticky.choose(headers=user("alice")).variant for _ in range(100)}) == 2


def test_unkeyed_requests_are_drawn_at_random():
    reg = make_registry(e=ab({"baseline": 0.3, "mame-0.8": 0.7}))
    draws = [reg.choose().variant for _ in range(4000)]
    assert abs(draws.count("baseline") / len(draws) - 0.3) < 0.03


# ------------------------------------------------------------------------------------------- control


def test_create_update_stop_and_change_log(caplog):
    reg = make_registry()
    with caplog.at_level(logging.INFO, logger="server.experiments"):
        reg.create("tau-ab", ab({"baseline": 0.3, "mame-0.8": 0.7}))
        before = {k: reg.choose(headers=user(k)).variant for k in KEYS[:2000]}
        reg.update_split("tau-ab", {"baseline": 0.4, "mame-0.8": 0.6})
        after = {k: reg.choose(headers=user(k)).variant for k in KEYS[:2000]}
    assert all(before[k] == after[k] for k in before if before[k] == "baseline")
    assert reg.current_weights() == {"tau-ab": {"baseline": 0.4, "mame-0.8": 0.6}}
    assert "experiment tau-ab update by admin" in caplog.text

    reg.stop("tau-ab")
    assert reg.current_weights() == {}
    assert reg.choose(headers=user("alice")) == Assignment("vit", "mame-0.9", None, "default")
    with pytest.raises(UnknownExperiment, match="is stopped"):
        reg.choose(experiment="tau-ab")
    with pytest.raises(UnknownExperiment):
        reg.update_split("tau-ab", {"baseline": 1.0})
    assert reg.report("tau-ab")["status"] == "stopped"
    assert [(c.action, c.split_before, c.split_after) for c in reg.changes()] == [
        ("create", None, {"baseline": 0.3, "mame-0.8": 0.7}),
        ("update", {"baseline": 0.3, "mame-0.8": 0.7}, {"baseline": 0.4, "mame-0.8": 0.6}),
        ("stop", {"baseline": 0.4, "mame-0.8": 0.6}, None),
    ]
    reg.create("tau-ab", ab({"mame-0.8": 1.0}))  # a stopped name can be reused
    assert reg.current_weights() == {"tau-ab": {"mame-0.8": 1.0}}


def test_control_rejects_bad_changes():
    reg = make_registry(e=ab({"baseline": 1.0}))
    with pytest.raises(ExperimentExists) as err:
        reg.create("e", ab({"baseline": 1.0}))
    assert err.value.status == 409
    with pytest.raises(ExperimentError, match="sum to 0.5"):
        reg.update_split("e", {"baseline": 0.5})
    with pytest.raises(UnknownVariant, match="mame-0.5"):
        reg.update_split("e", {"baseline": 0.5, "mame-0.5": 0.5})
    with pytest.raises(UnknownModel):
        reg.create("f", ExperimentConfig(model="resnet", split={"baseline": 1.0}))
    with pytest.raises(ExperimentError, match="name 'bad name'"):
        reg.create("bad name", ab({"baseline": 1.0}))
    with pytest.raises(ExperimentError, match="name 'nl\\\\n'"):  # "$" matched before a final newline
        reg.create("nl\n", ab({"baseline": 1.0}))
    assert reg.current_weights() == {"e": {"baseline": 1.0}}  # nothing half-applied
    assert [c.action for c in reg.changes()] == ["create"]


def test_admin_request_bodies():
    body = NewExperiment.model_validate(
        {"name": "tau-ab", "model": "vit", "split": {"baseline": 0.5, "mame-0.8": 0.5}, "sticky": "client"}
    )
    reg = make_registry()
    reg.create(body.name, body.config())
    assert reg.summaries() == [
        {
            "name": "tau-ab",
            "model": "vit",
            "status": "running",
            "split": {"baseline": 0.5, "mame-0.8": 0.5},
            "sticky": "client",
            "shadow": None,
        }
    ]
    with pytest.raises(ValidationError, match="experiment name 'a b'"):
        NewExperiment.model_validate({"name": "a b", "model": "vit", "split": {"baseline": 1.0}})
    with pytest.raises(ValidationError, match="Field required"):
        NewExperiment.model_validate({"model": "vit", "split": {"baseline": 1.0}})
    assert SplitChange.model_validate({"split": {"a": 0.4, "b": 0.6}}).split == {"a": 0.4, "b": 0.6}
    with pytest.raises(ValidationError, match="sum to 1.1"):
        SplitChange.model_validate({"split": {"a": 0.5, "b": 0.6}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        SplitChange.model_validate({"split": {"a": 1.0}, "model": "vit"})


def test_default_experiment_is_the_earliest_running_one():
    reg = make_registry()
    reg.create("first", ab({"baseline": 1.0}))
    reg.create("second", ab({"mame-0.8": 1.0}))
    assert reg.choose().experiment == "first"
    reg.stop("first")
    assert reg.choose().experiment == "second"
    reg.create("first", ab({"baseline": 1.0}))  # re-created: now the later one
    assert reg.choose().experiment == "second"


def test_registry_is_thread_safe_under_concurrent_use():
    reg = make_registry(e=ab({"baseline": 0.5, "mame-0.8": 0.5}))
    errors: list[BaseException] = []

    def traffic(worker: int) -> None:
        try:
            for i in range(400):
                a = reg.choose(headers=user(f"{worker}-{i}"))
                reg.record_request(a, status=200, latency_s=0.01, final_tokens=[100], gflops=[1.0])
        except BaseException as e:  # noqa: BLE001 - surface anything to the main thread
            errors.append(e)

    def control() -> None:
        for i in range(200):
            w = (i % 10) / 10
            reg.update_split("e", {"baseline": w, "mame-0.8": 1 - w})

    threads = [threading.Thread(target=traffic, args=(n,)) for n in range(4)] + [
        threading.Thread(target=control)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    check_ranges(reg.ranges("e"))
    variants = reg.report("e")["variants"]
    assert sum(v["requests"] for v in variants.values()) == 4 * 400


# ------------------------------------------------------------------------------------------ reports


def test_percentile_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.95) == 95
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([], 0.5) is None
    with pytest.raises(ValueError):
        percentile(values, 0.0)


def test_report_per_variant_figures():
    clock = FakeClock(1000.0)
    reg = make_registry(clock, e=ab({"baseline": 0.5, "mame-0.8": 0.5}))
    base = Assignment("vit", "baseline", "e", "assigned")
    mame = Assignment("vit", "mame-0.8", "e", "assigned")
    for i in range(100):
        clock.t = 1000.0 + i * 0.1  # 10 s of traffic
        reg.record_request(
            base, status=200, latency_s=(i + 1) / 1000, final_tokens=[197, 197], gflops=[17.5, 17.5]
        )
        reg.record_request(mame, status=200, latency_s=(i + 1) / 2000, final_tokens=[90], gflops=[8.0])
    reg.record_request(mame, status=503, latency_s=0.001)
    reg.record_request(mame, status=422, latency_s=0.001)  # a client error is not the variant's error
    reg.record_request(
        Assignment("vit", "tome-r13", "e", "override"),
        status=200,
        latency_s=0.02,
        final_tokens=[120],
        gflops=[10.0],
    )
    reg.record_request(Assignment("vit", "baseline", None, "default"), status=200, latency_s=1.0)  # ignored
    clock.t = 1010.0
    report = reg.report("e")
    b, m, t = (report["variants"][v] for v in ("baseline", "mame-0.8", "tome-r13"))
    assert list(report["variants"]) == ["baseline", "mame-0.8", "tome-r13"]
    assert (b["requests"], b["errors"], m["requests"], m["errors"]) == (100, 0, 102, 0)
    assert (b["refusals"], m["refusals"]) == (0, 1)  # a 503 turned away is not the variant's error
    assert m["status_counts"] == {"200": 100, "422": 1, "503": 1}
    assert b["latency_ms"]["p50"] == pytest.approx(50.0) and b["latency_ms"]["p95"] == pytest.approx(95.0)
    assert m["latency_ms"]["p95"] == pytest.approx(47.5)  # the 503 is not a latency sample
    assert b["mean_final_tokens"] == 197 and m["mean_final_tokens"] == 90
    assert b["mean_gflops"] == pytest.approx(17.5) and m["mean_gflops"] == pytest.approx(8.0)
    assert b["images_per_s"] == pytest.approx(200 / 10) and m["images_per_s"] == pytest.approx(100 / 10)
    assert (t["weight"], t["overrides"], t["requests"]) == (0.0, 1, 1)
    assert report["split"] == {"baseline": 0.5, "mame-0.8": 0.5}
    assert report["ranges"] == [[0.0, 0.5, "baseline"], [0.5, 1.0, "mame-0.8"]]


def test_images_per_s_is_over_a_sliding_window():
    stats = VariantStats(rate_window_s=10.0)
    for second in range(100):
        stats.record(status=200, latency_s=0.01, now=float(second), final_tokens=[1] * 5, gflops=[1.0] * 5)
    assert stats.images_per_s(now=100.0, started=0.0) == pytest.approx(5.0)
    assert len(stats.image_bins) <= 12  # bounded memory
    assert stats.images_per_s(now=200.0, started=0.0) == 0.0


def test_latency_window_is_bounded_and_recent():
    stats = VariantStats(latency_window=100)
    for _ in range(1000):
        stats.record(status=200, latency_s=1.0, now=0.0, final_tokens=[1], gflops=[1.0])
    for _ in range(100):
        stats.record(status=200, latency_s=0.01, now=0.0, final_tokens=[1], gflops=[1.0])
    assert stats.report(0.0, 0.0)["latency_ms"] == {"p50": 10.0, "p95": 10.0, "samples": 100, "window": 100}


def test_record_rejects_inconsistent_figures():
    stats = VariantStats()
    with pytest.raises(ValueError, match="2 token counts but 1 GFLOPs"):
        stats.record(status=200, latency_s=0.1, now=0.0, final_tokens=[1, 2], gflops=[1.0])
    with pytest.raises(ValueError, match="latency"):
        stats.record(status=200, latency_s=-1.0, now=0.0)


# -------------------------------------------------------------------------------------------- shadow


def test_should_shadow_rate():
    rng = random.Random(3)
    assert not any(should_shadow(0.0, rng) for _ in range(1000))
    assert all(should_shadow(1.0, rng) for _ in range(1000))
    hits = sum(should_shadow(0.05, rng) for _ in range(20_000))
    assert abs(hits / 20_000 - 0.05) < 0.01
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        should_shadow(1.5, rng)


def test_compare_top1():
    assert compare_top1(Top1(281, 0.7), Top1(281, 0.7)) == ShadowComparison(True, 0.0)
    c = compare_top1(Top1(281, 0.6), Top1(285, 0.9))
    assert not c.agree and c.prob_abs_diff == pytest.approx(0.3)
    with pytest.raises(ValueError, match="reference top-1"):
        compare_top1(Top1(1, 0.5), Top1(1, 1.5))


def test_shadow_report_counts_agreements_and_probability_differences():
    reg = make_registry(e=ab({"mame-0.8": 1.0}, shadow={"variant": "baseline", "rate": 1.0}))
    for i, key in enumerate(KEYS[:200]):
        a = reg.choose(headers=user(key))
        assert a.shadow_variant == "baseline"
        reference = Top1(random.Random(key).randrange(1000), 0.5)
        # one in four disagrees, its top-1 probability 0.25 away; the rest are the reference's own answer
        served = Top1(reference.index + 1, 0.25) if i % 4 == 0 else reference
        reg.record_shadow(a, compare_top1(served, reference))
    shadow = reg.report("e")["variants"]["mame-0.8"]["shadow"]
    assert shadow == {"comparisons": 200, "agreements": 150, "agreement": 0.75,
                      "mean_top1_prob_abs_diff": pytest.approx(50 * 0.25 / 200)}


def test_shadow_plan_follows_rate_and_skips_the_reference_itself():
    reg = make_registry(e=ab({"baseline": 0.5, "mame-0.8": 0.5}, shadow={"variant": "baseline", "rate": 0.2}))
    picks = [reg.choose(headers=user(k)) for k in KEYS[:5000]]
    assert all(a.shadow_variant is None for a in picks if a.variant == "baseline")
    mame = [a for a in picks if a.variant == "mame-0.8"]
    assert abs(sum(a.shadow_variant == "baseline" for a in mame) / len(mame) - 0.2) < 0.03
    assert reg.choose(variant="mame-0.8").shadow_variant is None  # overrides are not shadowed


# -------------------------------------------------------------------------------------------- admin


def test_admin_token_from_env():
    assert admin_token_from_env({}) is None
    assert admin_token_from_env({"MAME_ADMIN_TOKEN": "  "}) is None
    assert admin_token_from_env({"MAME_ADMIN_TOKEN": "s3cret"}) == "s3cret"


@pytest.mark.parametrize(
    ("authorization", "token", "status", "error"),
    [
        ("Bearer s3cret", "s3cret", None, None),
        ("bearer s3cret", "s3cret", None, None),
        ("Bearer s3cret", None, 404, "admin_disabled"),
        (None, None, 404, "admin_disabled"),
        (None, "s3cret", 401, "unauthorized"),
        ("", "s3cret", 401, "unauthorized"),
        ("Basic czNjcmV0", "s3cret", 401, "unauthorized"),
        ("Bearer", "s3cret", 401, "unauthorized"),
        ("Bearer a b", "s3cret", 401, "unauthorized"),
        ("Bearer wrong", "s3cret", 403, "forbidden"),
        ("Bearer s3cret-longer", "s3cret", 403, "forbidden"),
        ("Bearer s3cre", "s3cret", 403, "forbidden"),
    ],
)
def test_admin_auth_statuses(authorization, token, status, error):
    denied = check_admin(authorization, token)
    if status is None:
        assert denied is None
    else:
        assert denied is not None and (denied.status, denied.error) == (status, error)
        if status == 401:
            assert denied.headers["WWW-Authenticate"].startswith("Bearer")
