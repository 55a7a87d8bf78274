"""mame-vis: draw which patches MaMe merged together (the MaMe paper's Figures 6 and 7).

For each chosen block the picture shows the model's input image with every group of merged patches
in one colour; patches that are still alone keep their own colours, and group edges are drawn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mame_core import MergeSettings, patch_vit
from mame_core.images import (
    check_merge_blocks,
    data_config,
    load_model,
    load_rgb,
    model_transform,
    parse_model_kwargs,
)

TINT_ALPHA = 0.6  # how much a group's colour covers the picture
EDGE_COLOUR = np.array([255, 255, 255], dtype=np.float32)


def source_map_to_groups(source: torch.Tensor) -> torch.Tensor:
    """Partition of the patches from one image's soft source map.

    `source` is [tokens, num_patches]: row t says how much of each original patch token t stands
    for (rows of special tokens and padding are all 0). Each patch goes to the token holding most of
    it. Returns a LongTensor[num_patches] of group labels 0, 1, ... numbered in order of each group's
    first patch, so the labels do not depend on token order. A patch whose column is all zero (no
    token holds it) gets a group of its own.
    """
    if source.dim() != 2:
        raise ValueError(f"source map must be [tokens, num_patches], got shape {tuple(source.shape)}")
    owner = source.float().argmax(dim=0)
    orphan = source.abs().sum(dim=0) == 0
    # Orphans get owner ids past every real token, one each.
    owner = torch.where(orphan, source.shape[0] + torch.arange(source.shape[1]), owner)
    _, first_seen = np.unique(owner.numpy(), return_index=True)
    relabel = {int(owner[i]): rank for rank, i in enumerate(sorted(first_seen))}
    return torch.tensor([relabel[int(o)] for o in owner], dtype=torch.long)


def group_colours(num_groups: int, seed: int = 0) -> np.ndarray:
    """[num_groups, 3] distinct-looking bright colours (random hues, fixed by `seed`)."""
    rng = np.random.default_rng(seed)
    hues = rng.permutation(num_groups) / max(num_groups, 1)
    sat, val = 0.85, 0.95
    # HSV -> RGB for full-saturation hues, vectorised.
    k = (np.array([5.0, 3.0, 1.0])[None, :] + hues[:, None] * 6) % 6
    rgb = val - val * sat * np.clip(np.minimum(k, 4 - k), 0, 1)
    return (rgb * 255).astype(np.float32)


def draw_groups(image: np.ndarray, groups: torch.Tensor, grid: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Paint `groups` (LongTensor[gh*gw], row-major patch order) over `image` (uint8 [H, W, 3]).

    Groups of two or more patches get one colour each; a patch alone keeps its pixels. A line is
    drawn wherever two neighbouring patches belong to different groups.
    """
    gh, gw = grid
    if groups.numel() != gh * gw:
        raise ValueError(f"{groups.numel()} group labels do not fit a {gh}x{gw} patch grid")
    h, w = image.shape[:2]
    if h % gh or w % gw:
        raise ValueError(f"image of {h}x{w} pixels does not split into a {gh}x{gw} patch grid")
    ph, pw = h // gh, w // gw
    labels = groups.view(gh, gw).numpy()
    sizes = np.bincount(labels.ravel())
    colours = group_colours(len(sizes), seed)

    pixel_labels = np.kron(labels, np.ones((ph, pw), dtype=labels.dtype))
    merged = (sizes[pixel_labels] > 1)[..., None]
    out = image.astype(np.float32)
    out = np.where(merged, (1 - TINT_ALPHA) * out + TINT_ALPHA * colours[pixel_labels], out)

    # Edges: the last pixel row/column of a patch whose neighbour below/right is in another group.
    for r in range(gh):
        for c in range(gw):
            if r + 1 < gh and labels[r, c] != labels[r + 1, c]:
                out[(r + 1) * ph - 1, c * pw : (c + 1) * pw] = EDGE_COLOUR
            if c + 1 < gw and labels[r, c] != labels[r, c + 1]:
                out[r * ph : (r + 1) * ph, (c + 1) * pw - 1] = EDGE_COLOUR
    return out.round().clip(0, 255).astype(np.uint8)


def model_view(img: Image.Image, model: torch.nn.Module) -> tuple[torch.Tensor, np.ndarray]:
    """The model input [1, 3, H, W] and the same pixels as uint8 [H, W, 3], undoing the normalisation."""
    x = model_transform(model)(img).unsqueeze(0)
    cfg = data_config(model)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    pixels = ((x[0] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return x, pixels


def parse_blocks(text: str, depth: int) -> list[int]:
    """'2,4,6,8' -> [2, 4, 6, 8]: 1-based block numbers (8 = after the 8th block), each in 1..depth."""
    try:
        blocks = [int(b) for b in text.split(",") if b.strip()]
    except ValueError as err:
        raise ValueError(f"--blocks-shown must be comma-separated integers, got {text!r}") from err
    if not blocks:
        raise ValueError("--blocks-shown is empty")
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise ValueError(f"--blocks-shown {bad} outside 1..{depth} (the model has {depth} blocks)")
    return blocks


def save_figure(panels: list[np.ndarray], titles: list[str], out: Path, suptitle: str) -> None:
    """Panels side by side with titles, written as PNG with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), squeeze=False)
    for ax, panel, title in zip(axes[0], panels, titles):
        ax.imshow(panel, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, format="png")
    plt.close(fig)


def visualise(
    img: Image.Image,
    model: torch.nn.Module,
    tau: float,
    blocks_shown: list[int],
    merge_blocks: int | None = None,  # None: the first 8 blocks (all of a shallower model)
) -> tuple[list[np.ndarray], list[str]]:
    """Panels (input picture, then one per chosen block) and their titles."""
    vit = patch_vit(model)
    x, pixels = model_view(img, model)
    settings = MergeSettings(method="mame", tau=tau, blocks=merge_blocks)
    with torch.inference_mode():
        result = vit(x, settings, return_source=True)
    grid = tuple(model.patch_embed.grid_size)
    panels, titles = [pixels], [f"input ({result.input_tokens} tokens)"]
    for block in blocks_shown:
        groups = source_map_to_groups(result.sources[block - 1][0].float().cpu())
        panels.append(draw_groups(pixels, groups, grid))
        titles.append(f"after block {block}: {int(result.tokens[0, block - 1])} tokens")
    return panels, titles


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mame-vis", description="Draw which patches MaMe merges together after chosen blocks."
    )
    p.add_argument("image", type=Path, help="picture to run through the model")
    p.add_argument("--tau", type=float, default=0.8, help="MaMe similarity threshold (default 0.8)")
    p.add_argument("--out", type=Path, default=Path("merged.png"), help="PNG to write (default merged.png)")
    p.add_argument("--arch", default="vit_base_patch16_224", help="timm architecture")
    p.add_argument("--blocks-shown", default="2,4,6,8", help="1-based blocks to draw (default 2,4,6,8)")
    p.add_argument(
        "--merge-blocks", type=int, default=None,
        help="MaMe merges in the first N blocks (default 8, or all blocks of a shallower model)",
    )
    p.add_argument("--weights", default="random", help="random (default), hub, or a checkpoint file")
    p.add_argument("--model-kwargs", default=None, help="JSON overrides for timm.create_model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # matplotlib picks the format by suffix and adds .png to a bare name: ask for the name that gets
        # written.
        if args.out.is_dir() or args.out.suffix.lower() != ".png":
            raise ValueError(f"--out {args.out}: give the path of a .png file to write")
        img = load_rgb(args.image)
        model = load_model(args.arch, args.weights, parse_model_kwargs(args.model_kwargs))
        blocks = parse_blocks(args.blocks_shown, len(model.blocks))
        check_merge_blocks("--merge-blocks", args.merge_blocks, model)
        panels, titles = visualise(img, model, args.tau, blocks, args.merge_blocks)
    except ValueError as err:
        print(f"mame-vis: error: {err}", file=sys.stderr)
        return 2
    weights = "random weights" if args.weights == "random" else args.weights
    try:
        save_figure(panels, titles, args.out, f"{args.arch} ({weights}), MaMe tau={args.tau}")
    except OSError as err:
        print(f"mame-vis: error: cannot write {args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
