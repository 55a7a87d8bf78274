"""The fleet's shared source of every experiment's split: one document, read by every replica.

The document (YAML; JSON is valid YAML too) holds per experiment its split weights, its ramp step, when
that step began, a version that grows with every change, and a bounded log of the changes:

    experiments:
      tau-ab:
        split: {baseline: 0.95, mame-0.8: 0.05}
        ranges:                      # bucket ranges [start, end, variant] of the hash space [0, 2^64): the
          - [0, 17524406870024073984, baseline]      # replicas use them as they are (abtest/buckets.py)
          - [17524406870024073984, 18446744073709551616, mame-0.8]
        ramp_step: 1                 # index into the experiment's ramp.steps; null without a ramp
        started: 1796440000.0        # wall clock (s) of the first change: the experiment's data starts here
        step_started: 1796450000.0   # wall clock (s) of the last change: a ramp step's sample starts here
        version: 3
        changes:                     # newest last, at most MAX_CHANGES
          - {time: 1796450000.0, action: ramp, source: judge, reason: "...",
             split_before: {baseline: 0.99, mame-0.8: 0.01}, split_after: {baseline: 0.95, mame-0.8: 0.05}}

Backends:
- `FileSplitStore`: a file, written atomically (a temporary file in the same folder, fsync, rename), with
  read-modify-write under an exclusive lock on a sidecar lock file, so a judge and an operator's command
  never lose each other's change. For one host, or a shared volume.
- `ConfigMapSplitStore`: a Kubernetes ConfigMap, changed through the API server with optimistic
  concurrency (the patch carries the resourceVersion read; a conflict is re-read and retried).

Replicas read a file either way: the ConfigMap is mounted into every pod, and `SplitWatcher.poll()`, called
every second or two, returns the new state only when the file changed (a cheap stat first, then a content
hash). The kubelet refreshes a mounted ConfigMap within about a minute (its sync period plus its cache's
delay; never for a subPath mount). See docs/ab_testing.md for making that faster.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from abtest.buckets import Range, check_ranges, initial_ranges, rebalance, shares_of

log = logging.getLogger(__name__)

MAX_CHANGES = 50
WEIGHT_SUM_TOLERANCE = 1e-6
Action = Literal["set", "rollback", "ramp", "stop"]
ACTIONS = ("set", "rollback", "ramp", "stop")


class SplitStoreError(Exception):
    """The shared split cannot be read or written; the message says which store and why."""


def check_split(split: Mapping[str, Any]) -> dict[str, float]:
    """A split {variant: weight}: weights finite, in [0, 1], summing to 1. Raises ValueError."""
    if not isinstance(split, Mapping) or not split:
        raise ValueError(f"a split is a non-empty mapping {{variant: weight}}, got {split!r}")
    out: dict[str, float] = {}
    for variant, weight in split.items():
        if not isinstance(variant, str) or not variant:
            raise ValueError(f"split has an invalid variant name {variant!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weight of {variant!r} must be a finite number, got {weight!r}")
        if not 0 <= weight <= 1 + WEIGHT_SUM_TOLERANCE:
            raise ValueError(f"weight of {variant!r} is {weight}; a weight is a share in [0, 1]")
        out[variant] = float(weight)
    total = math.fsum(out.values())
    if abs(total - 1) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"split weights sum to {total:.9g}, not 1: {out}")
    return out


@dataclass(frozen=True)
class Change:
    time: float
    action: Action
    source: str  # "judge", "admin", "operator", ...
    reason: str
    split_before: dict[str, float] | None
    split_after: dict[str, float]


@dataclass(frozen=True)
class ExperimentSplit:
    split: dict[str, float]
    ranges: tuple[Range, ...] = ()
    ramp_step: int | None = None
    started: float = 0.0
    step_started: float = 0.0
    version: int = 0
    changes: tuple[Change, ...] = ()


@dataclass(frozen=True)
class SplitState:
    experiments: dict[str, ExperimentSplit] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- (de)serialising


def parse_state(text: str, source: str = "<split store>") -> SplitState:
    """The document -> SplitState; SplitStoreError naming `source` and the bad key on anything invalid."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise SplitStoreError(f"{source}: not valid YAML/JSON: {exc}") from None
    data = data or {}
    if not isinstance(data, Mapping) or set(data) - {"experiments"}:
        raise SplitStoreError(f"{source}: expected a mapping with the one key 'experiments'")
    experiments = data.get("experiments") or {}
    if not isinstance(experiments, Mapping):
        raise SplitStoreError(f"{source}: 'experiments' must be a mapping {{name: entry}}")
    out = {}
    for name, entry in experiments.items():
        where = f"{source}: experiments.{name}"
        try:
            if not isinstance(entry, Mapping):
                raise ValueError("must be a mapping")  # noqa: TRY004
            unknown = set(entry) - {
                "split",
                "ranges",
                "ramp_step",
                "started",
                "step_started",
                "version",
                "changes",
            }
            if unknown:
                raise ValueError(f"unknown key(s) {sorted(unknown)}")
            ramp_step = entry.get("ramp_step")
            if ramp_step is not None and (
                isinstance(ramp_step, bool) or not isinstance(ramp_step, int) or ramp_step < 0
            ):
                raise ValueError(f"ramp_step must be an index >= 0 or null, got {ramp_step!r}")
            changes = tuple(_parse_change(c) for c in entry.get("changes") or ())
            split = check_split(entry.get("split"))
            ranges = _parse_ranges(entry.get("ranges"), split)
            out[str(name)] = ExperimentSplit(
                split,
                ranges,
                ramp_step,
                float(entry.get("started") or 0.0),
                float(entry.get("step_started") or 0.0),
                int(entry.get("version") or 0),
                changes,
            )
        except (ValueError, TypeError) as exc:
            raise SplitStoreError(f"{where}: {exc}") from None
    return SplitState(out)


def _parse_ranges(data: Any, split: Mapping[str, float]) -> tuple[Range, ...]:
    """The stored ranges, checked to tile the hash space with the split's shares; absent -> initial."""
    if data is None:
        return initial_ranges(split)
    if not isinstance(data, list) or not all(isinstance(r, list) and len(r) == 3 for r in data):
        raise ValueError("ranges must be a list of [start, end, variant]")
    ranges = tuple((int(a), int(b), str(v)) for a, b, v in data)
    check_ranges(ranges)
    shares = shares_of(ranges)
    for variant, weight in split.items():
        if abs(shares.get(variant, 0.0) - weight) > WEIGHT_SUM_TOLERANCE:
            raise ValueError(
                f"ranges give {variant!r} {shares.get(variant, 0.0):.9g}, the split {weight:.9g}"
            )
    return ranges


def _parse_change(data: Any) -> Change:
    if not isinstance(data, Mapping):
        raise ValueError(f"a change must be a mapping, got {data!r}")  # noqa: TRY004
    if data.get("action") not in ACTIONS:
        raise ValueError(f"change action must be one of {ACTIONS}, got {data.get('action')!r}")
    before = data.get("split_before")
    return Change(
        float(data["time"]),
        data["action"],
        str(data.get("source", "")),
        str(data.get("reason", "")),
        None if before is None else check_split(before),
        check_split(data["split_after"]),
    )


def dump_state(state: SplitState) -> str:
    doc = {
        "experiments": {
            name: {
                "split": e.split,
                "ranges": [list(r) for r in e.ranges],
                "ramp_step": e.ramp_step,
                "started": e.started,
                "step_started": e.step_started,
                "version": e.version,
                "changes": [asdict(c) for c in e.changes],
            }
            for name, e in sorted(state.experiments.items())
        }
    }
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=110)


def with_change(
    state: SplitState,
    experiment: str,
    split: Mapping[str, float],
    *,
    action: Action,
    source: str,
    reason: str = "",
    ramp_step: int | None = None,
    keep_ramp_step: bool = False,
    now: float | None = None,
) -> SplitState:
    """A new state in which `experiment` has `split`, its bucket ranges rebalanced from the old ones (the
    fewest keys move), `ramp_step` (unless keep_ramp_step), its version one higher and the change logged."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    new_split = check_split(split)
    now = time.time() if now is None else now
    old = state.experiments.get(experiment)
    change = Change(now, action, source, reason, dict(old.split) if old else None, new_split)
    entry = ExperimentSplit(
        new_split,
        rebalance(old.ranges, new_split) if old else initial_ranges(new_split),
        old.ramp_step if keep_ramp_step and old else ramp_step,
        old.started if old else now,
        now,
        (old.version if old else 0) + 1,
        ((old.changes if old else ()) + (change,))[-MAX_CHANGES:],
    )
    return replace(state, experiments={**state.experiments, experiment: entry})


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- file


class FileSplitStore:
    """The split document in a file; every write is atomic and every read-modify-write is serialised."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def read(self) -> SplitState:
        """The current state; an empty one when the file does not exist yet."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return SplitState()
        except OSError as exc:
            raise SplitStoreError(f"cannot read split store {self.path}: {exc.strerror}") from None
        return parse_state(text, str(self.path))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def write(self, state: SplitState) -> None:
        """Replace the file atomically: readers see the old or the new document, never a part."""
        data = dump_state(state).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def update(self, change: Callable[[SplitState], SplitState]) -> SplitState:
        """Read, apply `change`, write, under the lock: concurrent updates apply one after another."""
        with self._locked():
            new = change(self.read())
            self.write(new)
            return new


class SplitWatcher:
    """A replica's view of the split file: `poll()` every second or two returns the new state when the
    file changed, else None. A stat (inode, mtime, size) is compared first; only when it differs is the
    file read, and only a different content hash counts as a change (a ConfigMap refresh that rewrites the
    same content is not one). A file that cannot be read or parsed keeps the last good state in force and
    is reported in `last_error` (and logged once per distinct error)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stat: tuple[int, int, int] | None = None
        self._hash: str | None = None
        self.state: SplitState | None = None
        self.last_error: str | None = None

    def poll(self) -> SplitState | None:
        try:
            st = os.stat(self.path)  # follows the ConfigMap mount's ..data symlink to the current file
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)
            if signature == self._stat:
                return None
            data = self.path.read_bytes()
        except OSError as exc:
            return self._failed(f"cannot read split store {self.path}: {exc.strerror}")
        digest = content_hash(data)
        if digest == self._hash:
            self._stat = signature
            return None
        try:
            state = parse_state(data.decode(), str(self.path))
        except (SplitStoreError, UnicodeDecodeError) as exc:
            return self._failed(str(exc))
        self._stat, self._hash, self.state, self.last_error = signature, digest, state, None
        return state

    def _failed(self, error: str) -> None:
        if error != self.last_error:
            log.error("%s; keeping the last good split", error)
        self.last_error = error


# -------------------------------------------------------------------------------------------- ConfigMap


# A JSON merge patch (RFC 7396); the client's default content type for a patch is a JSON patch (a list of
# operations), which a mapping body is not.
MERGE_PATCH = "application/merge-patch+json"


class ConfigMapSplitStore:
    """The split document under `key` of a ConfigMap, changed through the Kubernetes API.

    Needs the optional `kubernetes` package (`pip install mame-serve[judge]`) and, in the cluster, a Role
    allowing get and patch on that one ConfigMap (deploy/k8s/judge/). Updates use optimistic concurrency:
    the patch carries the resourceVersion that was read, the API server refuses it (409) if someone
    changed the ConfigMap in between, and the change is then re-applied to a fresh read.
    """

    def __init__(
        self, name: str, namespace: str, key: str = "splits.yaml", api: Any = None, retries: int = 5
    ) -> None:
        self.name, self.namespace, self.key, self.retries = name, namespace, key, retries
        self.api = api if api is not None else self._default_api()

    @staticmethod
    def _default_api() -> Any:
        try:
            from kubernetes import client, config
        except ImportError:
            raise SplitStoreError(
                "the ConfigMap split store needs the kubernetes package: pip install 'mame-serve[judge]'"
            ) from None
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return client.CoreV1Api()

    def _read(self) -> tuple[SplitState, str | None]:
        from kubernetes.client.exceptions import ApiException

        try:
            cm = self.api.read_namespaced_config_map(self.name, self.namespace)
        except ApiException as exc:
            raise SplitStoreError(
                f"cannot read ConfigMap {self.namespace}/{self.name}: {exc.status} {exc.reason}"
            ) from None
        text = (cm.data or {}).get(self.key, "")
        return parse_state(
            text, f"ConfigMap {self.namespace}/{self.name} key {self.key}"
        ), cm.metadata.resource_version

    def read(self) -> SplitState:
        return self._read()[0]

    def patch(self, state: SplitState, resource_version: str | None) -> dict[str, Any]:
        """The merge patch an update sends: only the document's key, guarded by `resource_version` (the API
        server refuses a patch carrying a stale resourceVersion with 409). Labels, annotations and other
        keys of the ConfigMap are left as they are."""
        return {"metadata": {"resourceVersion": resource_version}, "data": {self.key: dump_state(state)}}

    def update(self, change: Callable[[SplitState], SplitState]) -> SplitState:
        from kubernetes.client.exceptions import ApiException

        for _ in range(self.retries):
            state, version = self._read()
            new = change(state)
            try:
                self.api.patch_namespaced_config_map(
                    self.name, self.namespace, self.patch(new, version), _content_type=MERGE_PATCH
                )
                return new
            except ApiException as exc:
                if exc.status != 409:
                    raise SplitStoreError(
                        f"cannot update ConfigMap {self.namespace}/{self.name}: {exc.status} {exc.reason}"
                    ) from None
                log.info(
                    "ConfigMap %s/%s changed meanwhile; re-applying the change", self.namespace, self.name
                )
        raise SplitStoreError(
            f"ConfigMap {self.namespace}/{self.name} kept changing: gave up after {self.retries} attempts"
        )


SplitStore = FileSplitStore | ConfigMapSplitStore


def open_store(spec: str) -> SplitStore:
    """`file:PATH` (or a plain path) | `configmap:NAMESPACE/NAME[:KEY]`."""
    if spec.startswith("configmap:"):
        ref, _, key = spec.removeprefix("configmap:").partition(":")
        namespace, sep, name = ref.partition("/")
        if not sep or not namespace or not name:
            raise ValueError(f"a ConfigMap store is configmap:NAMESPACE/NAME[:KEY], got {spec!r}")
        return ConfigMapSplitStore(name, namespace, key or "splits.yaml")
    return FileSplitStore(spec.removeprefix("file:"))


def parse_split_args(items: list[str]) -> dict[str, float]:
    """["baseline=0.9", "mame-0.8=0.1"] -> {"baseline": 0.9, "mame-0.8": 0.1} (checked)."""
    split = {}
    for item in items:
        variant, sep, weight = item.partition("=")
        if not sep or not variant:
            raise ValueError(f"expected VARIANT=WEIGHT, got {item!r}")
        try:
            split[variant] = float(weight)
        except ValueError:
            raise ValueError(f"weight of {variant!r} is not a number: {weight!r}") from None
    return check_split(split)


def main(argv: list[str] | None = None) -> None:
    """`python -m abtest.split_store --store STORE show | set EXPERIMENT VARIANT=WEIGHT ... [--reason R]`:
    an operator's view and change of the fleet's split (a change resets the ramp step)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m abtest.split_store", description=main.__doc__)
    ap.add_argument("--store", required=True, help="file:PATH or configmap:NAMESPACE/NAME[:KEY]")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("show", help="print the document")
    setter = sub.add_parser("set", help="set an experiment's split (logged as source operator)")
    setter.add_argument("experiment")
    setter.add_argument("weights", nargs="+", metavar="VARIANT=WEIGHT")
    setter.add_argument("--reason", default="")
    setter.add_argument(
        "--ramp-step", type=int, default=None, help="ramp step index to record (default: none)"
    )
    args = ap.parse_args(argv)
    try:
        store = open_store(args.store)
        if args.command == "show":
            sys.stdout.write(dump_state(store.read()))
            return
        split = parse_split_args(args.weights)
        new = store.update(
            lambda s: with_change(
                s,
                args.experiment,
                split,
                action="set",
                source="operator",
                reason=args.reason,
                ramp_step=args.ramp_step,
            )
        )
    except (ValueError, SplitStoreError) as exc:
        raise SystemExit(f"split store: {exc}") from None
    entry = new.experiments[args.experiment]
    print(f"{args.experiment}: split {entry.split} (version {entry.version})")


if __name__ == "__main__":
    main()
