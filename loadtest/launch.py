"""Start `python -m server` as a real process on loopback (end-to-end tests and the serving benchmark)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_server(config: dict | Path, *, env: dict | None = None, args: Sequence[str] = (),
                   ready_timeout: float = 120, root: Path = REPO_ROOT) -> Iterator[ServerProcess]:
    """Run the server until the block ends; waits for /readyz; SIGTERM and wait on exit. `root`: the
    checkout whose server runs (another one: to compare two versions side by side)."""
    workdir = Path(tempfile.mkdtemp(prefix="mame-serve-"))
    if isinstance(config, dict):
        config_path = workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
    else:
        config_path = Path(config)
    port = free_port()
    log_path = workdir / "server.log"
    process_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "server", "--config", str(config_path), "--host", "127.0.0.1",
           "--port", str(port), *args]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=process_env, cwd=root
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", port, proc, log_path)
    try:
        _wait_ready(server, ready_timeout)
        yield server
    except BaseException:
        # Whatever failed (a dead server, a reset connection, a test), the server's log may say why.
        state = f"exited with {proc.returncode}" if proc.poll() is not None else "still running"
        print(f"server {state}; end of its log:\n{server.log()[-4000:]}", file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # its config and log: 1,825 such folders had piled up in /tmp
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(server: ServerProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode} before ready:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout_s} s:\n{server.log()}")
