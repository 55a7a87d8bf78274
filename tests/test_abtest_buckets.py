"""Bucket ranges shared through the split store: the server's arithmetic, and one answer for every replica."""

import random

import pytest

from abtest import buckets
from abtest.split_store import SplitState, SplitStoreError, parse_state, with_change


def _server_ranges(ranges):
    return tuple((r.start, r.end, r.variant) for r in ranges)


def test_same_ranges_as_the_server_for_random_split_histories():
    experiments = pytest.importorskip("server.experiments")
    rng = random.Random(3)
    variants = ["baseline", "mame-0.9", "mame-0.8", "tome"]
    for _ in range(30):
        split = {"baseline": 0.5, "mame-0.8": 0.5}
        ours, theirs = buckets.initial_ranges(split), experiments.initial_ranges(split)
        assert ours == _server_ranges(theirs)
        for _ in range(6):
            chosen = rng.sample(variants, rng.randint(1, 4))
            raw = [rng.random() for _ in chosen]
            split = {v: w / sum(raw) for v, w in zip(chosen, raw)}
            ours, theirs = buckets.rebalance(ours, split), experiments.rebalance(theirs, split)
            assert ours == _server_ranges(theirs)


def test_rebalance_moves_only_what_the_shares_require():
    a = buckets.initial_ranges({"baseline": 0.3, "mame": 0.7})
    b = buckets.rebalance(a, {"baseline": 0.4, "mame": 0.6})
    assert buckets.shares_of(b) == pytest.approx({"baseline": 0.4, "mame": 0.6})
    # baseline grows: it keeps all of its old range
    assert all(any(s <= start and end <= e for s, e, v in b if v == "baseline") for start, end, _ in a[:1])


def test_store_ranges_are_one_answer_for_every_replica():
    """A replica that starts late reads the same ranges as one that saw every change (not initial_ranges)."""
    state = with_change(SplitState(), "e", {"a": 0.3, "b": 0.7}, action="set", source="op")
    state = with_change(state, "e", {"a": 0.6, "b": 0.4}, action="set", source="op")
    stored = state.experiments["e"].ranges
    assert stored != buckets.initial_ranges({"a": 0.6, "b": 0.4})  # history matters
    from abtest.split_store import dump_state

    assert parse_state(dump_state(state)).experiments["e"].ranges == stored


def test_stored_ranges_must_match_the_split():
    with pytest.raises(SplitStoreError, match="ranges give"):
        parse_state("experiments: {e: {split: {a: 0.5, b: 0.5}, ranges: [[0, 18446744073709551616, a]]}}")
    with pytest.raises(SplitStoreError, match="end of the hash space"):
        parse_state("experiments: {e: {split: {a: 1}, ranges: [[0, 5, a]]}}")
