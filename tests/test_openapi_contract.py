"""The OpenAPI description is the contract: schemathesis (its CLI, `st run`) against a real `mame-serve`
with a tiny ViT finds no 5xx answer and no answer whose status, content type, headers or body the
description does not allow. Bounded: a few examples per operation, a minute at most. The checks and their
exceptions are in tests/schemathesis.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serverproc import running_server, tiny_config

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).with_name("schemathesis.toml")
ST = Path(sys.executable).with_name("st")


@pytest.mark.skipif(not ST.exists() and shutil.which("st") is None,
                    reason="schemathesis is not installed (pip install -e '.[dev]')")
def test_schemathesis_finds_no_contract_violation(tmp_path: Path) -> None:
    config = tiny_config(limits={"max_body_bytes": 200_000, "request_timeout_s": 20})
    with running_server(config, args=["--layout", "single", "--preprocess-threads", "2"]) as server:
        result = subprocess.run(
            [str(ST if ST.exists() else shutil.which("st")), "--config-file", str(CONFIG), "run",
             f"{server.url}/openapi.json", "--max-examples", "8", "--max-time", "60", "--seed", "1",
             "--workers", "1", "--no-color", "--phases", "examples,coverage,fuzzing"],
            check=False, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    output = result.stdout + result.stderr
    (tmp_path / "st.log").write_text(output)
    assert result.returncode == 0, output[-8000:]
    assert "No issues found" in output or "passed" in output, output[-4000:]
