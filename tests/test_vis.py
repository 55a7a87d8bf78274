"""mame-vis: source map -> patch groups, the drawing, and the command writing a PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mame_core.images import SAMPLES_DIR, load_model, load_rgb
from mame_core.vis import draw_groups, main, parse_blocks, source_map_to_groups, visualise

TINY = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}
pytestmark = pytest.mark.filterwarnings("ignore:.*random weights")


def hand_built_source() -> torch.Tensor:
    """6 patches, 5 token rows: row 0 a class token (all zero), row 4 padding (all zero).
    Token 1 holds patches 0 and 2, token 2 holds patch 1 and 30 % of patch 3, token 3 holds 70 % of
    patch 3 and patch 4, and patch 5 is in no token (an orphan)."""
    return torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, 0.0, 1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.3, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.7, 1.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )


def test_groups_from_hand_built_source_map():
    groups = source_map_to_groups(hand_built_source())
    assert groups.dtype == torch.long
    assert groups.tolist() == [0, 1, 0, 2, 2, 3]


def test_groups_do_not_depend_on_token_order():
    source = hand_built_source()
    shuffled = source[torch.tensor([3, 0, 4, 2, 1])]
    assert source_map_to_groups(shuffled).tolist() == source_map_to_groups(source).tolist()


def test_identity_source_map_gives_one_group_per_patch():
    assert source_map_to_groups(torch.eye(5)).tolist() == [0, 1, 2, 3, 4]


def test_source_map_shape_is_checked():
    with pytest.raises(ValueError, match="tokens, num_patches"):
        source_map_to_groups(torch.zeros(1, 4, 6))


def test_draw_tints_merged_groups_only_and_draws_edges():
    image = np.full((8, 8, 3), 100, dtype=np.uint8)  # 2x2 grid of 4x4-pixel patches
    groups = torch.tensor([0, 0, 1, 2])  # top row merged; bottom two patches alone
    out = draw_groups(image, groups, (2, 2))
    assert out.shape == image.shape and out.dtype == np.uint8
    # Merged top row: tinted, the same colour across both patches (away from edges).
    assert not np.array_equal(out[1, 1], image[1, 1])
    assert np.array_equal(out[1, 1], out[1, 6])
    # The single patches keep their pixels (away from edges).
    assert np.array_equal(out[5, 1], image[5, 1])
    assert np.array_equal(out[5, 5], image[5, 5])
    # Edge between the merged row and the bottom row, and between the two bottom patches...
    assert np.array_equal(out[3, 1], [255, 255, 255])
    assert np.array_equal(out[6, 3], [255, 255, 255])
    # ...but none inside the merged group.
    assert not np.array_equal(out[1, 3], [255, 255, 255])


def test_draw_checks_grid():
    with pytest.raises(ValueError, match="do not fit"):
        draw_groups(np.zeros((8, 8, 3), np.uint8), torch.zeros(3, dtype=torch.long), (2, 2))
    with pytest.raises(ValueError, match="does not split"):
        draw_groups(np.zeros((9, 8, 3), np.uint8), torch.zeros(4, dtype=torch.long), (2, 2))


def test_parse_blocks():
    assert parse_blocks("2,4", 4) == [2, 4]
    with pytest.raises(ValueError, match="outside 1..4"):
        parse_blocks("0,5", 4)
    with pytest.raises(ValueError, match="integers"):
        parse_blocks("a", 4)


def test_visualise_tiny_vit_group_counts():
    torch.manual_seed(0)
    model = load_model("vit_tiny_patch16_224", "random", TINY)
    num_patches = model.patch_embed.num_patches
    panels, titles = visualise(load_rgb(SAMPLES_DIR / "chelsea.jpg"), model, tau=1.0, blocks_shown=[1, 4])
    assert len(panels) == 3 and all(p.shape == (64, 64, 3) for p in panels)
    # tau = 1 merges nothing: every patch is its own group, so nothing is tinted and only the patch
    # grid lines (the last pixel row and column of each 8x8 patch) differ from the input.
    interior = (np.arange(64) % 8) != 7
    for panel in panels[1:]:
        assert np.array_equal(panel[interior][:, interior], panels[0][interior][:, interior])
        assert np.all(panel[7, :, :] == 255)
    assert titles[2] == f"after block 4: {num_patches + 1} tokens"


def test_command_writes_png(tmp_path):
    out = tmp_path / "sub" / "merged.png"
    rc = main(
        [str(SAMPLES_DIR / "coffee.jpg"), "--tau", "0.8", "--out", str(out), "--arch", "vit_tiny_patch16_224",
         "--blocks-shown", "1,2,4", "--model-kwargs", json.dumps(TINY)]
    )
    assert rc == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > img.height > 100


def test_command_rejects_bad_input(tmp_path, capsys):
    not_image = tmp_path / "x.jpg"
    not_image.write_text("not an image")
    args = [
        "--out",
        str(tmp_path / "o.png"),
        "--arch",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        json.dumps(TINY),
    ]
    assert main([str(not_image), "--blocks-shown", "1", *args]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert main([str(SAMPLES_DIR / "coffee.jpg"), "--blocks-shown", "9", *args]) == 2
    assert "outside 1..4" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
    # matplotlib would write figure.png for "figure", a JPEG for .jpg, and fail after the run for .txt.
    for out in (tmp_path / "figure", tmp_path / "figure.jpg", tmp_path / "figure.txt", tmp_path):
        rc = main([str(SAMPLES_DIR / "coffee.jpg"), "--blocks-shown", "1", "--out", str(out),
                   "--arch", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY)])
        assert rc == 2
        assert "give the path of a .png file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jpg"]


def test_command_refuses_merge_blocks_past_the_depth(tmp_path, capsys):
    rc = main(
        [
            str(SAMPLES_DIR / "coffee.jpg"),
            "--out",
            str(tmp_path / "o.png"),
            "--arch",
            "vit_tiny_patch16_224",
            "--model-kwargs",
            json.dumps(TINY),
            "--blocks-shown",
            "1",
            "--merge-blocks",
            "9",
        ]
    )
    assert rc == 2
    assert "--merge-blocks 9 outside 1..4" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
