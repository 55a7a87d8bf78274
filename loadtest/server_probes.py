"""What the serving benchmark measures of a running server: CPU time by thread and by kind of child process,
which threads hold the GIL (py-spy), and the memory of the server and its children."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

CHILD_KINDS = (("server.frontend", "front-ends"), ("multiprocessing.spawn", "device processes"))


def cpu_seconds(process: psutil.Process) -> dict[str, float]:
    """CPU seconds of the server: "total" (with its children), "event loop" (its main thread), "own" (the
    process alone), and one entry per kind of child process (CHILD_KINDS)."""
    seconds = {"own": sum(process.cpu_times()[:2])}
    main = next((t for t in process.threads() if t.id == process.pid), None)
    seconds["event loop"] = (main.user_time + main.system_time) if main else 0.0
    seconds["total"] = seconds["own"]
    for child in process.children(recursive=True):
        try:
            command, used = " ".join(child.cmdline()), sum(child.cpu_times()[:2])
        except psutil.Error:  # gone meanwhile
            continue
        kind = next((name for marker, name in CHILD_KINDS if marker in command), "other")
        seconds[kind] = seconds.get(kind, 0.0) + used
        seconds["total"] += used
    return seconds


def py_spy() -> str | None:
    """py-spy installed beside this interpreter (a virtual environment's bin), else on the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def gil_profile(server_pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """py-spy sampling which of the server's threads holds the GIL (`--gil`: samples without a holder are
    dropped, so samples / (rate x seconds) is the share of time the GIL was held)."""
    return subprocess.Popen(
        [
            py_spy() or "py-spy",
            "record",
            "--pid",
            str(server_pid),
            "--gil",
            "--nonblocking",
            "--rate",
            str(GIL_PROFILE_RATE),
            "--duration",
            str(max(1, int(seconds))),
            "--format",
            "raw",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


GIL_PROFILE_RATE = 200


def summarise_gil_profile(path: Path, seconds: float, top: int = 12) -> str:
    """The GIL-held share of the window and the frames that held it most (py-spy raw format)."""
    by_frame: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        by_frame[frames[-1]] = by_frame.get(frames[-1], 0) + int(count)
    share = total / (GIL_PROFILE_RATE * max(1, int(seconds)))
    lines = [f"  GIL held {100 * share:.0f} % of the profiled window ({total} samples); most held in:"]
    lines += [
        f"    {100 * n / total:5.1f} %  {frame}"
        for frame, n in sorted(by_frame.items(), key=lambda kv: -kv[1])[:top]
    ]
    return "\n".join(lines)


def process_tree(pid: int) -> list[psutil.Process]:
    """The server and its children (device and front-end processes, where it runs them)."""
    server = psutil.Process(pid)
    return [server, *server.children(recursive=True)]


def tree_rss(pid: int) -> float:
    """Resident memory of the server and its children, bytes (pages they share are counted once each)."""
    return sum(p.memory_info().rss for p in process_tree(pid))


def gpu_memory_mib(pid: int) -> float | None:
    """GPU memory of the server and its children (a device process holds the weights), from nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    pids = {p.pid for p in process_tree(pid)}
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    used = [float(mem) for p, mem in (line.split(",") for line in out.strip().splitlines() if "," in line)
            if int(p) in pids]
    return sum(used) if used else None


def batch_totals(families: Iterable[Metric]) -> tuple[float, float]:
    """Images batched and batches run, from the server's `mame_batch_size` histogram among metric families
    (parsed from /metrics, or collected from the metric itself)."""
    images = batches = 0.0
    for family in families:
        if family.name == "mame_batch_size":
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    images += sample.value
                elif sample.name.endswith("_count"):
                    batches += sample.value
    return images, batches
