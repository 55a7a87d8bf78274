"""Dynamic batching: bounded per-variant queues that device workers drain batch by batch.

A batch holds images of one (model, variant): up to the model's `max_batch_size`, taken as soon as it is
full or when its oldest image has waited `max_wait_ms`. Across variants the queue with the oldest head goes
first, so no variant starves. Triton's dynamic batcher has the same vocabulary.

Each variant of a model is guaranteed its share of the model's `max_queue` (`batching.queue_shares`,
equal by default): a variant may use free places beyond its share only while it leaves every other variant
the unused part of its own, so a flood of one variant cannot refuse another. A request's places are
reserved (`reserve`) before its images are decoded, so a request the queue cannot take is refused before
any decoding, and what was decoded always finds its places.

A/B shadow runs (the same images again on a reference variant, for the agreement figures) sit in separate
queues with a lower priority: they do not count against `max_queue`, each model holds at most one batch of
them (a full shadow queue refuses the run, never a request), and a worker takes them only when none of its
real queues holds an image. So shadow load can never make a real request find a full queue.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mame_core import MergeSettings
    from server.config import BatchingConfig



class QueueFull(Exception):
    """The variant's bounded share of the queue cannot take the images: answer 503 at once."""


@dataclass(eq=False)
class Reservation:
    """Places held in a variant's queue for a request whose images are being decoded."""

    model: str
    variant: str
    count: int


class SchedulerClosed(Exception):
    """The server is shutting down and takes no new work."""


@dataclass(eq=False, slots=True)
class WorkItem:
    """One image waiting for inference; its answer arrives through an asyncio future of the request's loop."""

    model: str
    variant: str
    settings: MergeSettings
    image: torch.Tensor  # [3, H, W], preprocessed
    top_k: int
    deadline: float  # time.monotonic()
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued_at: float = 0.0  # time.monotonic(), set when queued
    taken_at: float = 0.0
    # Where the image's pixels lie in shared memory ([H, W, 3] in a front-end's crop arena): (file, byte
    # offset). A device process then reads them there itself, and this process copies nothing.
    shared_at: tuple[str, int] | None = None

    def fail(self, exc: BaseException) -> None:  # answers come in batches: resolve_all
        self._complete(lambda: self.future.set_exception(exc))

    def _complete(self, action: Callable[[], None]) -> None:
        def apply() -> None:
            if not self.future.done():  # a request that timed out has already answered
                action()

        try:
            self.loop.call_soon_threadsafe(apply)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def resolve_all(items: list[WorkItem], values: list[Any]) -> None:
    """Answer many items with one wake-up of each event loop (per item, the wake-ups cost the GIL more than
    anything else in the host path of a batch: every one is a write to the loop's self-pipe and a switch)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any]]] = {}
    for item, value in zip(items, values):
        by_loop.setdefault(item.loop, []).append((item.future, value))
    for loop, answers in by_loop.items():
        def apply(answers: list[tuple[asyncio.Future, Any]] = answers) -> None:
            for future, value in answers:
                if not future.done():  # a request that timed out has already answered
                    future.set_result(value)

        try:
            loop.call_soon_threadsafe(apply)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


class Scheduler:
    """Thread-safe queues keyed by (model, variant); workers block in `next_batch`."""

    def __init__(self, batching: dict[str, BatchingConfig],
                 guarantees: dict[str, dict[str, int]] | None = None):
        self._batching = batching
        # places of max_queue each variant is sure to find (ModelConfig.queue_guarantees); none: shared
        self._guarantees = guarantees or {}
        self._held: dict[tuple[str, str], int] = {}  # places queued or reserved, per variant
        self._reserved = 0  # places reserved and not yet submitted: workers wait for them while draining
        self._cond = threading.Condition()
        self._queues: dict[tuple[str, str], deque[WorkItem]] = {}
        self._pending = {model: 0 for model in batching}
        self._shadow_queues: dict[tuple[str, str], deque[WorkItem]] = {}
        self._shadow_pending = {model: 0 for model in batching}
        self._closed = False

    def capacity(self, model: str, variant: str) -> int:
        """The most images `variant` can ever hold at once: more in one request could never be queued."""
        guarantees = self._guarantees.get(model, {})
        return self._batching[model].max_queue - sum(g for v, g in guarantees.items() if v != variant)

    def _room(self, model: str, variant: str) -> int:
        """Places `variant` may take now: the free ones, less the unused guarantees of the other variants."""
        kept = sum(max(0, g - self._held.get((model, v), 0))
                   for v, g in self._guarantees.get(model, {}).items() if v != variant)
        return self._batching[model].max_queue - self._pending[model] - kept

    def reserve(self, model: str, variant: str, count: int) -> Reservation:
        """Hold `count` places of `variant` for a request about to decode its images (QueueFull if the
        variant's share cannot take them); `submit` uses them, `release` gives them back."""
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            self._check_room(model, variant, count)
            self._hold(model, variant, count)
            self._reserved += count
        return Reservation(model, variant, count)

    def release(self, reservation: Reservation) -> None:
        """Give back the places of a reservation that will not be submitted (an error, a timeout)."""
        with self._cond:
            if reservation.count:
                self._hold(reservation.model, reservation.variant, -reservation.count)
                self._reserved -= reservation.count
                reservation.count = 0
                self._cond.notify_all()  # a draining worker may be waiting for it

    def _hold(self, model: str, variant: str, count: int) -> None:
        self._held[model, variant] = self._held.get((model, variant), 0) + count
        self._pending[model] += count

    def _check_room(self, model: str, variant: str, count: int) -> None:
        room = self._room(model, variant)
        if count > room:
            raise QueueFull(
                f"variant {variant!r} of model {model!r} has {self._held.get((model, variant), 0)} images "
                f"queued, the model {self._pending[model]} (limit {self._batching[model].max_queue}, "
                f"room for this variant {max(0, room)}); cannot take {count} more"
            )

    def submit(self, items: list[WorkItem], shadow: bool = False,
               reservation: Reservation | None = None) -> None:
        """Queue all items (of one variant of one model) or none: a request's images are accepted together.
        `shadow`: low-priority runs; `reservation`: places reserved for them (used up here)."""
        if not items:
            return
        model, variant = items[0].model, items[0].variant
        with self._cond:
            if self._closed and reservation is None:  # reserved places are honoured while draining
                raise SchedulerClosed("the server is shutting down")
            if shadow:
                self._submit_shadow(model, items)
                return
            reserved = reservation.count if reservation is not None else 0
            if len(items) > reserved:
                self._check_room(model, variant, len(items) - reserved)
            if reservation is not None:
                reservation.count = 0
                self._reserved -= reserved
            self._hold(model, variant, len(items) - reserved)
            now = time.monotonic()
            for item in items:
                item.enqueued_at = now
            queue = self._queues.get((model, variant))
            if queue is None:
                queue = self._queues[model, variant] = deque()
            wake = not queue  # a new head: a waiting worker's next due time changes
            queue.extend(items)
            wake = wake or len(queue) >= self._batching[model].max_batch_size  # a full batch is due now
            # Otherwise a waiting worker already sleeps until this queue's head is due: waking it for every
            # request would spend the server process's GIL on wake-ups that find no batch to take.
            if wake or self._closed:
                self._cond.notify_all()

    def shadow_limit(self, model: str) -> int:
        """Shadow images one model may hold: one full batch. Shadow runs are samples; under load new ones are
        dropped rather than left to pile up behind real traffic and go stale."""
        return self._batching[model].max_batch_size

    def _submit_shadow(self, model: str, items: list[WorkItem]) -> None:
        now = time.monotonic()
        for key, queue in self._shadow_queues.items():  # free the places of runs that can no longer answer
            while key[0] == model and queue and queue[0].deadline <= now:
                queue.popleft().fail(TimeoutError("shadow run expired in the queue"))
                self._shadow_pending[model] -= 1
        limit = self.shadow_limit(model)
        if self._shadow_pending[model] + len(items) > limit:
            raise QueueFull(f"model {model!r} has {self._shadow_pending[model]} shadow images queued "
                            f"(limit {limit}); shadow run of {len(items)} dropped")
        for item in items:
            item.enqueued_at = now
            self._shadow_queues.setdefault((item.model, item.variant), deque()).append(item)
        self._shadow_pending[model] += len(items)
        self._cond.notify_all()

    def discard(self, items: list[WorkItem]) -> None:
        """Remove items whose request gave up (deadline); those already taken are left to finish."""
        with self._cond:
            for item in items:
                queue = self._queues.get((item.model, item.variant))
                if queue is not None and item in queue:
                    queue.remove(item)
                    self._hold(item.model, item.variant, -1)

    def fail_queued(self, models: Collection[str], exc: BaseException) -> int:
        """Remove the queued (not yet taken) items of `models` and fail them with `exc` (their device is
        stalled); how many."""
        failed: list[WorkItem] = []
        with self._cond:
            for key, queue in self._queues.items():
                if key[0] in models and queue:
                    failed.extend(queue)
                    self._pending[key[0]] -= len(queue)
                    queue.clear()
        for item in failed:
            item.fail(exc)
        return len(failed)

    def next_batch(self, models: Collection[str]) -> list[WorkItem] | None:
        """Block until a batch of one variant of one of `models` is due; None once closed and drained.

        A queue is due when it holds a full batch or its oldest image has waited `max_wait_ms`; of the due
        queues the one with the oldest head goes first. Shadow queues are looked at only when every real
        queue of `models` is empty.
        """
        with self._cond:
            while True:
                now = time.monotonic()
                due, next_due = self._due(self._queues, models, now)
                if due:
                    key = min(due)[1]
                    return self._take(key, self._batching[key[0]].max_batch_size)
                if not any(queue for key, queue in self._queues.items() if key[0] in models):
                    shadow_due, shadow_next = self._due(self._shadow_queues, models, now)
                    if shadow_due:
                        key = min(shadow_due)[1]
                        return self._take(key, self._batching[key[0]].max_batch_size, shadow=True)
                    if shadow_next is not None:
                        next_due = shadow_next if next_due is None else min(next_due, shadow_next)
                if next_due is None and self._closed and not self._reserved:
                    return None
                self._cond.wait(timeout=None if next_due is None else next_due - now)

    def _due(self, queues: dict[tuple[str, str], deque[WorkItem]], models: Collection[str],
             now: float) -> tuple[list[tuple[float, tuple[str, str]]], float | None]:
        """(oldest head, key) of each due queue of `models`, and when the next one falls due (None: never)."""
        due, next_due = [], None
        for key, queue in queues.items():
            if not queue or key[0] not in models:
                continue
            cfg = self._batching[key[0]]
            due_at = queue[0].enqueued_at + cfg.max_wait_ms / 1000.0
            if len(queue) >= cfg.max_batch_size or due_at <= now or self._closed:
                due.append((queue[0].enqueued_at, key))
            else:
                next_due = due_at if next_due is None else min(next_due, due_at)
        return due, next_due

    def close(self) -> None:
        """Take no new work; workers finish the queued requests, then `next_batch` returns None.

        Queued shadow runs are dropped (they answer no one): their futures fail with SchedulerClosed."""
        with self._cond:
            self._closed = True
            dropped = [item for queue in self._shadow_queues.values() for item in queue]
            self._shadow_queues.clear()
            self._shadow_pending = dict.fromkeys(self._shadow_pending, 0)
            self._cond.notify_all()
        for item in dropped:
            item.fail(SchedulerClosed("the server is shutting down: shadow run dropped"))

    def depth(self, model: str, variant: str) -> int:
        """Images of `variant` waiting in its queue now (read by the queue-depth gauge at each scrape)."""
        with self._cond:
            return len(self._queues.get((model, variant), ()))

    def pending(self, model: str) -> int:
        with self._cond:
            return self._pending[model]

    def shadow_pending(self, model: str) -> int:
        with self._cond:
            return self._shadow_pending[model]

    def _take(self, key: tuple[str, str], max_batch_size: int, shadow: bool = False) -> list[WorkItem]:
        queue = (self._shadow_queues if shadow else self._queues)[key]
        now = time.monotonic()
        batch = [queue.popleft() for _ in range(min(max_batch_size, len(queue)))]
        for item in batch:
            item.taken_at = now
        if shadow:
            self._shadow_pending[key[0]] -= len(batch)
        else:
            self._hold(*key, -len(batch))
        return batch
