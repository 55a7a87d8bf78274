"""The fleet end to end: two `mame-serve` replicas on loopback sharing a split file, a real Prometheus
scraping both, and `mame-judge`. A variant with a very low tau (it disagrees with the baseline on about a
third of the images) under an agreement guardrail is rolled back while traffic flows through both
replicas; both replicas, their reports, their change logs and the judge's /metrics say so."""

from __future__ import annotations

import contextlib
import io
import itertools
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image
from serverproc import free_port, metric_values, running_server, sample_images, tiny_config

pytestmark = pytest.mark.e2e

TOKEN = "fleet-secret"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
EXPERIMENT = {
    "model": "tiny",
    "split": {"baseline": 0.5, "mame-low": 0.5},
    "sticky": "header:X-User-Id",
    "shadow": {"variant": "baseline", "rate": 1.0},
    "guardrails": [{"metric": "shadow_agreement", "min": 0.98}],
    "on_fail": "rollback",
}
LOW = '{experiment="tau-ab",variant="mame-low"}'


@contextlib.contextmanager
def prometheus(tmp_path: Path, targets: list[str]) -> Iterator[str]:
    """A real Prometheus scraping `targets` every 0.5 s; its base URL."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus; .ci/run installs it)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "500ms", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "mame", "static_configs": [{"targets": targets}]}],
    }))
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@contextlib.contextmanager
def judge(config: Path, prometheus_url: str, store: Path, port: int) -> Iterator[subprocess.Popen]:
    log = store.with_name("judge.log")
    with open(log, "wb") as out:  # a file, not a pipe: nobody reads a pipe while the test runs
        proc = subprocess.Popen(
            [sys.executable, "-m", "abtest.judge", "--config", str(config), "--prometheus", prometheus_url,
             "--store", f"file:{store}", "--interval", "0.5", "--host", "127.0.0.1", "--port", str(port)],
            cwd=Path(__file__).parent.parent, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        lines = [line for line in log.read_text(errors="replace").splitlines() if "HTTP Request" not in line]
        print("judge's log:", *lines, sep="\n", file=sys.stderr)
        assert proc.returncode == 0, "the judge did not stop cleanly on SIGTERM"


def noise_images(n: int, size: int = 64) -> list[bytes]:
    """Different random pictures: a low-tau variant disagrees with the baseline on a share of them."""
    rng = random.Random(17)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def metrics_of(url: str) -> str:
    try:
        return httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return ""


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Traffic:
    """Classify requests of many users, alternately to each replica, until stopped."""

    def __init__(self, urls: list[str], images: list[bytes]) -> None:
        self.urls, self.images = urls, images
        self.answers: list[tuple[str, str, int]] = []  # (replica, user, status)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            for i in itertools.count():
                if self._stop.is_set():
                    return
                url = self.urls[i % len(self.urls)]
                user = f"user-{i % 500}"
                answer = client.post(f"{url}/v1/classify", params={"experiment": "tau-ab"},
                                     content=self.images[i % len(self.images)], headers={"X-User-Id": user})
                self.answers.append((url, user, answer.status_code))

    def __enter__(self) -> Traffic:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_a_bad_variant_is_rolled_back_across_two_replicas(tmp_path):
    store = tmp_path / "splits.yaml"
    config = tiny_config(
        variants={"baseline": {"method": "none"}, "mame-low": {"method": "mame", "tau": 0.0}},
        experiments={"tau-ab": EXPERIMENT})
    config_path = tmp_path / "serving.yaml"
    config_path.write_text(yaml.safe_dump(config))
    judge_port = free_port()
    args = ["--split-store", str(store), "--split-poll-s", "0.2", "--judge-url", f"http://127.0.0.1:{judge_port}"]
    env = {"MAME_ADMIN_TOKEN": TOKEN}
    with running_server(config_path, args=args, env=env) as one, \
            running_server(config_path, args=args, env=env) as two:
        replicas = [one.url, two.url]
        # the same key goes to the same variant on both replicas
        for user in ("ann", "bob", "cyd", "dan"):
            variants = {httpx.post(f"{url}/v1/classify", params={"experiment": "tau-ab"},
                                   content=sample_images()["noise"],
                                   headers={"X-User-Id": user}).json()["variant"] for url in replicas}
            assert len(variants) == 1, (user, variants)
        with prometheus(tmp_path, [f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}"]) as prom, \
                judge(config_path, prom, store, judge_port), \
                Traffic(replicas, noise_images(40)) as traffic:
            # the judge puts the experiment into the store (version 1, the config's split), then rolls back
            flowing = time.monotonic()
            wait_for(lambda: all(metric_values(metrics_of(url), "mame_experiment_weight").get(LOW) == 0.0
                                 for url in replicas), 90, "the rollback on both replicas")
            served = len(traffic.answers)
            print(f"rolled back on both replicas after {time.monotonic() - flowing:.1f} s of traffic "
                  f"({served} answers)")
            judged = metrics_of(f"http://127.0.0.1:{judge_port}")
            assert metric_values(judged, "mame_judge_rollbacks_total")[
                '{experiment="tau-ab",guardrail="shadow_agreement",variant="mame-low"}'] == 1
            assert metric_values(judged, "mame_judge_split_weight")[LOW] == 0
            fleet = httpx.get(f"{one.url}/v1/experiments/tau-ab").json()["fleet"]
            assert fleet["split"] == {"baseline": 1.0, "mame-low": 0.0} and fleet["version"] == 2
            time.sleep(1.0)  # traffic goes on after the rollback
        assert len(traffic.answers) > served and {s for _, _, s in traffic.answers} == {200}
        assert {url for url, _, _ in traffic.answers} == set(replicas)

        for replica in (one, two):
            text = metrics_of(replica.url)
            weights = metric_values(text, "mame_experiment_weight")
            assert weights['{experiment="tau-ab",variant="baseline"}'] == 1 and weights[LOW] == 0
            assert metric_values(text, "mame_experiment_split_version")['{experiment="tau-ab"}'] == 2
            report = httpx.get(f"{replica.url}/v1/experiments/tau-ab").json()
            assert report["split"] == {"baseline": 1.0, "mame-low": 0.0} and report["version"] == 2
            assert report["variants"]["mame-low"]["intervals"]["shadow_agreement"]["high"] < 0.98
            assert report["fleet"] is None  # the judge has stopped: the replica's own report still answers
            change = httpx.get(f"{replica.url}/v1/admin/changes", headers=ADMIN).json()["changes"][-1]
            assert (change["action"], change["source"], change["version"]) == ("rollback", "store/judge", 2)
            assert "mame-low: shadow_agreement" in change["reason"] and "fails" in change["reason"]
            assert change["split_after"] == {"baseline": 1.0, "mame-low": 0.0}
            after = httpx.post(f"{replica.url}/v1/classify", params={"experiment": "tau-ab"},
                               content=sample_images()["flat"], headers={"X-User-Id": "user-7"}).json()
            assert after["variant"] == "baseline"
            assert "tau-ab rollback by store/judge" in replica.log()
