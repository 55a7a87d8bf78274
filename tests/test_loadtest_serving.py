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


# all but compile (minutes)
PARTS = ("serve16", "fe8", "serve1", "engine", "latency", "memory", "bench", "profile")


@pytest.mark.slow  # ~2 min: every part (the engine alone and the GIL profile checked here too)
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
    # The engine alone (python -m loadtest.engine): 1-image and 16-image requests, at most 64 per batch.
    for images in (1, 16):
        out = (tmp_path / f"engine-{images}.txt").read_text()
        assert int(re.search(rf"engine alone: (\d+) requests of {images} image\(s\)", out).group(1)) > 0
        assert images <= float(re.search(r"mean batch ([\d.]+) images", out).group(1)) <= 64
        per_request, per_image = map(float, re.search(
            r"engine CPU\s+([\d.]+) ms per request, ([\d.]+) ms per image", out).groups())
        assert per_request > 0 and per_image == pytest.approx(per_request / images, abs=0.002)
        assert re.search(r"MainThread\s+[\d.]+ ms per request", out)
    # serve16's first run profiles which server threads hold the GIL (py-spy: a dev dependency).
    share = float(re.search(r"GIL held (\d+) % of the profiled window", done.stdout).group(1))
    assert 0 < share <= 100 and (tmp_path / "gil-16.txt").stat().st_size > 0
    assert re.search(r"%\s+\S+ \(server/[\w/]+\.py:\d+\)", done.stdout), "no frame of the server's code"
    profiled = json.loads((tmp_path / "profile.json").read_text())["runs"][0]["rows"]
    assert [r["method"] for r in profiled] == ["timm", "none", "mame", "tome"]
    assert all(r["profile"]["top_level_ops"] > 0 for r in profiled)
    # A part that fails makes the script fail (its output goes through tee).
    failed = subprocess.run(["bash", "scripts/gpu-figures.sh", "latency"], cwd=REPO, check=False, text=True,
                            capture_output=True, timeout=120, env={**env, "PYTHON": "false"})
    assert failed.returncode == 1
