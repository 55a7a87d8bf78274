"""Start-up and process life-cycle of a real `python -m server`: signals while loading and serving, a port in
use, a weights file that does not load, the device process's logs, its end when the server is gone, and
what it leaves in the temp dir."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from serverproc import free_port, running_server, sample_images, tiny_config

from loadtest.launch import REPO_ROOT

pytestmark = pytest.mark.e2e

LAYOUTS = {
    "single": ["--layout", "single"],
    "frontends": ["--layout", "frontends", "--http-processes", "2"],
}


def server_command(tmp_path: Path, config: dict, port: int, args=(), env: dict | None = None):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "server", "--config", str(tmp_path / "config.yaml"), "--host", "127.0.0.1",
           "--port", str(port), *args]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                 "PYTHONPATH": str(REPO_ROOT), **(env or {})}


@contextmanager
def started(tmp_path: Path, config: dict, args=(), env: dict | None = None):
    """The server, not waited for (running_server waits until it is ready); it and its children (`seen`, as
    the test found them) are killed at the end."""
    cmd, env = server_command(tmp_path, config, free_port(), args, env)
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    proc.log_path, proc.seen = log_path, []
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for process in proc.seen:
            try:
                process.kill()
            except psutil.Error:
                pass
        print(log_path.read_text(errors="replace")[-3000:])


def device_process(pid: int, timeout_s: float = 60) -> psutil.Process:
    """The server's device process (a multiprocessing child that is not the resource tracker)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in psutil.Process(pid).children():
            try:
                cmdline = " ".join(child.cmdline())
            except psutil.Error:  # a short-lived helper, gone meanwhile
                continue
            if "multiprocessing" in cmdline and "resource_tracker" not in cmdline:
                return child
        time.sleep(0.05)
    raise TimeoutError("no device process")


@pytest.fixture
def short_tmp():
    """A server's TMPDIR, short: the device process shares its slabs over a Unix socket there
    (multiprocessing's resource sharer), and a socket's path holds at most 107 bytes, which pytest-xdist's
    tmp_path leaves too little of."""
    path = Path(tempfile.mkdtemp(prefix="mame-tmp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def leftovers(tmp: Path) -> list[Path]:
    return [p for p in tmp.rglob("*") if p.name.startswith("pymp-")]


@pytest.mark.parametrize("layout", ["single", "frontends"])
def test_ctrl_c_drains_and_exits_by_sigint_without_a_traceback(layout):
    with running_server(tiny_config(), args=LAYOUTS[layout]) as server:
        image = sample_images()["flat"]
        assert httpx.post(f"{server.url}/v1/classify", content=image, timeout=30).status_code == 200
        server.proc.send_signal(signal.SIGINT)
        # as SIGTERM: the signal's status, after the drain
        assert server.proc.wait(timeout=30) == -signal.SIGINT
        log = server.log()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert "Finished server process" in log


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["INT", "TERM", "KILL"])
def test_a_signal_while_loading_ends_the_device_process_too(tmp_path, short_tmp, sig):
    """The device process ignores SIGINT/SIGTERM (the server drains through it); while it is still loading,
    the server stops it, and if the server is gone (kill -9) it notices and exits: no orphan loading on,
    holding its device, nor a BrokenPipe traceback from it when it is done."""
    tmp = short_tmp
    with started(
        tmp_path,
        tiny_config(),
        args=["--layout", "frontends", "--http-processes", "1"],
        env={"TMPDIR": str(tmp)},
    ) as proc:
        child = device_process(proc.pid)
        proc.seen.append(child)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == -sig
        assert "ready:" not in proc.log_path.read_text()  # it was loading
        _, alive = psutil.wait_procs([child], timeout=1 if sig != signal.SIGKILL else 15)
        assert not alive, "the device process outlived the server"
        time.sleep(0.5)  # anything it would still write
        log = proc.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "terminate called" not in log, log
    assert not leftovers(tmp)


def test_ctrl_c_while_loading_in_process_exits_by_sigint_not_an_abort(tmp_path):
    """SIGINT while the model loader thread is inside torch: the exit must not finalise the interpreter
    under it (C++ `terminate`, SIGABRT)."""
    with started(tmp_path, tiny_config(), args=LAYOUTS["single"]) as proc:
        deadline = time.monotonic() + 60
        while (
            "Waiting for application startup" not in proc.log_path.read_text() and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == -signal.SIGINT
        log = proc.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "terminate called" not in log, log


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_port_in_use_is_one_line_and_exit_2_before_loading(tmp_path, layout):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd, env = server_command(tmp_path, tiny_config(), port, LAYOUTS[layout])
        result = subprocess.run(
            cmd, check=False, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60
        )
    assert result.returncode == 2, result
    assert (
        result.stderr.strip() == f"mame-serve: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already "
        "in use"
    ), result.stderr
    assert result.stdout == ""  # nothing loaded, nothing started


@pytest.mark.parametrize("layout", ["single", "frontends"])
def test_a_weights_file_that_does_not_load_is_one_line_and_exit_2(tmp_path, layout):
    """The config's fault, found only when loading (the file exists but is no checkpoint): a one-line error
    naming the key, exit 2, as for the config errors found before loading. (Needs server/engine/models.py to
    raise ConfigError("models.<name>.weights: ...") for it.)"""
    weights = tmp_path / "weights.safetensors"
    weights.write_text("not a checkpoint\n")
    config = tiny_config()
    config["models"]["tiny"]["weights"] = str(weights)
    cmd, env = server_command(tmp_path, config, free_port(), LAYOUTS[layout])
    result = subprocess.run(
        cmd, check=False, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("mame-serve:")]
    assert len(said) == 1 and said[0].startswith("mame-serve: models.tiny.weights: "), result.stderr
    assert result.stderr.strip().endswith(said[0])


@pytest.mark.parametrize("level", ["info", "warning"])
def test_the_device_process_logs_as_the_server_does(tmp_path, level):
    """Its lines carry time, level and logger, at the server's --log-level: which cached weights it loaded
    (INFO), the random-weights banner (WARNING)."""
    import timm
    from safetensors.torch import save_file

    cached = tiny_config()["models"]["tiny"]
    model = timm.create_model(cached["arch"], pretrained=False, **cached["model_kwargs"])
    repo = (
        tmp_path / "hf" / "hub" / f"models--timm--{model.pretrained_cfg['hf_hub_id'].removeprefix('timm/')}"
    )
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    save_file(model.state_dict(), repo / "snapshots" / "abc" / "model.safetensors")
    config = tiny_config()
    config["models"]["tiny"]["weights"] = "auto"  # in the cache
    config["models"]["other"] = {**config["models"]["tiny"], "arch": "vit_small_patch16_224"}  # not: random
    with running_server(config, args=["--layout", "frontends", "--http-processes", "1", "--log-level", level],
                        env={"HF_HOME": str(tmp_path / "hf")}) as server:
        log = server.log()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    cache_line = (
        rf"(?m)^{stamp} INFO mame\.server\[device \d+\]: model tiny: HF_HUB_OFFLINE is set; using the hub "
        r"weights from the local cache .*model\.safetensors$"
    )
    assert bool(re.search(cache_line, log)) == (level == "info"), log
    assert re.search(
        rf"(?m)^{stamp} WARNING mame\.server\[device \d+\]: \n!{{78}}\nWARNING: model 'other'", log
    ), log


def test_a_killed_device_process_leaves_nothing_in_the_temp_dir(short_tmp):
    tmp = short_tmp
    with running_server(
        tiny_config(), args=["--layout", "frontends", "--http-processes", "1"], env={"TMPDIR": str(tmp)}
    ) as server:
        assert (
            httpx.post(f"{server.url}/v1/classify", content=sample_images()["flat"], timeout=30).status_code
            == 200
        )
        device_process(server.proc.pid).kill()
        assert server.proc.wait(timeout=30) == 1
    assert not leftovers(tmp), leftovers(tmp)


def test_a_temp_dir_too_long_for_unix_sockets_still_serves(tmp_path):
    """The device process shares its slabs over Unix sockets in its temp dir: under a TMPDIR too long a path
    for them (107 bytes), it makes that dir in /tmp instead, and the log says so."""
    tmp = tmp_path / ("t" * 80)
    tmp.mkdir()
    with running_server(
        tiny_config(), args=["--layout", "frontends", "--http-processes", "1"], env={"TMPDIR": str(tmp)}
    ) as server:
        answer = httpx.post(f"{server.url}/v1/classify", content=sample_images()["flat"], timeout=30)
        assert answer.status_code == 200, answer.text
        log = server.log()
    assert "too long a path for Unix sockets: the device process uses /tmp" in log, log


def test_requests_while_the_models_load_get_not_ready_and_a_retry_after(tmp_path):
    """The port is open before the models are: a request then is a 503 `not_ready` with Retry-After, /readyz
    says loading, /v1/models lists nothing yet and says so; once ready, the same request is answered."""
    config = tiny_config()
    config["models"]["tiny"].update(arch="vit_base_patch16_224", model_kwargs={})  # seconds to build and warm
    image = sample_images()["shapes"]
    with started(tmp_path, config, args=LAYOUTS["single"]) as proc:
        base = f"http://127.0.0.1:{proc.args[proc.args.index('--port') + 1]}"
        deadline, loading = time.monotonic() + 120, None
        while loading is None and time.monotonic() < deadline:
            try:
                readyz = httpx.get(f"{base}/readyz", timeout=5)
            except httpx.TransportError:  # not listening yet
                time.sleep(0.02)
                continue
            assert readyz.status_code == 503, "ready before one request could see it loading"
            loading = readyz.json()
        assert loading == {"status": "loading"}
        refused = httpx.post(
            f"{base}/v1/classify", content=image, headers={"content-type": "image/png"}, timeout=30
        )
        assert (refused.status_code, refused.json()["error"]) == (503, "not_ready"), refused.text
        assert int(refused.headers["retry-after"]) >= 1
        models = httpx.get(f"{base}/v1/models", timeout=5).json()
        assert models["models"] == [] and models["ready"] is False
        while httpx.get(f"{base}/readyz", timeout=5).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        answered = httpx.post(f"{base}/v1/classify", content=image, headers={"content-type": "image/png"},
                              timeout=60)
        assert answered.status_code == 200, answered.text
        counted = httpx.get(f"{base}/metrics", timeout=5).text
        assert 'status="503"' in counted and 'model="tiny"' in counted
