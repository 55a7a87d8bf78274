"""One split for the fleet: a replica follows the shared split store (`abtest.split_store`, a file or a
mounted ConfigMap) and writes its admin split changes there.

Every replica takes an experiment's weights and bucket ranges from the store as they are (the writer of a
change computed them), so a key goes to the same variant on every replica, and a change made by the judge,
an operator or another replica's admin API reaches every replica within a poll and survives restarts. The
polling runs in a thread of its own, never on a request's path: a `stat` per poll, the file read only when
it changed (`SplitWatcher`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from abtest.split_store import (
    ExperimentSplit,
    SplitState,
    SplitStoreError,
    SplitWatcher,
    open_store,
    with_change,
)
from server.experiments.registry import (
    ChangeAction,
    ChangeRecord,
    ExperimentError,
    ExperimentRegistry,
    UnknownExperiment,
)
from server.wire.errors import ApiError

log = logging.getLogger("server.experiments")

# The store's actions as the registry's change log names them.
_ACTIONS: dict[str, ChangeAction] = {"set": "update", "rollback": "rollback", "ramp": "ramp"}


@dataclass(frozen=True)
class FleetOptions:
    """How a replica takes part in a fleet's experiments (the settings of the same names)."""

    split_store: Path | None = None  # the split document, polled
    split_store_write: str | None = None  # where admin changes go (default: the split_store file)
    poll_s: float = 1.0
    judge_url: str | None = None  # the judge's HTTP port, for the fleet's view in a report


def store_unavailable(detail: str) -> ApiError:
    return ApiError(503, "split_store_unavailable", detail, {"Retry-After": "5"})


class SplitSync:
    """Applies the split store's entries to a registry: at start (`poll()` before serving), then from a
    background thread (`start()`) every `poll_s` seconds. `on_change` runs after changes were applied (the
    weight and version gauges)."""

    def __init__(self, registry: ExperimentRegistry, path: str | Path, *, writer: str | None = None,
                 poll_s: float = 1.0, on_change: Callable[[], None] | None = None) -> None:
        self.registry = registry
        self.path = Path(path)
        self.watcher = SplitWatcher(path)
        self.store = open_store(writer or f"file:{path}")
        self.poll_s = poll_s
        self.on_change = on_change
        self._lock = threading.Lock()  # the poller and admin calls apply one state at a time
        self._refused: dict[str, str] = {}  # experiment -> the last error logged for it (logged once)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- reading

    def poll(self) -> list[ChangeRecord]:
        """Apply the store's state if the file changed since the last poll; the changes applied."""
        state = self.watcher.poll()
        return [] if state is None else self.apply(state)

    def apply(self, state: SplitState) -> list[ChangeRecord]:
        with self._lock:
            applied = []
            for name, entry in state.experiments.items():
                try:
                    record = self._apply_entry(name, entry)
                except UnknownExperiment:
                    self._refuse(name, f"split store {self.path} has experiment {name!r}, which this server "
                                       "does not run (not in its serving config); ignored")
                    continue
                except ExperimentError as exc:  # a store that does not fit this server's config
                    self._refuse(name, f"split store {self.path}: experiment {name!r} not applied: "
                                       f"{exc.detail}; keeping the split in force")
                    continue
                self._refused.pop(name, None)
                if record is not None:
                    applied.append(record)
            if applied and self.on_change is not None:
                self.on_change()
            return applied

    def _apply_entry(self, name: str, entry: ExperimentSplit) -> ChangeRecord | None:
        _, running = self.registry.version(name)
        last = entry.changes[-1] if entry.changes else None
        source = f"store/{last.source}" if last is not None else "store"
        reason = last.reason if last is not None else ""
        if last is not None and last.action == "stop":
            if not running:
                return None
            return self.registry.stop(name, source=source, reason=reason, version=entry.version)
        action = _ACTIONS.get(last.action, "update") if last is not None else "update"
        return self.registry.set_ranges(name, entry.split, entry.ranges, version=entry.version,
                                        action=action, source=source, reason=reason)

    def _refuse(self, name: str, message: str) -> None:
        if self._refused.get(name) != message:
            log.error("%s", message)
            self._refused[name] = message

    # ---- writing (the admin API)

    def change(self, name: str, split: dict[str, float] | None, *, action: Literal["set", "stop"],
               source: str = "admin", reason: str = "") -> ExperimentSplit:
        """Write a change of a running experiment to the store (a split, or a stop), then apply the store's
        new state here at once (the other replicas see it at their next poll). An experiment the store does
        not have yet is first put there with the split in force. Raises ApiError 503 when the store cannot be
        written (a read-only mount without `split_store_write`, a ConfigMap the server may not patch)."""
        in_force = self.registry.current_weights().get(name)
        if in_force is None:
            raise UnknownExperiment(f"experiment {name!r} is not running")

        def update(state: SplitState) -> SplitState:
            if name not in state.experiments:
                state = with_change(state, name, in_force, action="set", source="config",
                                    reason="the split in force before its first change through the store")
            new_split = split if split is not None else state.experiments[name].split
            return with_change(state, name, new_split, action=action, source=source, reason=reason)

        try:
            new = self.store.update(update)
        except (SplitStoreError, OSError, ValueError) as exc:
            raise store_unavailable(f"cannot write the split store: {exc}") from None
        self.apply(new)
        return new.experiments[name]

    # ---- the poller

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="split-store", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # the poller must outlive one bad state; logged
                log.exception("split store %s: poll failed", self.path)
