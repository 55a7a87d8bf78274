"""The shipped Prometheus config and rules against a live server: a real `prometheus` process (Debian's
package) scrapes a real mame-serve on loopback; per-variant request rate and p95 latency are read back
through Prometheus' query API, and every query of the Grafana dashboard is run there and checked against
the metric names the live /metrics exports.
"""
from __future__ import annotations

import copy
import math
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from serverproc import free_port, running_server, sample_images, tiny_config
from test_deploy import (
    DEPLOY,
    dashboard_queries,
    dashboard_variable_metrics,
    docs_queries,
    every_query,
    promql_metric_names,
    raw_metric_names,
    tool,
)

pytestmark = pytest.mark.e2e


def of_the_server(exprs: list[str]) -> list[str]:
    """The queries over the server's series: not those over mame-judge's, which no judge exports here
    (tests/test_deploy.py checks their names against the judge's own metrics)."""
    return [e for e in exprs if not any(n.startswith("mame_judge_") for n in promql_metric_names(e))]


def without_filter(expr: str) -> str:
    """An alert-style query without its trailing comparison (`... > 1` is empty while all is well): the
    expression under it must still show data."""
    return re.sub(r"\s*[<>]=?\s*[0-9.]+\s*$", "", expr)

VARIANTS = ["baseline", "mame-0.5"]
EXPERIMENT = "ab"
AB_MODEL = "tiny-ab"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*", "$variant": ".*"}


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log_path: Path) -> None:
        self.url, self.proc, self.log_path = url, proc, log_path

    def query(self, expr: str) -> list[dict]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        return answer["data"]["result"]

    def by_variant(self, expr: str) -> dict[str, float]:
        return {series["metric"]["variant"]: float(series["value"][1]) for series in self.query(expr)}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def scrape_config_for(target: str, workdir: Path) -> Path:
    """The shipped prometheus.yml, pointed at `target`, scraping every second, with absolute rule paths."""
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / path) for path in config["rule_files"]]
    # The server's job alone: no judge runs beside this server.
    config["scrape_configs"] = [j for j in config["scrape_configs"] if j["job_name"] == "mame-serve"]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def server() -> Iterator:
    """Model "tiny" for plain traffic; its copy "tiny-ab" carries the experiment, so that experiment
    traffic (and explicit variants counted under a model's default experiment) stays apart."""
    config = tiny_config(experiments={EXPERIMENT: {
        "model": AB_MODEL, "split": {"baseline": 0.5, "mame-0.5": 0.5},
        "shadow": {"variant": "baseline", "rate": 1.0}}})
    config["models"][AB_MODEL] = copy.deepcopy(config["models"]["tiny"])
    with running_server(config) as live:
        yield live


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    workdir = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={scrape_config_for(f'127.0.0.1:{server.port}', workdir)}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prometheus exited:\n{prom.log()}"
            try:
                if httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready:\n{prom.log()}"
            time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def classify(client: httpx.Client, image: bytes, **params: str) -> None:
    answer = client.post("/v1/classify", params=params, files={"file": ("x.png", image, "image/png")})
    assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
def traffic(server, prometheus: Prometheus) -> dict[str, int]:
    """Requests per variant, sent in rounds until Prometheus has rated every variant (bounded: 90 s)."""
    images = list(sample_images(64).values())
    sent = dict.fromkeys(VARIANTS, 0)
    deadline = time.monotonic() + 90
    with httpx.Client(base_url=server.url, timeout=30) as client:
        while True:
            for variant in VARIANTS:
                for image in images:
                    classify(client, image, variant=variant)
                    sent[variant] += 1
            rates = prometheus.by_variant('model_variant:mame_requests:rate5m{model="tiny"}')
            if all(rates.get(variant, 0) > 0 for variant in VARIANTS):
                break
            assert time.monotonic() < deadline, (
                f"no rates in Prometheus after 90 s: {rates}\n{prometheus.log()}"
            )
            time.sleep(1)
    return sent


@pytest.fixture(scope="module")
def shadow_traffic(server, prometheus: Prometheus, traffic: dict[str, int]) -> None:
    """Experiment requests (every one shadowed) until Prometheus has a shadow agreement ratio and a request
    rate for each of the experiment's variants (bounded: 60 s). A variant whose counter was first scraped
    with all its requests in it has a rate of 0, and a ratio over it no value."""
    images = list(sample_images(64).values())
    deadline = time.monotonic() + 60
    rates = f'sum by (variant) (rate(mame_requests_total{{experiment="{EXPERIMENT}"}}[5m])) > 0'

    def rated() -> bool:
        return bool(prometheus.query("model_experiment_variant:mame_shadow_agreement:ratio_rate5m")) and \
            set(prometheus.by_variant(rates)) == {"baseline", "mame-0.5"}

    with httpx.Client(base_url=server.url, timeout=30) as client:
        while not rated():
            assert time.monotonic() < deadline, "no shadow agreement ratio in Prometheus after 60 s"
            for image in images:
                classify(client, image, experiment=EXPERIMENT)
            time.sleep(1)


def wait_for_scrape_after(prometheus: Prometheus, moment: float) -> None:
    """Until Prometheus holds a successful scrape taken after `moment` (unix seconds)."""
    deadline = time.monotonic() + 30
    while True:
        # timestamp() of a plain selector is the scrape time (of an expression, it would be "now").
        scraped = prometheus.query('timestamp(up{job="mame-serve"})')
        if scraped and float(scraped[0]["value"][1]) > moment:
            assert prometheus.query('up{job="mame-serve"}')[0]["value"][1] == "1", "the last scrape failed"
            return
        assert time.monotonic() < deadline, f"no scrape after the traffic: {scraped}"
        time.sleep(0.5)


def test_prometheus_reads_per_variant_rate_and_p95_latency(
    prometheus: Prometheus, traffic: dict[str, int]
) -> None:
    rates = prometheus.by_variant('model_variant:mame_requests:rate5m{model="tiny"}')
    p95 = prometheus.by_variant('model_variant:mame_request_duration_seconds:p95_5m{model="tiny"}')
    throughput = prometheus.by_variant('model_variant:mame_images_ok:rate5m{model="tiny"}')
    print(f"\nPrometheus per variant: requests/s {rates}, p95 s {p95}, images/s {throughput}")
    for variant in VARIANTS:
        assert rates[variant] > 0 and throughput[variant] > 0
        assert math.isfinite(p95[variant]) and 0 < p95[variant] < 30


def test_prometheus_counts_exactly_the_requests_sent(prometheus: Prometheus, traffic: dict[str, int]) -> None:
    wait_for_scrape_after(prometheus, time.time())
    counted = prometheus.by_variant(
        'sum by (variant) (mame_requests_total{model="tiny", status="200"})')
    assert {variant: int(counted[variant]) for variant in VARIANTS} == traffic


def live_series_names(metrics_text: str) -> set[str]:
    """Series names of a /metrics page, from its families (a labelled metric may have no sample yet)."""
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    return names


def test_every_query_names_only_metrics_the_live_server_exports(server, traffic: dict[str, int]) -> None:
    live = live_series_names(httpx.get(f"{server.url}/metrics", timeout=10).text)
    missing = {name: where for name, where in raw_metric_names(of_the_server(every_query())).items()
               if name not in live}
    missing |= {name: "template variable" for name in dashboard_variable_metrics() - live}
    assert not missing, f"queries name metrics the server does not export: {missing}"


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def test_every_dashboard_query_runs_in_prometheus_and_shows_data(prometheus: Prometheus,
                                                                 shadow_traffic: None) -> None:
    """With plain and experiment traffic (shadowed) every panel has data: none names a wrong label."""
    empty = [expr for expr in of_the_server(dashboard_queries())
             if not prometheus.query(without_filter(grafana_to_promql(expr)))]
    assert not empty, f"dashboard queries without data: {empty}"


def docs_to_promql(expr: str) -> str:
    """A docs query on this test's server: its experiment and model."""
    return expr.replace('experiment="tau-ab"', f'experiment="{EXPERIMENT}"').replace('"vit-b16"', '"tiny"')


def test_docs_queries_run_in_prometheus_and_ratios_are_zero_without_errors(
        prometheus: Prometheus, shadow_traffic: None) -> None:
    """The docs' PromQL runs and shows data (the autoscaler's names this test's job otherwise); the error
    ratio is 0 per variant, not an empty answer, while nothing failed."""
    queries = [docs_to_promql(q) for q in of_the_server(docs_queries()) if "namespace=" not in q]
    empty = [query for query in queries if not prometheus.query(without_filter(query))]
    assert not empty, f"docs queries without data: {empty}"
    (errors,) = [q for q in queries if 'status=~"5.."' in q]
    values = {r["metric"].get("variant"): float(r["value"][1]) for r in prometheus.query(errors)}
    assert values and set(values.values()) == {0.0}, values
