"""mame-bench on a tiny ViT (rows, token counts, ratios, JSON), and the shared image helpers."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mame_core import MergeSettings, patch_vit
from mame_core.bench import (
    format_mixed,
    format_profile,
    main,
    make_variants,
    mixed_variants,
    parse_list,
    parse_mixed_tau,
    resolve_device_dtype,
    run_bench,
    summarise_mixed,
)
from mame_core.images import fill_batch, list_images, load_model, load_rgb, make_batch, sample_images

TINY = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}
pytestmark = pytest.mark.filterwarnings("ignore:.*random weights")


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return load_model("vit_tiny_patch16_224", "random", TINY)


def test_samples_are_bundled_and_decode():
    paths = sample_images()
    assert 6 <= len(paths) <= 10
    assert sum(p.stat().st_size for p in paths) < 1_000_000
    for p in paths:
        img = load_rgb(p)
        assert img.mode == "RGB" and max(img.size) <= 512
    licences = (paths[0].parent / "LICENSES.md").read_text()
    assert all(p.name in licences for p in paths)


def test_fill_batch_tiles_with_distinct_augmented_copies():
    pictures = [Image.new("RGB", (40, 30), (i * 60, 100, 200 - i * 60)) for i in range(3)]
    pictures[0].putpixel((0, 0), (255, 255, 255))  # asymmetric, so a mirrored copy differs
    batch = fill_batch(pictures, 7)
    assert len(batch) == 7
    assert batch[:3] == pictures  # the first round is the pictures themselves
    assert batch[3].tobytes() != pictures[0].tobytes()  # later rounds: cropped and/or mirrored
    assert fill_batch(pictures, 7, seed=0)[3].size == batch[3].size  # deterministic per seed
    with pytest.raises(ValueError, match="at least one image"):
        fill_batch([], 4)


def test_make_batch_follows_model_input_size(tiny_model):
    x = make_batch(sample_images(), tiny_model, 12)
    assert x.shape == (12, 3, 64, 64) and x.dtype == torch.float32
    assert len({tuple(img.flatten()[:50].tolist()) for img in x}) == 12  # no two identical images


def test_list_images_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path)


def test_random_weights_are_reproducible():
    a, b = (load_model("vit_tiny_patch16_224", "random", TINY) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown timm architecture"):
        load_model("not_a_model_arch")
    with pytest.raises(ValueError, match="checkpoint file"):
        load_model("vit_tiny_patch16_224", str(tmp_path / "missing.pth"), TINY)
    # Each of these was a traceback from timm or torch: a model patch_vit cannot patch, a keyword the model
    # does not take, a file that is not a checkpoint, a checkpoint of another shape.
    with pytest.raises(ValueError, match="resnet18: patch_vit needs a timm VisionTransformer"):
        load_model("resnet18")
    with pytest.raises(ValueError, match="--model-kwargs .*unexpected keyword argument 'foo'"):
        load_model("vit_tiny_patch16_224", "random", {**TINY, "foo": 1})
    not_checkpoint = tmp_path / "notes.pth"
    not_checkpoint.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="--weights .*notes.pth: cannot load it into vit_tiny_patch16_224"):
        load_model("vit_tiny_patch16_224", str(not_checkpoint), TINY)
    other_shape = tmp_path / "deeper.pth"
    torch.save(load_model("vit_tiny_patch16_224", "random", {**TINY, "depth": 5}).state_dict(), other_shape)
    with pytest.raises(ValueError, match="cannot load it into .*Unexpected key.*blocks.4"):
        load_model("vit_tiny_patch16_224", str(other_shape), TINY)


def test_parsers():
    assert parse_list("1.0, 0.9,", float, "--taus") == [1.0, 0.9]
    assert parse_list("", int, "--tome-r") == []
    with pytest.raises(ValueError, match="--tome-r"):
        parse_list("8,x", int, "--tome-r")
    assert resolve_device_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="--dtype"):
        resolve_device_dtype("cpu", "float8")


def test_variants_order():
    variants = make_variants([1.0, 0.8], [2], mame_blocks=8)
    assert [(v.method, v.setting) for v in variants] == [
        ("none", "-"), ("mame", "tau=1"), ("mame", "tau=0.8"), ("tome", "r=2")
    ]
    assert variants[2].settings.tau == 0.8 and variants[2].settings.blocks == 8
    assert variants[3].settings.r == 2
    with_timm = make_variants([], [], mame_blocks=8, unpatched=True)
    assert [(v.method, v.settings) for v in with_timm] == [("timm", None),
                                                         ("none", MergeSettings(method="none"))]


def test_run_bench_rows(tiny_model):
    full = patch_vit(tiny_model).input_tokens  # 64 patches + class token
    x = make_batch(sample_images(), tiny_model, 4)
    variants = make_variants([1.0, 0.5], [2, 4], mame_blocks=8, unpatched=True)
    rows = run_bench(tiny_model, x, variants, rounds=3, iters=1, warmup=0, progress=False)
    assert [r.setting for r in rows] == ["unpatched", "-", "tau=1", "tau=0.5", "r=2", "r=4"]
    by_setting = {r.setting: r for r in rows}
    assert by_setting["unpatched"].ratio == 1.0
    assert by_setting["unpatched"].mean_final_tokens == full
    assert by_setting["-"].mean_final_tokens == full == by_setting["-"].max_final_tokens
    assert by_setting["tau=1"].mean_final_tokens == full
    assert by_setting["tau=0.5"].mean_final_tokens <= full
    # ToMe removes r tokens in each of the 4 blocks.
    assert by_setting["r=2"].mean_final_tokens == full - 4 * 2
    assert by_setting["r=4"].mean_final_tokens == full - 4 * 4
    assert by_setting["r=4"].gflops < by_setting["r=2"].gflops < by_setting["-"].gflops
    for r in rows:
        assert r.images == 4 and r.profile is None
        assert len(r.img_per_s_rounds) == 3 and all(s > 0 for s in r.img_per_s_rounds)
        assert r.img_per_s == sorted(r.img_per_s_rounds)[1]  # the median of 3
        assert r.ratio == pytest.approx(r.img_per_s / rows[0].img_per_s)
        # Speedup over timm divided by the GFLOPs reduction (timm's GFLOPs / the row's).
        assert r.efficiency == pytest.approx(r.ratio / (rows[0].gflops / r.gflops))
        assert r.best_img_per_s == max(r.img_per_s_rounds)
        assert r.best_ratio == pytest.approx(r.best_img_per_s / rows[0].best_img_per_s)
        assert r.img_per_cpu_s > 0 and r.cpu_ratio == pytest.approx(r.img_per_cpu_s / rows[0].img_per_cpu_s)


def test_command_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    images = tmp_path / "pictures"
    images.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        (images / name).write_bytes((sample_images()[0].parent / name).read_bytes())
    threads = torch.get_num_threads()
    try:
        rc = main(
            ["--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY), "--batch-size", "1,3",
             "--taus", "1.0,0.8", "--tome-r", "3", "--images", str(images), "--rounds", "2", "--iters", "1",
             "--warmup", "0", "--json", str(out), "--no-progress", "--threads", "1"]
        )
    finally:
        torch.set_num_threads(threads)  # main() sets it for the whole process
    assert rc == 0
    table = capsys.readouterr().out
    assert "tau=0.8" in table and "r=3" in table and "random-init" in table and "img/CPU-s" in table
    assert "efficiency" in table and "batch 1 (1 of the 2 pictures)" in table
    assert "batch 3 (2 pictures and augmented copies)" in table
    assert "no mixed case: it needs a batch of at least 2 images" in table  # batch 1
    assert "mixed / sum of parts" in table and "merge at tau=0.8" in table  # batch 3, the lowest tau below 1
    report = json.loads(out.read_text())
    assert report["batch_sizes"] == [1, 3] and report["weights"] == "random-init"
    assert report["images_in_folder"] == 2
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["torch_threads"] == 1
    assert [run["batch_size"] for run in report["runs"]] == [1, 3]
    assert [run["num_images"] for run in report["runs"]] == [1, 2]
    assert report["runs"][0]["mixed"] is None
    for run in report["runs"]:
        rows = run["rows"]
        assert [(r["method"], r["setting"]) for r in rows] == [
            ("timm", "unpatched"), ("none", "-"), ("mame", "tau=1"), ("mame", "tau=0.8"), ("tome", "r=3")
        ]
        assert set(rows[0]) == {
            "method", "setting", "images", "mean_final_tokens", "max_final_tokens", "gflops", "img_per_s",
            "ratio", "best_img_per_s", "best_ratio", "img_per_cpu_s", "cpu_ratio", "efficiency",
            "img_per_s_rounds", "profile", "compiled",
        }
        assert rows[0]["ratio"] == 1.0 and rows[4]["mean_final_tokens"] == 65 - 4 * 3
        assert all(r["images"] == run["batch_size"] and r["profile"] is None for r in rows)
        for r in rows:
            assert r["efficiency"] == pytest.approx(r["ratio"] * r["gflops"] / rows[0]["gflops"])
    mixed = report["runs"][1]["mixed"]
    assert mixed["tau"] == 0.8 and [r["images"] for r in mixed["rows"]] == [3, 2, 1]
    assert mixed["held_picture"] in (None, "chelsea.jpg", "coffee.jpg")
    parts = mixed["others_ms"] + mixed["held_ms"]
    assert mixed["mixed_over_parts"] == pytest.approx(mixed["mixed_ms"] / parts)


def test_mixed_case_holds_the_most_merging_image_and_reads_against_its_parts(tiny_model):
    x = make_batch(sample_images(), tiny_model, 5)
    vit = patch_vit(tiny_model)
    with torch.inference_mode():
        finals = vit(x, MergeSettings(method="mame", tau=0.5)).tokens[:, -1]
    extra = mixed_variants(tiny_model, x, 0.5, mame_blocks=None)
    held = int(finals.argmin())
    assert [v.images for v in extra] == [None, tuple(i for i in range(5) if i != held), (held,)]
    assert extra[0].tau == tuple(1.0 if i == held else 0.5 for i in range(5)) and extra[2].tau == (1.0,)
    variants = make_variants([0.5], [], mame_blocks=None, unpatched=True) + extra
    rows = run_bench(tiny_model, x, variants, rounds=2, iters=1, warmup=0, progress=False)
    mixed, others, alone = rows[-3:]
    full = vit.input_tokens
    # Every image keeps its own count in the batch (batch invariance), so the mixed batch's tokens and GFLOPs
    # are those of its parts; the held image keeps all its tokens.
    assert (mixed.images, others.images, alone.images) == (5, 4, 1)
    assert alone.mean_final_tokens == full == mixed.max_final_tokens
    assert 5 * mixed.mean_final_tokens == pytest.approx(
        4 * others.mean_final_tokens + alone.mean_final_tokens)
    assert 5 * mixed.gflops == pytest.approx(4 * others.gflops + alone.gflops)
    assert others.mean_final_tokens < full
    summary = summarise_mixed(rows, 0.5, held, "name.jpg")
    assert summary.mixed_ms == pytest.approx(1e3 * 5 / mixed.img_per_s)
    assert summary.held_ms == pytest.approx(1e3 / alone.img_per_s)
    assert summary.parts_ms == pytest.approx(summary.others_ms + summary.held_ms)
    assert summary.mixed_over_parts == pytest.approx(summary.mixed_ms / summary.parts_ms)
    assert summary.unmerged_ms == pytest.approx(1e3 * 5 / rows[1].img_per_s)
    assert summary.mixed_over_unmerged == pytest.approx(summary.mixed_ms / summary.unmerged_ms)
    text = format_mixed(rows, summary)
    assert f"image {held} (name.jpg) held unmerged" in text and "the other 4 merge at tau=0.5" in text
    assert f"mixed / sum of parts {summary.mixed_over_parts:.3f}x" in text
    with pytest.raises(ValueError, match="at least 2 images"):
        mixed_variants(tiny_model, x[:1], 0.5, mame_blocks=None)


def test_mixed_tau_option():
    assert parse_mixed_tau("auto", [1.0, 0.9, 0.7, 0.8]) == 0.7
    assert parse_mixed_tau("auto", [1.0]) is None and parse_mixed_tau("off", [0.7]) is None
    assert parse_mixed_tau("0.85", []) == 0.85
    for bad in ("1.0", "-2", "x"):
        with pytest.raises(ValueError, match="--mixed-tau"):
            parse_mixed_tau(bad, [])


def test_profile_counts_ops_per_forward(tiny_model):
    x = make_batch(sample_images(), tiny_model, 2)
    variants = make_variants([1.0, 0.5], [4], mame_blocks=None, unpatched=True)
    rows = run_bench(tiny_model, x, variants, rounds=1, iters=1, warmup=0, progress=False, profile=True)
    timm, merged_mame, tome = rows[0].profile, rows[3].profile, rows[4].profile
    # timm's forward of a 4-block ViT: at least the 4 x 4 linear layers and 4 attentions at the top level.
    assert 20 <= timm.top_level_ops < timm.aten_ops
    # A merge step adds operators in each block; the patched but unmerged forward adds none over timm's.
    assert merged_mame.top_level_ops > rows[1].profile.top_level_ops
    assert rows[1].profile.top_level_ops <= timm.top_level_ops
    assert tome.top_level_ops > rows[1].profile.top_level_ops
    for r in rows:
        p = r.profile
        assert p.sorted_by == "self CPU time" and 1 <= len(p.top_ops) <= 8
        times = [op.self_cpu_ms for op in p.top_ops]
        assert times == sorted(times, reverse=True) and times[0] > 0
        assert any(op.name == "aten::addmm" and op.calls >= 16 for op in p.top_ops)  # the linear layers
    text = format_profile(rows)
    assert f"{timm.top_level_ops:>11}   1.00x" in text
    assert f"{tome.top_level_ops / timm.top_level_ops:>7.2f}x" in text


def test_command_profile_json(capsys):
    threads = torch.get_num_threads()
    try:
        rc = main(["--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY), "--batch-size", "2",
                   "--taus", "0.5", "--tome-r", "", "--mixed-tau", "off", "--rounds", "1", "--iters", "1",
                   "--warmup", "0", "--profile", "--json", "--no-progress", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    (run,) = report["runs"]
    assert run["mixed"] is None
    assert [r["setting"] for r in run["rows"]] == ["unpatched", "-", "tau=0.5"]
    for r in run["rows"]:
        profile = r["profile"]
        assert 0 < profile["top_level_ops"] < profile["aten_ops"]
        assert {"name", "calls", "self_cpu_ms", "self_device_ms"} == set(profile["top_ops"][0])


def test_command_rejects_bad_options(capsys):
    assert main(["--taus", "0.9,abc"]) == 2
    assert "--taus" in capsys.readouterr().err
    for sizes in ("0", "8,0", "8,x", ""):
        assert main(["--batch-size", sizes]) == 2
        assert "--batch-size" in _one_line_error(capsys.readouterr().err, "mame-bench")
    assert main(["--mixed-tau", "1"]) == 2
    assert "--mixed-tau must be in [-1, 1)" in _one_line_error(capsys.readouterr().err, "mame-bench")
    assert main(["--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
    for flag, value in [("--rounds", "0"), ("--iters", "0"), ("--warmup", "-1")]:
        assert main([flag, value]) == 2
        assert flag in _one_line_error(capsys.readouterr().err, "mame-bench")
    assert main(["--device", "gpu"]) == 2
    assert "--device 'gpu'" in _one_line_error(capsys.readouterr().err, "mame-bench")


def test_command_refuses_an_unwritable_json_path_before_the_run(tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    assert main(["--json", str(tmp_path / "file" / "bench.json")]) == 2
    assert "--json" in _one_line_error(capsys.readouterr().err, "mame-bench")
    assert main(["--json", str(tmp_path)]) == 2
    assert "is a directory" in _one_line_error(capsys.readouterr().err, "mame-bench")


def test_header_says_which_pictures_fill_the_batch():
    from mame_core.bench import batch_pictures

    assert batch_pictures(8, 9) == "8 of the 9 pictures"
    assert batch_pictures(9, 9) == "9 pictures"
    assert batch_pictures(16, 9) == "9 pictures and augmented copies"


def _one_line_error(err: str, prog: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def test_command_refuses_a_file_that_is_not_an_image(tmp_path, capsys):
    images = tmp_path / "pictures"
    images.mkdir()
    (images / "coffee.jpg").write_bytes(sample_images()[0].read_bytes())
    (images / "bad.jpg").write_text("not an image")
    rc = main(["--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY), "--images", str(images),
               "--no-progress"])
    assert rc == 2
    assert "bad.jpg" in _one_line_error(capsys.readouterr().err, "mame-bench")


# Each is refused before loading a model.
@pytest.mark.parametrize(("blocks", "said"), [("99", "--mame-blocks 99 outside 1..4"),
                                             ("5", "--mame-blocks 5 outside 1..4"),
                                             ("0", "blocks must be an integer >= 1")])
def test_command_refuses_mame_blocks_outside_the_model(blocks, said, capsys):
    rc = main(["--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY), "--mame-blocks", blocks,
               "--no-progress"])
    assert rc == 2
    assert said in _one_line_error(capsys.readouterr().err, "mame-bench")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("offline", ["variable", "unreachable"])
def test_hub_weights_without_the_hub_are_one_clear_line(offline, monkeypatch, capsys):
    if offline == "variable":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # decided by the probe in seconds, not after the hub client's retries
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr("mame_core.hub.cached_hub_file", lambda model: None)  # whatever this machine caches
    rc = main(["--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY), "--weights", "hub",
               "--no-progress"])
    assert rc == 2
    line = _one_line_error(capsys.readouterr().err, "mame-bench")
    assert "pretrained weights" in line and "not in the local hub cache" in line
    assert "--weights random" in line


def test_hub_weights_come_from_the_cache_without_the_hub(tmp_path, monkeypatch, tiny_model):
    path = tmp_path / "cached.pth"
    torch.save(tiny_model.state_dict(), path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("mame_core.hub.cached_hub_file", lambda model: str(path))
    loaded = load_model("vit_tiny_patch16_224", "hub", TINY)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.slow  # compiling takes a minute on a shared CPU
def test_compile_rows_run_beside_their_eager_twins():
    from conftest import tiny_vit

    from mame_core.bench import format_compiled

    model = tiny_vit(depth=2)
    x = make_batch(sample_images(), model, 2)
    variants = make_variants([0.5], [], mame_blocks=None)
    rows = run_bench(model, x, variants, rounds=2, iters=1, warmup=0, progress=False, compile=True)
    eager, compiled = rows[:2], rows[2:]
    assert [r.compiled for r in rows] == [False, False, True, True]
    for e, c in zip(eager, compiled):  # the same forward, compiled: the same tokens
        assert (c.method, c.setting, c.mean_final_tokens, c.max_final_tokens) == (
            e.method, e.setting, e.mean_final_tokens, e.max_final_tokens)
        assert len(c.img_per_s_rounds) == len(e.img_per_s_rounds) == 2
    text = format_compiled(rows)
    assert "compiled / eager" in text and "tau=0.5" in text
