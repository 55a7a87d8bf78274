"""Bucket ranges shared through the split store: the server's arithmetic, and one answer for every replica."""

import pytest

from abtest import buckets
from abtest.split_store import SplitState, SplitStoreError, parse_state, with_change


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
