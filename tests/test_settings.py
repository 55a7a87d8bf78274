"""server/settings.py and the process entry: flags over MAME_* variables, the layout."""

from __future__ import annotations

import pytest
import torch
from serverproc import tiny_config

from server.config import ServingConfig
from server.settings import parse_settings


def test_settings_flags_override_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MAME_PORT", "9100")
    monkeypatch.setenv("MAME_HOST", "127.0.0.2")
    settings = parse_settings(["--port", "9200"])
    assert settings.port == 9200 and settings.host == "127.0.0.2"
    settings = parse_settings(["--config", str(tmp_path / "x.yaml"), "--no-warmup"])
    assert settings.config == tmp_path / "x.yaml" and settings.no_warmup is True and settings.port == 9100


def test_every_flag_is_also_its_mame_variable_and_misspelt_ones_are_said(monkeypatch):
    from server.settings import unknown_variables

    monkeypatch.setenv("MAME_NO_WARMUP", "1")  # --no-warmup
    assert parse_settings([]).no_warmup is True
    environ = {"MAME_PROT": "9000", "MAME_PORT": "1", "MAME_ADMIN_TOKEN": "x", "HOME": "/root",
               # Kubernetes service links of a Service named mame-serve: not ours, and not warned about
               "MAME_SERVE_SERVICE_HOST": "10.0.0.1", "MAME_SERVE_SERVICE_PORT": "8000",
               "MAME_SERVE_SERVICE_PORT_HTTP": "8000", "MAME_SERVE_PORT": "tcp://10.0.0.1:8000",
               "MAME_SERVE_PORT_8000_TCP": "tcp://10.0.0.1:8000", "MAME_SERVE_PORT_8000_TCP_ADDR": "10.0.0.1"}
    assert unknown_variables(environ) == ["MAME_PROT"]
    # Without the service's _SERVICE_HOST a name ending in _PORT is a guess at a setting, said as such;
    # case does not matter (pydantic-settings reads MAME_port as MAME_PORT).
    assert unknown_variables({"MAME_HTTP_PORT": "1", "MAME_port": "1", "mame_prot": "1"}) == [
        "MAME_HTTP_PORT",
        "mame_prot",
    ]


def test_bad_environment_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("MAME_PORT", "not-a-port")
    with pytest.raises(ValueError, match="port"):
        parse_settings([])


def test_a_bad_flag_value_is_one_clear_line(capsys):
    from server.__main__ import main

    assert main(["--http-processes", "many"]) == 2
    error = capsys.readouterr().err
    assert (
        error.startswith("mame-serve: bad setting") and "http_processes" in error and "Traceback" not in error
    )


def test_layout_auto_means_one_process_without_a_cuda_device():
    from server.__main__ import resolve_http_processes, resolve_layout

    config = ServingConfig.model_validate(tiny_config())
    assert resolve_layout("auto", config) == "single"  # the tiny model runs on the CPU
    assert resolve_layout("frontends", config) == "frontends"
    assert resolve_http_processes(3) == 3 and 1 <= resolve_http_processes("auto") <= 8
    if not torch.cuda.is_available():  # a device that is not there: loading reports it, not this
        on_cuda = tiny_config()
        on_cuda["models"]["tiny"]["device"] = "cuda"
        assert resolve_layout("auto", ServingConfig.model_validate(on_cuda)) == "single"
