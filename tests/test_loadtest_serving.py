"""The serving benchmark runs end to end (real server, real client processes); its figures are printed,
never asserted on time."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent


def bench(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "loadtest.serving", *args], cwd=REPO, env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("layout", ["single", "frontends"])
def test_throughput_with_multi_image_requests_from_client_processes(layout):
    out = bench("throughput", "--tiny", "--threads", "1", "--batch", "8", "--rounds", "1", "--seconds", "1.5",
                "--images-per-request", "4", "--image-edge", "96", "--client-processes", "2",
                "--concurrency", "4", "--layout", layout, "--http-processes", "1")
    print(out)
    assert "4 requests of 4 image(s) (96 px JPEGs) in flight from 2 client process(es)" in out
    offline = float(re.search(r"offline model\s+([\d.]+) img/s", out).group(1))
    served = float(re.search(r"served \(HTTP\)\s+([\d.]+) img/s", out).group(1))
    ratio = float(re.search(r"ratio served/offline = ([\d.]+)", out).group(1))
    assert offline > 0 and served > 0 and ratio == pytest.approx(served / offline, rel=0.01)
    assert "requests failed" not in out
    assert float(re.search(r"event loop\s+([\d.]+) ms CPU per request", out).group(1)) > 0
    trip, server = map(float, re.search(r"round trip ([\d.]+) = server ([\d.]+)", out).groups())
    assert 0 < server <= trip
    # each image of 4 in a request, batch 8: 4 or 8 images per batch
    assert 4 <= float(re.search(r"at a mean batch of ([\d.]+) images", out).group(1)) <= 8


def test_the_engine_alone_is_measured_with_a_front_end_process():
    done = subprocess.run([sys.executable, "-m", "loadtest.engine", "--images-per-request", "2",
                           "--concurrency", "8", "--seconds", "1", "--batch", "8"],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    print(out)
    requests = int(re.search(r"engine alone: (\d+) requests of 2 image\(s\)", out).group(1))
    assert requests > 0
    assert 2 <= float(re.search(r"mean batch ([\d.]+) images", out).group(1)) <= 8
    per_request, per_image = map(float, re.search(
        r"engine CPU\s+([\d.]+) ms per request, ([\d.]+) ms per image", out).groups())
    assert per_request > 0 and per_image == pytest.approx(per_request / 2, abs=0.002)
    assert re.search(r"MainThread\s+[\d.]+ ms per request", out)


def test_gil_profile_of_the_server_is_summarised(tmp_path):
    profile = tmp_path / "gil.txt"
    out = bench("throughput", "--tiny", "--threads", "1", "--batch", "8", "--rounds", "1", "--seconds", "2",
                "--concurrency", "8", "--gil-profile", str(profile))
    print(out)
    share = float(re.search(r"GIL held (\d+) % of the profiled window", out).group(1))
    assert 0 < share <= 100 and profile.stat().st_size > 0
    assert re.search(r"%\s+\S+ \(server/[\w/]+\.py:\d+\)", out), "no frame of the server's own code was seen"


# all but compile (minutes)
PARTS = ("serve16", "fe8", "serve1", "engine", "latency", "memory", "bench", "profile")


@pytest.mark.slow  # ~90 s: every part, the default ViT-B config's memory among them
def test_the_gpu_figures_script_runs_every_part_on_the_cpu(tmp_path):
    """scripts/gpu-figures.sh in SMOKE mode: a broken flag or part is found here, not in a lent GPU's
    minutes."""
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        ["bash", "scripts/gpu-figures.sh", *PARTS],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for part in PARTS:
        assert f"--- part {part} took" in done.stdout, part
    assert done.stdout.count("ratio served/offline = ") == 5
    assert done.stdout.count("engine alone: ") == 2
    assert "requests failed" not in done.stdout
    written = {path.name for path in tmp_path.iterdir()}
    assert {"serve-vitb-16.txt", "serve-vitb-16-mame.txt", "engine-1.txt", "engine-16.txt",
            "serve-vitb-16-fe8.txt", "serve-vitb-1.txt", "latency.txt", "memory.txt",
            "bench-float16.json", "bench-bfloat16.json", "profile.json"} <= written
    profiled = json.loads((tmp_path / "profile.json").read_text())["runs"][0]["rows"]
    assert [r["method"] for r in profiled] == ["timm", "none", "mame", "tome"]
    assert all(r["profile"]["top_level_ops"] > 0 for r in profiled)
    # A part that fails makes the script fail (its output goes through tee).
    failed = subprocess.run(["bash", "scripts/gpu-figures.sh", "latency"], cwd=REPO, check=False, text=True,
                            capture_output=True, timeout=120, env={**env, "PYTHON": "false"})
    assert failed.returncode == 1
