"""Admission before work, in process: each variant's share of the queue, places reserved before decoding,
the pixel budgets (one request's, and a process's pixels being decoded at once), and echoed input cut
short. The end-to-end side (real servers, both layouts) is tests/test_admission_e2e.py."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import pytest
import torch
from PIL import Image
from serverproc import tiny_config

from mame_core import MergeSettings
from server.config import BatchingConfig, ConfigError, parse_config
from server.decode.budget import PixelBudget
from server.decode.imaging import open_all, pixels_of
from server.engine.batching import QueueFull, Scheduler, SchedulerClosed, WorkItem
from server.wire.errors import ApiError, echo


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def items(loop, variant: str, count: int) -> list[WorkItem]:
    return [WorkItem("m", variant, MergeSettings(), torch.zeros(3, 8, 8), 1, time.monotonic() + 60,
                     loop.create_future(), loop) for _ in range(count)]


def two_variants(max_queue: int = 8, guarantees: dict | None = None) -> Scheduler:
    batching = {"m": BatchingConfig(max_batch_size=64, max_wait_ms=10_000, max_queue=max_queue)}
    return Scheduler(batching, guarantees={"m": guarantees or {"a": max_queue // 2, "b": max_queue // 2}})


def test_a_flood_of_one_variant_leaves_the_others_their_share(loop):
    s = two_variants()
    s.submit(items(loop, "a", 4))
    with pytest.raises(QueueFull, match="variant 'a'"):  # a's share is full: b's unused places are kept
        s.submit(items(loop, "a", 1))
    s.submit(items(loop, "b", 4))  # b finds its whole share
    with pytest.raises(QueueFull):
        s.submit(items(loop, "b", 1))
    assert s.pending("m") == 8


def test_a_variant_borrows_free_places_beyond_its_share_but_never_the_others_unused_share(loop):
    s = two_variants(max_queue=8, guarantees={"a": 2, "b": 2})
    s.submit(items(loop, "a", 6))  # 2 of its own, 4 free ones: b's 2 stay free
    with pytest.raises(QueueFull):
        s.submit(items(loop, "a", 1))
    s.submit(items(loop, "b", 2))
    assert (s.capacity("m", "a"), s.capacity("m", "b")) == (6, 6)


def test_places_are_reserved_before_decoding_and_given_back(loop):
    s = two_variants()
    held = s.reserve("m", "a", 3)
    with pytest.raises(QueueFull):  # the reservation counts: only 1 place of a's share is left
        s.reserve("m", "a", 2)
    s.release(held)
    s.release(held)  # twice: nothing more to give back
    again = s.reserve("m", "a", 4)
    s.submit(items(loop, "a", 4), reservation=again)  # the reserved places: no second check
    assert s.pending("m") == 4 and again.count == 0
    with pytest.raises(QueueFull):
        s.submit(items(loop, "a", 1))


def test_a_reservation_made_before_shutdown_is_still_served(loop):
    s = two_variants()
    held = s.reserve("m", "a", 2)
    s.close()
    with pytest.raises(SchedulerClosed):
        s.reserve("m", "b", 1)
    with pytest.raises(SchedulerClosed):
        s.submit(items(loop, "b", 1))
    taken: list = []
    worker = threading.Thread(target=lambda: taken.append(s.next_batch(["m"])))
    worker.start()
    time.sleep(0.1)
    assert worker.is_alive(), "a draining worker stopped while places were still reserved"
    s.submit(items(loop, "a", 2), reservation=held)
    worker.join(5)
    assert len(taken[0]) == 2 and s.next_batch(["m"]) is None


def test_queue_shares_in_the_config():
    def config(shares: dict, max_queue: int = 12):
        return parse_config(tiny_config(batching={"max_queue": max_queue, "queue_shares": shares}))

    model = config({}).models["tiny"]
    assert model.queue_guarantees() == {"baseline": 3, "mame-0.9": 3, "mame-0.5": 3, "tome-r8": 3}
    weighted = config({"baseline": 2, "mame-0.9": 0}, max_queue=13).models["tiny"].queue_guarantees()
    assert weighted == {"baseline": 6, "mame-0.9": 0, "mame-0.5": 3, "tome-r8": 3}
    with pytest.raises(ConfigError, match="queue_shares: 'nope' is not one of the variants"):
        config({"nope": 1})
    with pytest.raises(ConfigError, match="weights must be >= 0"):
        config({"baseline": -1})
    with pytest.raises(ConfigError, match="variant 'mame-0.9' could never be queued"):
        config({"baseline": 1, "mame-0.9": 0, "mame-0.5": 0, "tome-r8": 0})


def png(width: int, height: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_a_requests_pixels_are_read_from_the_headers_and_bounded_together():
    opened = open_all([png(1000, 1000), png(1000, 1000)], max_pixels=10**6, max_request_pixels=2 * 10**6)
    assert [img.size for img in opened] == [(1000, 1000)] * 2
    with pytest.raises(ApiError) as info:
        open_all([png(1000, 1000)] * 3, max_pixels=10**6, max_request_pixels=2 * 10**6)
    assert info.value.status == 413 and "limits.max_request_pixels" in info.value.detail
    # Nothing decoded: a body that is only a valid header is refused the same.
    header_only = png(1000, 1000)[:60]
    with pytest.raises(ApiError) as info:
        open_all([header_only] * 3, max_pixels=10**6, max_request_pixels=2 * 10**6)
    assert info.value.status == 413
    # A JPEG decodes at reduced scale for a small model: it is charged what it will hold.
    (drafted,) = open_all([jpeg(4000, 4000)], max_pixels=20 * 10**6, max_request_pixels=10**6,
                          needed_edge=64)
    assert pixels_of(drafted) <= (4000 // 8 + 8) ** 2


def test_the_pixel_budget_bounds_what_is_decoded_at_once_and_serves_a_lone_large_image():
    async def run() -> None:
        budget = PixelBudget(100, trim=False)
        most = 0
        order: list[int] = []

        async def decode(pixels: int) -> None:
            nonlocal most
            async with budget.hold(pixels):
                most = max(most, budget.in_use)
                order.append(pixels)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(decode(pixels) for pixels in [60, 60, 30, 500, 10] * 3))
        assert most <= 100 and budget.in_use == 0 and sorted(order) == sorted([60, 60, 30, 500, 10] * 3)
        # A request that gives up (its deadline) while waiting leaves nothing held.
        async with budget.hold(100):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05), budget.hold(1):
                    pass
        assert budget.in_use == 0
        # A waiter cancelled in the same turn as the release that would grant it: no error, nothing held.
        async with budget.hold(100):
            waiter = asyncio.create_task(decode(50))
            await asyncio.sleep(0)  # it waits for pixels
            waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert budget.in_use == 0
        async with budget.hold(1):  # and the budget still serves
            assert budget.in_use == 1

    asyncio.run(run())


def test_client_input_is_never_echoed_whole():
    assert echo("tiny") == "'tiny'"
    long = echo("m" * 60_000)
    assert len(long) < 100 and "60002 characters" in long
    assert len(ApiError(404, "x", "y" * 60_000).detail) < 1100
