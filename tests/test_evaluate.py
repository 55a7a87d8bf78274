"""mame-eval on a tiny ImageFolder that the test writes, with a tiny random ViT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mame_core.evaluate import class_indices, main
from mame_core.images import load_model, load_rgb, make_batch, sample_images

TINY = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2, "num_classes": 5}
pytestmark = pytest.mark.filterwarnings("ignore:.*random weights")


def write_image_folder(root: Path, classes: list[str], per_class: int = 3) -> Path:
    """Crops of the bundled photographs, `per_class` per class folder."""
    photos = [load_rgb(p) for p in sample_images()]
    k = 0
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            photo = photos[k % len(photos)]
            w, h = photo.size
            photo.crop((i * 10, 0, w - i * 10, h)).save(root / c / f"{i}.jpg")
            k += 1
    return root


def test_class_indices():
    assert class_indices(["n01440764", "n01443537", "n15075141"], 1000) == [0, 1, 999]
    assert class_indices(["cat", "dog"], 5) == [0, 1]
    with pytest.raises(ValueError, match="only 1 classes"):
        class_indices(["cat", "dog"], 1)
    with pytest.raises(ValueError, match="model has 5 classes"):
        class_indices(["n01440764"], 5)
    with pytest.raises(ValueError, match="not ImageNet-1k classes"):
        class_indices(["n00000001"], 1000)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny model's weights saved to a file, so the test knows exactly which model it evaluates."""
    torch.manual_seed(0)
    model = load_model("vit_tiny_patch16_224", "random", TINY)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path


def test_eval_on_tiny_folder(tmp_path, checkpoint, capsys):
    folder = write_image_folder(tmp_path / "data", ["cat", "dog", "fish"])
    out = tmp_path / "eval.json"
    rc = main(
        [str(folder), "--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY),
         "--weights", str(checkpoint), "--taus", "1.0,0.9,0.5", "--tome-r", "4", "--batch-size", "4",
         "--workers", "0", "--json", str(out), "--no-progress"]
    )
    assert rc == 0
    assert "tau=0.5" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["classes"] == 3 and report["weights"] == str(checkpoint)
    rows = {r["setting"]: r for r in report["rows"]}
    assert list(rows) == ["-", "tau=1", "tau=0.9", "tau=0.5", "r=4"]
    assert all(r["images"] == 9 for r in rows.values())
    # Nothing merged: same predictions as the unmerged model.
    assert rows["-"]["agreement"] == 1.0
    assert rows["tau=1"]["agreement"] == 1.0
    assert rows["tau=1"]["top1"] == rows["-"]["top1"]
    assert rows["tau=1"]["mean_final_tokens"] == 65
    assert rows["r=4"]["mean_final_tokens"] == 65 - 4 * 4
    assert rows["tau=0.5"]["mean_final_tokens"] <= rows["tau=0.9"]["mean_final_tokens"] <= 65

    # The unmerged top-1 accuracy, recomputed with the plain timm model on the same files.
    model = load_model("vit_tiny_patch16_224", str(checkpoint), TINY)
    hits = 0
    for label, cls in enumerate(["cat", "dog", "fish"]):
        x = make_batch(sorted((folder / cls).iterdir()), model, 3)
        with torch.inference_mode():
            hits += int((model(x).argmax(dim=-1) == label).sum())
    assert rows["-"]["top1"] == pytest.approx(hits / 9)


def test_eval_json_to_stdout(tmp_path, checkpoint, capsys):
    folder = write_image_folder(tmp_path / "data", ["a", "b"], per_class=1)
    rc = main(
        [str(folder), "--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY), "--weights",
         str(checkpoint), "--taus", "0.8", "--workers", "0", "--json", "--no-progress"]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["setting"] for r in report["rows"]] == ["-", "tau=0.8"]
    assert set(report["rows"][0]) == {
        "method", "setting", "images", "top1", "agreement", "mean_final_tokens", "gflops"
    }


def test_eval_rejects_bad_folder(tmp_path, capsys):
    args = ["--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY), "--weights", "random"]
    assert main([str(tmp_path / "missing"), *args]) == 2
    assert "not an ImageFolder directory" in capsys.readouterr().err
    assert main([str(tmp_path), *args]) == 2  # exists, but has no class folders
    assert "not an ImageFolder directory" in capsys.readouterr().err


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mame-eval: error: "), err
    return lines[0]


def test_eval_refuses_a_file_that_is_not_an_image(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "data", ["cat", "dog"], per_class=1)
    (folder / "dog" / "bad.jpg").write_text("not an image")
    (folder / "dog" / "notes.txt").write_text("not a picture file: skipped, as ImageFolder does")
    rc = main([str(folder), "--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY),
               "--weights", "random", "--no-progress"])
    assert rc == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "bad.jpg" in line and "not a readable image" in line


@pytest.mark.parametrize("workers", ["0", "1"])
def test_eval_refuses_a_picture_that_fails_to_decode_mid_run(tmp_path, capsys, workers):
    # Its header reads, its pixels do not: only found when the loader decodes it, in a worker process or not.
    folder = write_image_folder(tmp_path / "data", ["cat", "dog"], per_class=1)
    whole = (folder / "dog" / "0.jpg").read_bytes()
    (folder / "dog" / "cut.jpg").write_bytes(whole[: len(whole) // 3])
    rc = main([str(folder), "--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY),
               "--weights", "random", "--no-progress", "--workers", workers])
    assert rc == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "cut.jpg' is not a readable image" in line


def test_eval_default_hub_weights_offline_is_one_clear_line(tmp_path, monkeypatch, capsys):
    folder = write_image_folder(tmp_path / "data", ["cat"], per_class=1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("mame_core.hub.cached_hub_file", lambda model: None)  # whatever this machine caches
    rc = main(
        [str(folder), "--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY), "--no-progress"]
    )
    assert rc == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "HF_HUB_OFFLINE is set" in line and "--weights random" in line


def test_eval_refuses_mame_blocks_past_the_depth(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "data", ["cat"], per_class=1)
    rc = main([str(folder), "--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY),
               "--weights", "random", "--mame-blocks", "99", "--no-progress"])
    assert rc == 2
    assert "--mame-blocks 99 outside 1..4" in _one_line_error(capsys.readouterr().err)
