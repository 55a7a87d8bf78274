"""server/config.py: the serving config YAML, validated with errors that name the key."""

from __future__ import annotations

import pytest
from serverproc import tiny_config

from server.config import ConfigError, load_config, parse_config


def test_default_config_is_valid_and_has_the_shipped_variants():
    config = load_config()
    model = config.models["vit-b16"]
    assert config.default_model_name == "vit-b16"
    assert model.arch == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert model.weights == "auto"
    assert set(model.variants) == {"baseline", "mame-0.9", "mame-0.85", "mame-0.8", "tome-r13"}
    assert model.variants["mame-0.8"].tau == 0.8 and model.variants["mame-0.8"].blocks == 8
    assert model.variants["tome-r13"].method == "tome" and model.variants["tome-r13"].r == 13
    assert model.variants["baseline"].method == "none"
    assert "tau-ab" in config.experiments


def test_tiny_config_is_valid():
    config = parse_config(tiny_config())
    assert config.default_model_name == "tiny"
    assert config.models["tiny"].default_variant_name == "baseline"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.update(colour="blue"), "colour"),
        (lambda c: c["models"]["tiny"].update(archh="x"), "models.tiny.archh"),
        (lambda c: c["models"]["tiny"]["batching"].update(max_batch=4), "models.tiny.batching.max_batch"),
        (
            lambda c: c["models"]["tiny"]["batching"].update(max_batch_size=0),
            "models.tiny.batching.max_batch_size",
        ),
        (
            lambda c: c["models"]["tiny"]["variants"].update(bad={"method": "mame", "tauu": 0.5}),
            "models.tiny.variants.bad",
        ),
        (
            lambda c: c["models"]["tiny"]["variants"].update(bad={"method": "tome"}),
            "models.tiny.variants.bad",
        ),
        (lambda c: c["models"]["tiny"].update(default_variant="nope"), "default_variant 'nope'"),
        (lambda c: c.update(default_model="nope"), "default_model 'nope'"),
        (lambda c: c["models"]["tiny"].update(weights="/no/such/file.pth"), "/no/such/file.pth"),
        (lambda c: c["models"]["tiny"].update(dtype="float64"), "models.tiny.dtype"),
        (lambda c: c.update(limits={"max_pixelz": 5}), "limits.max_pixelz"),
        (lambda c: c.update(limits={"large_image_nice": -1}), "limits.large_image_nice"),
        (lambda c: c.update(limits={"large_image_nice": 20}), "limits.large_image_nice"),
    ],
)
def test_bad_config_gives_an_error_naming_the_key(mutate, expected):
    config = tiny_config()
    mutate(config)
    with pytest.raises(ConfigError) as err:
        parse_config(config, "serving.yaml")
    assert expected in str(err.value)
    assert "serving.yaml" in str(err.value)


def test_config_file_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="cannot read serving config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(bad)


@pytest.mark.parametrize("limits", [{"request_timeout_s": float("inf")}, {"request_timeout_s": float("nan")},
                                    {"request_timeout_s": 7200}])
def test_timeouts_must_be_finite_and_bounded(limits):
    # .inf passed gt=0 and crashed the start (int(inf) for uvicorn's graceful shutdown)
    with pytest.raises(ConfigError, match="limits.request_timeout_s"):
        parse_config(tiny_config(limits=limits), "serving.yaml")


def test_the_large_image_lanes_nice_value_is_bounded_as_linux_bounds_it():
    assert parse_config(tiny_config()).limits.large_image_nice == 10
    for nice in (0, 19):
        assert parse_config(tiny_config(limits={"large_image_nice": nice})).limits.large_image_nice == nice
    with pytest.raises(ConfigError, match=r"limits.large_image_nice[\s\S]*less than or equal to 19"):
        parse_config(tiny_config(limits={"large_image_nice": 20}), "serving.yaml")
