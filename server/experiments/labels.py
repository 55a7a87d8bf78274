"""True labels that arrive after the answer: a bounded map of recent answers by request id (what each image's
top-5 was, and where the request went), against which `POST /v1/labels` scores top-1 and top-5.

The map is written once per answered request on the event loop, in answer order, so the oldest entry is
always the first in a deque beside the dict: both bounds are O(1) per request (evict the oldest when full,
drop expired ones from the front). Finding a plain dict's first entry instead scans every slot deleted
from the front since its last resize, and a general cache (cachetools' TTLCache) keeps its order and
timers in Python. Only the event loop touches it (the classify path and the labels route), so it takes no
lock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field

from server.wire.errors import ApiError, echo

if TYPE_CHECKING:
    from server.experiments.registry import Assignment

LABEL_TOP_K = 5  # an answer's top-5 is kept (and computed, whatever top_k the client asked for)


class LabelsBody(BaseModel):
    """Body of `POST /v1/labels`: the true class index of each image of an answered request, in order."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    request_id: str = Field(min_length=1, max_length=64)
    labels: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=4096)


@dataclass(frozen=True)
class Scored:
    """How a request's answers fared against their labels."""

    route: Assignment
    images: int
    top1_correct: int
    top5_correct: int


def unknown_request(request_id: str) -> ApiError:
    return ApiError(404, "unknown_request", f"no recent answer has request id {echo(request_id)} (never "
                    "answered here, or older than the server keeps answers for labels)")


class RecentAnswers:
    """request id -> [answered at, route, top-5 indices per image, labelled]; at most `capacity` entries,
    each for `ttl_s` seconds."""

    def __init__(self, capacity: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1 or ttl_s <= 0:
            raise ValueError(f"capacity must be >= 1 and ttl_s > 0, got {capacity}, {ttl_s}")
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: dict[str, list] = {}
        self._order: deque[tuple[str, list]] = deque()  # (id, entry), oldest first

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, request_id: str, route: Assignment, top: Sequence[Sequence[int]]) -> None:
        """Keep an answered request (its images' top indices, best first; the first LABEL_TOP_K count)."""
        now = self.clock()
        entry = [now, route, top, False]
        self._entries[request_id] = entry  # an id a client sent again: the newest answer counts
        order = self._order
        order.append((request_id, entry))
        if len(order) > self.capacity:
            self._drop_oldest()
        if order[0][1][0] < now - self.ttl_s:
            self._expire(now)

    def _drop_oldest(self) -> None:
        request_id, entry = self._order.popleft()
        if self._entries.get(request_id) is entry:  # not replaced by a newer answer under the same id
            del self._entries[request_id]

    def _expire(self, now: float) -> None:
        order, horizon = self._order, now - self.ttl_s
        while order and order[0][1][0] < horizon:
            self._drop_oldest()

    def score(self, request_id: str, labels: Sequence[int], classes: Callable[[str], int]) -> Scored:
        """Score the labels of an answered request, once: 404 `unknown_request` (never seen, or expired),
        409 `already_labelled`, 422 `invalid_parameter` (a count other than the images', an index outside
        the model's classes: `classes(model)`). Nothing is recorded unless everything is valid."""
        self._expire(self.clock())
        entry = self._entries.get(request_id)
        if entry is None:
            raise unknown_request(request_id)
        _, route, top, labelled = entry
        if labelled:
            raise ApiError(409, "already_labelled", f"request {echo(request_id)} has its labels already")
        if len(labels) != len(top):
            raise ApiError(422, "invalid_parameter", f"request {echo(request_id)} answered {len(top)} "
                           f"image(s); got {len(labels)} label(s)")
        n_classes = classes(route.model)
        bad = [label for label in labels if not 0 <= label < n_classes]
        if bad:
            raise ApiError(422, "invalid_parameter", f"label(s) {echo(bad)} outside model {route.model!r}'s "
                           f"classes 0..{n_classes - 1}")
        entry[3] = True
        top1 = sum(bool(t) and t[0] == label for t, label in zip(top, labels))
        top5 = sum(label in t[:LABEL_TOP_K] for t, label in zip(top, labels))
        return Scored(route, len(labels), top1, top5)
