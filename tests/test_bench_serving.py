"""The serving benchmark runs end to end (real server, real client processes); its figures are printed,
never asserted on time."""

from __future__ import annotations

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
    done = subprocess.run([sys.executable, "-m", "server.bench_serving", *args], cwd=REPO, env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("device_process", ["off", "on"])
def test_throughput_with_multi_image_requests_from_client_processes(device_process):
    out = bench("throughput", "--tiny", "--threads", "1", "--batch", "8", "--rounds", "1", "--seconds", "1.5",
                "--images-per-request", "4", "--image-edge", "96", "--client-processes", "2",
                "--concurrency", "4", "--device-process", device_process)
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


def test_gil_profile_of_the_server_is_summarised(tmp_path):
    profile = tmp_path / "gil.txt"
    out = bench("throughput", "--tiny", "--threads", "1", "--batch", "8", "--rounds", "1", "--seconds", "2",
                "--concurrency", "8", "--gil-profile", str(profile))
    print(out)
    share = float(re.search(r"GIL held (\d+) % of the profiled window", out).group(1))
    assert 0 < share <= 100 and profile.stat().st_size > 0
    assert re.search(r"%\s+\S+ \(server/\w+\.py:\d+\)", out), "no frame of the server's own code was seen"
