"""mame-load and the Locust file against a real server process: the client's report must agree with
the server's own Prometheus counters."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serverproc import ServerProcess, running_server, tiny_config

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "ab"
CLIENT_ENV = {**os.environ, "OMP_NUM_THREADS": "1",
              "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    experiments = {EXPERIMENT: {"model": "tiny", "split": {"baseline": 0.5, "mame-0.5": 0.5},
                                "sticky": "header:X-User-Id"}}
    with running_server(tiny_config(experiments=experiments)) as process:
        yield process


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Three real pictures and one file that is not an image, which the server answers with 400."""
    directory = tmp_path / "images"
    directory.mkdir()
    (directory / "a-broken.jpg").write_bytes(b"this is not a jpeg")
    Image.linear_gradient("L").convert("RGB").save(directory / "b-gradient.png")
    Image.effect_noise((96, 96), 60).convert("RGB").save(directory / "c-noise.jpg")
    Image.new("RGB", (80, 120), (200, 30, 30)).save(directory / "d-flat.png")
    return directory


def scrape(server: ServerProcess) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every mame_ sample of /metrics, by sample name and sorted label pairs."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def delta(before, after, sample: str, by: tuple[str, ...], **match: str) -> Counter:
    """Change of one sample between two scrapes, summed by the labels in `by`, over the series whose
    labels equal `match`."""
    changes: Counter = Counter()
    for labels, value in after.get(sample, {}).items():
        label = dict(labels)
        if all(label[key] == wanted for key, wanted in match.items()):
            change = value - before.get(sample, {}).get(labels, 0.0)
            if change:
                changes[tuple(label[key] for key in by)] += change
    return changes


def requests_by_variant_and_status(before, after, **match: str) -> Counter:
    return delta(before, after, "mame_requests_total", ("variant", "status"), model="tiny", **match)


def reported_by_variant_and_status(report: dict) -> Counter:
    counts: Counter = Counter()
    for variant in report["variants"]:
        if variant["ok"]:
            counts[(variant["variant"], "200")] = variant["ok"]
        for status, count in variant["errors"].items():
            counts[(variant["variant"], status)] = count
    return counts


def run_mame_load(args: list[str], out: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "loadtest.load", *args, "--json", str(out)],
                            check=False, capture_output=True, text=True, timeout=120, env=CLIENT_ENV,
        cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(all)" in result.stdout  # the table
    assert "sent" in result.stderr  # the progress line
    return json.loads(out.read_text())


def test_open_loop_report_agrees_with_the_server_counters(server: ServerProcess, image_dir: Path,
                                                          tmp_path: Path) -> None:
    before = scrape(server)
    report = run_mame_load(["--url", server.url, "--variant", "baseline,mame-0.5", "--images", str(image_dir),
                            "--rate", "25", "--duration", "3", "--requests", "400", "--timeout", "20"],
                           tmp_path / "open.json")
    after = scrape(server)

    reported = reported_by_variant_and_status(report)
    # A running experiment on the model labels even explicit-variant requests, so match on the model only.
    assert reported == requests_by_variant_and_status(before, after)
    variants = {v["variant"]: v for v in report["variants"]}
    assert set(variants) == {"baseline", "mame-0.5"}
    assert sum(count for (_, status), count in reported.items() if status == "400") > 0  # the broken file
    assert report["total"]["sent"] == sum(reported.values()) >= 30

    # Server-side figures in the report are the server's: token counts and the mean queue wait.
    assert variants["baseline"]["final_tokens_mean"] == 65.0  # 8x8 patches + class token, nothing merged
    assert variants["mame-0.5"]["final_tokens_mean"] < 65.0
    waits = delta(before, after, "mame_queue_wait_seconds_sum", ("variant",), model="tiny")
    counts = delta(before, after, "mame_queue_wait_seconds_count", ("variant",), model="tiny")
    for name, variant in variants.items():
        wait, count = waits[(name,)], counts[(name,)]
        assert count == variant["ok"]
        assert variant["queue_ms_mean"] == pytest.approx(1000 * wait / count, abs=0.01)
        assert variant["latency_ms"]["p50"] <= variant["latency_ms"]["p99"] <= variant["latency_ms"]["max"]


def test_closed_loop_experiment_report_groups_by_the_assigned_variant(server: ServerProcess,
                                                                      tmp_path: Path) -> None:
    before = scrape(server)
    report = run_mame_load(
        [
            "--url",
            server.url,
            "--experiment",
            EXPERIMENT,
            "--users",
            "50",
            "--mode",
            "closed",
            "--concurrency",
            "4",
            "--requests",
            "60",
            "--duration",
            "20",
        ],
        tmp_path / "closed.json",
    )
    after = scrape(server)
    assert report["total"]["sent"] == 60
    assert reported_by_variant_and_status(report) == requests_by_variant_and_status(
        before, after, experiment=EXPERIMENT
    )
    assert {v["variant"] for v in report["variants"]} == {"baseline", "mame-0.5"}


def test_multi_image_requests_count_their_images(server: ServerProcess, tmp_path: Path) -> None:
    """--images-per-request: one multipart request of several images; the report's images match the
    server's image counter."""
    before = scrape(server)
    report = run_mame_load(
        [
            "--url",
            server.url,
            "--variant",
            "mame-0.5",
            "--mode",
            "closed",
            "--concurrency",
            "2",
            "--requests",
            "20",
            "--duration",
            "20",
            "--images-per-request",
            "3",
        ],
        tmp_path / "multi.json",
    )
    after = scrape(server)
    assert reported_by_variant_and_status(report) == requests_by_variant_and_status(before, after)
    images = delta(before, after, "mame_images_total", ("variant", "status"), model="tiny")
    assert images == Counter({("mame-0.5", "200"): 60})
    variant = report["variants"][0]
    assert variant["ok"] == 20 and variant["ok_images_per_s"] == pytest.approx(3 * variant["ok_rps"])
    assert variant["final_tokens_mean"] < 65.0


def test_open_inference_protocol_load_agrees_with_the_server_counters(server: ServerProcess, image_dir: Path,
                                                                      tmp_path: Path) -> None:
    """--protocol v2: the same images as infer requests; grouped by the version that served, counted as
    the server counts them (the broken file is a 400 there too), with the server's token counts."""
    before = scrape(server)
    report = run_mame_load(["--url", server.url, "--protocol", "v2", "--model", "tiny", "--variant",
                            "baseline,mame-0.5", "--images", str(image_dir), "--mode", "closed",
                            "--concurrency", "3", "--requests", "40", "--duration", "20"],
                           tmp_path / "v2.json")
    after = scrape(server)
    reported = reported_by_variant_and_status(report)
    assert reported == requests_by_variant_and_status(before, after)
    assert report["total"]["sent"] == 40 and sum(c for (_, s), c in reported.items() if s == "400") > 0
    variants = {v["variant"]: v for v in report["variants"]}
    assert variants["baseline"]["final_tokens_mean"] == 65.0 > variants["mame-0.5"]["final_tokens_mean"]


def test_open_inference_protocol_load_in_an_experiment(server: ServerProcess, tmp_path: Path) -> None:
    """No version in the path: the experiment assigns by the user header, as for /v1."""
    before = scrape(server)
    report = run_mame_load(["--url", server.url, "--protocol", "v2", "--model", "tiny", "--experiment",
                            EXPERIMENT, "--users", "50", "--mode", "closed", "--concurrency", "3",
                            "--requests", "40", "--duration", "20"], tmp_path / "v2-ab.json")
    after = scrape(server)
    assert reported_by_variant_and_status(report) == requests_by_variant_and_status(
        before, after, experiment=EXPERIMENT)
    assert {v["variant"] for v in report["variants"]} == {"baseline", "mame-0.5"}


def test_protocol_v2_needs_a_model() -> None:
    result = subprocess.run([sys.executable, "-m", "loadtest.load", "--protocol", "v2"], check=False,
                            capture_output=True, text=True, timeout=60, env=CLIENT_ENV, cwd=REPO_ROOT)
    assert result.returncode == 2
    assert "--protocol v2 names the model in the path: give --model" in result.stderr


@pytest.mark.skipif(shutil.which("locust", path=str(Path(sys.executable).parent)) is None,
                    reason="locust is not installed (pip install -e '.[loadtest]')")
def test_locust_names_requests_by_variant(server: ServerProcess, tmp_path: Path) -> None:
    before = scrape(server)
    locust = str(Path(sys.executable).parent / "locust")
    result = subprocess.run(
        [locust, "-f", "loadtest/locustfile.py", "--headless", "-H", server.url, "-u", "3", "-r", "3",
         "-t", "4s", "--variants", "baseline:1,mame-0.9:2", "--json-file", str(tmp_path / "stats"),
         "--only-summary", "--stop-timeout", "10"],
        check=False, capture_output=True, text=True, timeout=120, env=CLIENT_ENV,
        cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    after = scrape(server)
    # The final statistics (the --csv files are written periodically and can miss the last requests).
    rows = {entry["name"]: entry for entry in json.loads((tmp_path / "stats.json").read_text())}
    assert {"classify [baseline]", "classify [mame-0.9]"} <= set(rows)
    served = requests_by_variant_and_status(before, after)
    for variant in ("baseline", "mame-0.9"):
        row = rows[f"classify [{variant}]"]
        assert row["num_failures"] == 0
        assert row["num_requests"] == served[(variant, "200")] > 0
    # Weighted 1:2, so mame-0.9 should get clearly more of the traffic.
    assert served[("mame-0.9", "200")] > served[("baseline", "200")]


def test_sweep_writes_the_plot_and_the_saturation_table(server: ServerProcess, tmp_path: Path) -> None:
    plot, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.load",
            "--url",
            server.url,
            "--sweep",
            "--variant",
            "baseline,mame-0.5",
            "--rate",
            "4",
            "--sweep-factor",
            "2",
            "--sweep-steps",
            "2",
            "--duration",
            "1.5",
            "--max-p99-ms",
            "5000",
            "--min-goodput",
            "0.5",
            "--plot",
            str(plot),
            "--json",
            str(out),
            "--quiet",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=CLIENT_ENV,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| baseline |" in result.stdout and "| mame-0.5 |" in result.stdout
    sweep = json.loads(out.read_text())
    offered = [(p["variant"], p["offered_rps"]) for p in sweep["points"]]
    # Two light steps per variant stay within these loose limits on any machine, so the ladder runs out.
    # Rate-major: every variant runs a rate before any runs the next.
    assert offered == [("baseline", 4.0), ("mame-0.5", 4.0), ("baseline", 8.0), ("mame-0.5", 8.0)]
    assert all(p["step"]["ok"] == p["step"]["sent"] > 0 for p in sweep["points"])
    assert [row["stopped_by"] for row in sweep["saturation"]] == ["rate ladder exhausted"] * 2
    with Image.open(plot) as image:
        assert image.format == "PNG"


def test_footer_tells_client_pool_wait_from_server_time(tmp_path: Path) -> None:
    """Audit repro, shortened: every answer takes ~0.3 s (the batcher waits for more images), and one
    client connection serialises six requests sent at once. The latency grows to ~1.8 s; the server's
    own time stays ~0.3 s, and the footer's send lag must account for the rest."""
    with running_server(tiny_config(batching={"max_batch_size": 64, "max_wait_ms": 300})) as slow:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "loadtest.load",
                "--url",
                slow.url,
                "--variant",
                "baseline",
                "--rate",
                "1000",
                "--requests",
                "6",
                "--max-connections",
                "1",
                "--quiet",
                "--json",
                str(tmp_path / "slow.json"),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            env=CLIENT_ENV,
            cwd=REPO_ROOT,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "slow.json").read_text())
    total = report["total"]
    server_ms = total["queue_ms_mean"] + total["inference_ms_mean"]
    assert total["ok"] == 6 and 250 < server_ms < 1500  # max_wait_ms 300, plus a loaded machine's slack
    assert total["latency_ms"]["max"] > 4 * server_ms  # what the old footer left unexplained
    # The slowest request's latency is its wait in the client plus about one server answer (before, the lag
    # was ~0 and this difference was five answers).
    assert total["latency_ms"]["max"] - report["max_send_lag_ms"] < 2 * server_ms + 150
    assert f"max client send lag {report['max_send_lag_ms']:.1f} ms" in result.stdout
    assert "note: a request waited up to" in result.stdout
