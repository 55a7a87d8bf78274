"""server/engine/models.py and the weights decision (no network needed, none attempted): checks
before loading, weights from the hub, its cache, a file or random, preprocessing and labels."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import yaml
from serverproc import TINY_MODEL, tiny_config

from mame_core.hub import hub_disabled_by_env, hub_reachable
from server.config import ConfigError, parse_config
from server.decode.transforms import preprocessing
from server.engine.models import class_labels, load_model


@pytest.mark.parametrize("name", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_variables_switch_the_hub_off(name):
    assert hub_disabled_by_env({name: "1"}) == name
    assert hub_disabled_by_env({name: "TRUE"}) == name
    assert hub_disabled_by_env({name: "0"}) is None
    assert hub_disabled_by_env({}) is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens here once the socket closes


def test_unreachable_hub_is_decided_fast(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    started = time.monotonic()
    assert hub_reachable() is False
    assert time.monotonic() - started < 3


def test_reachable_endpoint_is_detected(monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert hub_reachable() is True


def test_auto_weights_offline_fall_back_to_random_with_a_warning(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    cfg = parse_config(tiny_config()).models["tiny"].model_copy(update={"weights": "auto"})
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="mame.server"):
        loaded = load_model("tiny", cfg)
    assert time.monotonic() - started < 10
    assert loaded.weights == "random-init"
    assert "RANDOM weights" in caplog.text and "HF_HUB_OFFLINE" in caplog.text


def test_auto_weights_offline_come_from_the_hub_cache(monkeypatch, caplog, tmp_path):
    reference = load_model("tiny", parse_config(tiny_config()).models["tiny"]).model
    path = tmp_path / "cached.pth"
    torch.save({key: value * 2 for key, value in reference.state_dict().items()}, path)  # not the seeded init
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("mame_core.hub.cached_hub_file", lambda model: str(path))
    cfg = parse_config(tiny_config()).models["tiny"].model_copy(update={"weights": "auto"})
    with caplog.at_level("INFO", logger="mame.server"):
        loaded = load_model("tiny", cfg)
    assert loaded.weights == "hub" and f"using the hub weights from the local cache {path}" in caplog.text
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value * 2), key


def test_local_checkpoint_is_loaded_without_the_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    reference = load_model("tiny", parse_config(tiny_config()).models["tiny"]).model
    path = tmp_path / "tiny.pth"
    torch.save(reference.state_dict(), path)
    config = tiny_config()
    config["models"]["tiny"]["weights"] = str(path)
    loaded = load_model("tiny", parse_config(config).models["tiny"])
    assert loaded.weights == f"file:{path}"
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_preprocessing_follows_the_model_and_labels_come_offline():
    import timm

    model = timm.create_model(TINY_MODEL["arch"], pretrained=False, **TINY_MODEL["model_kwargs"])
    transform, input_size = preprocessing(model)
    assert input_size == (3, 64, 64)
    from PIL import Image

    assert transform(Image.new("RGB", (300, 200))).shape == (3, 64, 64)
    labels = class_labels(model)
    assert len(labels) == 1000 and labels[281] == "tabby, tabby cat"
    other = timm.create_model(
        TINY_MODEL["arch"], pretrained=False, num_classes=7, **TINY_MODEL["model_kwargs"]
    )
    assert class_labels(other) == [f"class_{i}" for i in range(7)]


@pytest.mark.parametrize("arch, kwargs", [
    ("vit_base_patch16_224", {}),  # 224 px, crop_pct 0.9: resize to 248, crop 224
    (TINY_MODEL["arch"], TINY_MODEL["model_kwargs"]),  # 64 px
    ("deit_tiny_patch16_224", {"depth": 1}),
])
def test_fused_resize_crop_equals_timms_transform(arch, kwargs):
    """The host transform resizes only the part the centre crop keeps; the pixels must be timm's own."""
    import timm
    from PIL import Image

    from mame_core.images import sample_images

    model = timm.create_model(arch, pretrained=False, **kwargs)
    transform, input_size = preprocessing(model)
    assert transform.resize_then_crop is not None
    pictures = [Image.open(path).convert("RGB") for path in sample_images()]
    pictures += [
        pictures[0].resize(size) for size in [(224, 224), (225, 700), (999, 300), (64, 64), (31, 47)]
    ]
    for picture in pictures:
        fused, reference = transform(picture), transform.pil_to_uint8(picture)
        assert fused.shape == reference.shape == input_size and fused.dtype == torch.uint8
        difference = (fused.int() - reference.int()).abs()
        # Fixed-point filter coefficients round differently for a box: at most 2 grey levels, rarely any.
        assert difference.max() <= 2 and difference.float().mean() < 0.2, picture.size


def test_unusual_transforms_are_not_fused():
    from torchvision import transforms

    from server.decode.transforms import fused_resize_crop

    plain = transforms.Compose([transforms.Resize(248), transforms.CenterCrop(224), transforms.PILToTensor()])
    assert fused_resize_crop(plain) is None  # not timm's MaybePILToTensor: unknown, left alone
    assert fused_resize_crop(transforms.Compose([transforms.Resize((224, 224))])) is None


def test_variant_with_zero_blocks_is_a_config_error():
    config = tiny_config()
    config["models"]["tiny"]["variants"]["bad"] = {"method": "mame", "tau": 0.9, "blocks": 0}
    with pytest.raises(ConfigError, match="models.tiny.variants.bad"):
        parse_config(config, "serving.yaml")


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            {"variants": {"deep": {"method": "mame", "tau": 0.9, "blocks": 99}}},
            "models.tiny.variants.deep: merging in the first 99 blocks, but the model has only 4 blocks",
        ),
        ({"arch": "nope_net"}, "models.tiny: timm cannot build 'nope_net': Unknown model"),
        ({"model_kwargs": {"bogus": 1}}, "models.tiny: timm cannot build 'vit_tiny_patch16_224'"),
        ({"arch": "resnet18", "model_kwargs": {}}, "models.tiny.arch: 'resnet18' cannot merge tokens"),
        # timm says these with an assert or a ZeroDivisionError: they were tracebacks, exit 1
        ({"model_kwargs": {**TINY_MODEL["model_kwargs"], "embed_dim": 65}}, "divisible by num_heads"),
        ({"model_kwargs": {**TINY_MODEL["model_kwargs"], "num_heads": 0}}, "timm cannot build"),
        ({"model_kwargs": {**TINY_MODEL["model_kwargs"], "class_token": False}}, "class token"),
        # they build, but cannot serve: a traceback at warm-up, or features answered as classes
        (
            {"model_kwargs": {**TINY_MODEL["model_kwargs"], "in_chans": 1}},
            "models.tiny.model_kwargs: in_chans 1",
        ),
        (
            {
                "model_kwargs": {**TINY_MODEL["model_kwargs"], "depth": 0},
                "variants": {"baseline": {"method": "none"}},
            },
            "models.tiny.model_kwargs: depth 0",
        ),
        (
            {"model_kwargs": {**TINY_MODEL["model_kwargs"], "num_classes": 0}},
            "models.tiny.model_kwargs: num_classes 0",
        ),
        ({"device": "gpu"}, "models.tiny.device: 'gpu' is not a device list"),
        ({"device": ","}, "models.tiny.device: ',' names no device"),
    ],
)
def test_models_that_cannot_serve_are_one_line_at_start(change, said, tmp_path, capsys):
    """Checked before anything loads (a meta-device build, no weights): exit 2 and the key, not a
    traceback."""
    from server.__main__ import main

    config = tiny_config()
    config["models"]["tiny"].update(change)
    config["models"]["tiny"].pop("default_variant", None)
    (tmp_path / "serving.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "serving.yaml"), "--port", "0"]) == 2
    error = capsys.readouterr().err
    assert said in error and "Traceback" not in error and len(error.strip().splitlines()) == 1, error


def test_a_weights_file_that_is_not_a_checkpoint_names_the_key(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    config = tiny_config()
    config["models"]["tiny"]["weights"] = str(notes)
    with pytest.raises(
        ConfigError, match=r"models.tiny.weights: cannot load .*notes.txt into vit_tiny_patch16_224"
    ):
        load_model("tiny", parse_config(config).models["tiny"])


def test_variant_past_the_models_depth_is_refused_at_load():
    config = tiny_config()  # the tiny model has 4 blocks
    config["models"]["tiny"]["variants"]["deep"] = {"method": "mame", "tau": 0.9, "blocks": 99}
    cfg = parse_config(config).models["tiny"]  # the depth is known only once the model is built
    with pytest.raises(
        ValueError,
        match="model 'tiny' .*variant 'deep': merging in the first 99 blocks, but the "
        "model has only 4 blocks",
    ):
        load_model("tiny", cfg)
