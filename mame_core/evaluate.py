"""mame-eval: top-1 accuracy, and top-1 agreement with the unmerged model, of MaMe and ToMe settings
on an ImageFolder directory (one sub-folder per class).

Class folders named by ImageNet wnids (n01440764, ...) are mapped to ImageNet-1k class indices;
any other names are taken as the model's classes 0, 1, ... in sorted folder order.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from timm.data import ImageNetInfo
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from tqdm import tqdm

from mame_core import MergeSettings, patch_vit
from mame_core.bench import (
    Variant,
    add_report_args,
    check_report_target,
    make_variants,
    parse_list,
    resolve_device_dtype,
    write_report,
)
from mame_core.images import (
    check_image,
    check_merge_blocks,
    load_model,
    load_rgb,
    model_transform,
    parse_model_kwargs,
)

WNID = re.compile(r"^n\d{8}$")


@dataclass
class EvalRow:
    method: str
    setting: str
    images: int
    top1: float  # accuracy against the folder labels
    agreement: float  # share of images whose top-1 equals the unmerged model's
    mean_final_tokens: float
    gflops: float


def class_indices(classes: list[str], num_classes: int) -> list[int]:
    """Model class index of each folder class (in ImageFolder's sorted order)."""
    if classes and all(WNID.match(c) for c in classes):
        info = ImageNetInfo()
        if num_classes != info.num_classes():
            raise ValueError(
                f"class folders are ImageNet wnids but the model has {num_classes} classes, "
                f"not {info.num_classes()}"
            )
        wnids = info.label_names()
        index = {w: i for i, w in enumerate(wnids)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise ValueError(f"class folders {unknown[:5]} look like wnids but are not ImageNet-1k classes")
        return [index[c] for c in classes]
    if len(classes) > num_classes:
        raise ValueError(f"{len(classes)} class folders but the model has only {num_classes} classes")
    return list(range(len(classes)))


def image_file(path: str) -> bool:
    """ImageFolder's file filter (its image extensions) that also refuses a picture file which is not an
    image: at the start, as bad input, instead of a traceback from a loader process mid-run."""
    if not has_file_allowed_extension(path, IMG_EXTENSIONS):
        return False
    check_image(path)
    return True


def evaluate(
    vit: torch.nn.Module,
    loader: DataLoader,
    variants: list[Variant],
    targets_map: list[int],
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> list[EvalRow]:
    """Run every variant on every batch; the unmerged model is always run as the agreement reference."""
    reference = MergeSettings(method="none")
    mapping = torch.tensor(targets_map, dtype=torch.long)
    n = 0
    correct = [0] * len(variants)
    agree = [0] * len(variants)
    tokens = [0.0] * len(variants)
    gflops = [0.0] * len(variants)
    with torch.inference_mode():
        for images, folder_labels in tqdm(loader, desc="eval", unit="batch", disable=not progress):
            x = images.to(device, dtype)
            labels = mapping[folder_labels]
            ref_top1 = vit(x, reference).logits.argmax(dim=-1).cpu()
            for i, v in enumerate(variants):
                res = vit(x, v.settings)
                top1 = res.logits.argmax(dim=-1).cpu()
                correct[i] += int((top1 == labels).sum())
                agree[i] += int((top1 == ref_top1).sum())
                tokens[i] += float(res.tokens[:, -1].double().sum())
                gflops[i] += float(res.gflops.double().sum())
            n += len(labels)
    if n == 0:
        raise ValueError("the image folder holds no images")
    return [
        EvalRow(v.method, v.setting, n, correct[i] / n, agree[i] / n, tokens[i] / n, gflops[i] / n)
        for i, v in enumerate(variants)
    ]


def format_table(rows: list[EvalRow]) -> str:
    header = (f"{'method':<7}{'setting':>9}{'images':>8}{'top-1':>8}{'agree':>8}{'final tokens':>14}"
              f"{'GFLOPs':>9}")
    lines = [header]
    for r in rows:
        lines.append(
            f"{r.method:<7}{r.setting:>9}{r.images:>8}{100 * r.top1:>7.2f}%{100 * r.agreement:>7.2f}%"
            f"{r.mean_final_tokens:>14.1f}{r.gflops:>9.2f}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mame-eval",
        description="Top-1 accuracy and agreement with the unmerged model on an ImageFolder directory.",
    )
    p.add_argument("folder", type=Path, help="ImageFolder root: one sub-folder of pictures per class")
    p.add_argument("--arch", default="vit_base_patch16_224", help="timm architecture")
    p.add_argument("--weights", default="hub", help="hub (default), a checkpoint file, or random")
    p.add_argument("--taus", default="1.0,0.9,0.8", help="MaMe thresholds, comma-separated")
    p.add_argument(
        "--mame-blocks", type=int, default=None,
        help="MaMe merges in the first N blocks (default 8, or all blocks of a shallower model)",
    )
    p.add_argument("--tome-r", default="", help="ToMe tokens removed per block, comma-separated (e.g. 13)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="image decoding processes (0: in this process)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--model-kwargs", default=None, help="JSON overrides for timm.create_model")
    add_report_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1 or args.workers < 0:
            raise ValueError("--batch-size must be >= 1 and --workers >= 0")
        check_report_target(args.json)
        device, dtype = resolve_device_dtype(args.device, args.dtype)
        taus, tome_r = parse_list(args.taus, float, "--taus"), parse_list(args.tome_r, int, "--tome-r")
        variants = make_variants(taus, tome_r, args.mame_blocks)  # bad settings: before a download
        model = load_model(args.arch, args.weights, parse_model_kwargs(args.model_kwargs))
        check_merge_blocks("--mame-blocks", args.mame_blocks, model)
        try:
            # load_rgb: EXIF orientation as in mame-bench and mame-vis, and a ValueError naming a file that
            # turns out undecodable mid-run (the start only reads headers).
            dataset = ImageFolder(str(args.folder), transform=model_transform(model), loader=load_rgb,
                                  is_valid_file=image_file)
        except (FileNotFoundError, NotADirectoryError) as err:
            raise ValueError(f"{args.folder}: not an ImageFolder directory ({err})") from err
        targets_map = class_indices(dataset.classes, model.num_classes)
    except ValueError as err:
        print(f"mame-eval: error: {err}", file=sys.stderr)
        return 2
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    vit = patch_vit(model.to(device, dtype))
    try:
        rows = evaluate(vit, loader, variants, targets_map, device, dtype, progress=not args.no_progress)
    except ValueError as err:
        # From a loader process it comes with the worker's traceback: its last line says it.
        said = str(err).strip().splitlines()[-1].removeprefix("ValueError: ")
        print(f"mame-eval: error: {said}", file=sys.stderr)
        return 2

    report = {
        "arch": args.arch,
        "weights": "random-init" if args.weights == "random" else args.weights,
        "folder": str(args.folder),
        "classes": len(dataset.classes),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "rows": [asdict(r) for r in rows],
    }
    if args.json != "-":
        print(f"{args.arch} ({report['weights']}) on {args.folder}: {len(dataset)} images, "
              f"{report['classes']} classes")
        print(format_table(rows))
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
