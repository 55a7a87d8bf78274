"""mame-bench: throughput of one timm ViT unmerged, with MaMe at several tau and with ToMe at several r.

All settings run in one process on one model copy, interleaved: every round times each setting once
(in a rotated order), and the table reports the median over rounds, so that a noisy or drifting
machine (thermal state, other jobs) hurts every setting alike. The reference row is timm's own forward
of the unpatched model; "none" is the patched model merging nothing, so the two show the patch's cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mame_core import MergeSettings, compile_merging_vit, patch_vit
from mame_core.images import (
    check_merge_blocks,
    list_images,
    load_model,
    make_batch,
    parse_model_kwargs,
    sample_images,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Variant:
    method: str  # timm (the unpatched model's own forward) | none | mame | tome
    setting: str  # as printed: "-", "tau=0.9", "r=13"
    settings: MergeSettings | None  # None: the unpatched timm model


@dataclass
class BenchRow:
    method: str
    setting: str
    mean_final_tokens: float
    max_final_tokens: int  # the longest image sets a padded batch's cost
    gflops: float  # mean estimated GFLOPs per image
    img_per_s: float  # median over rounds
    ratio: float  # img_per_s / the reference row's img_per_s
    best_img_per_s: float  # fastest round: on a shared machine, the round least disturbed by others
    best_ratio: float
    img_per_cpu_s: float  # median over rounds of images per second of this process's CPU time
    cpu_ratio: float
    img_per_s_rounds: list[float]


def parse_list(text: str, kind: type, name: str) -> list:
    """'1.0,0.9' -> [1.0, 0.9]; an empty string gives an empty list (skip that method)."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"{name} must be a comma-separated list of {kind.__name__}s, got {text!r}") from err


def make_variants(
    taus: list[float], tome_r: list[int], mame_blocks: int | None, unpatched: bool = False
) -> list[Variant]:
    """The rows of a run: [the unpatched timm model], the patched model merging nothing, MaMe, ToMe."""
    variants = [Variant("timm", "unpatched", None)] if unpatched else []
    variants.append(Variant("none", "-", MergeSettings(method="none")))
    variants += [
        Variant("mame", f"tau={t:g}", MergeSettings(method="mame", tau=t, blocks=mame_blocks)) for t in taus
    ]
    variants += [Variant("tome", f"r={r}", MergeSettings(method="tome", r=r)) for r in tome_r]
    return variants


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(
    model: torch.nn.Module,
    x: torch.Tensor,
    variants: list[Variant],
    rounds: int = 5,
    iters: int = 3,
    warmup: int = 1,
    progress: bool = True,
    compile: bool = False,
) -> list[BenchRow]:
    """Time every variant on the batch `x`, interleaved over `rounds`. `model` is the timm model; the
    patched variants run through `patch_vit(model)`, which shares its weights. The first variant is
    the reference of the ratio column (make_variants puts the unpatched or unmerged model first)."""
    if rounds < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1, iters >= 1, warmup >= 0; got {rounds}, {iters}, {warmup}")
    vit = patch_vit(model)
    timm_forward = model
    if compile:  # both sides compiled (the first, untimed pass of each row compiles it)
        vit, timm_forward = compile_merging_vit(vit), torch.compile(model)

    def forward(v: Variant) -> object:
        return timm_forward(x) if v.settings is None else vit(x, v.settings)

    device, batch = x.device, x.shape[0]
    tokens, longest, gflops = [], [], []
    with torch.inference_mode():
        for v in variants:  # one untimed pass each: token counts, and the first-call costs
            # The unpatched model reports nothing: its figures are those of the patched one merging nothing.
            res = vit(x, v.settings or MergeSettings(method="none"))
            tokens.append(res.tokens[:, -1].double().mean().item())
            longest.append(int(res.tokens[:, -1].max()))
            gflops.append(res.gflops.double().mean().item())
            for _ in range(warmup):
                forward(v)
        _sync(device)

        speeds: list[list[float]] = [[] for _ in variants]
        # CPU time of this process: on a CPU shared with other jobs, time spent waiting for a core
        # is not counted, so this is steadier than wall time (on a GPU it is host time only).
        cpu_speeds: list[list[float]] = [[] for _ in variants]
        bar = tqdm(total=rounds * len(variants), desc="bench", unit="run", disable=not progress, leave=False)
        for rnd in range(rounds):
            # Rotate the order each round so that no setting always runs first (or last) in a round.
            order = [(rnd + k) % len(variants) for k in range(len(variants))]
            for i in order:
                _sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                for _ in range(iters):
                    forward(variants[i])
                _sync(device)
                speeds[i].append(iters * batch / (time.perf_counter() - start))
                cpu_speeds[i].append(iters * batch / max(time.process_time() - cpu_start, 1e-9))
                bar.update(1)
        bar.close()

    medians = [statistics.median(s) for s in speeds]
    bests = [max(s) for s in speeds]
    cpu = [statistics.median(s) for s in cpu_speeds]
    return [
        BenchRow(
            v.method, v.setting, tokens[i], longest[i], gflops[i], medians[i], medians[i] / medians[0],
            bests[i], bests[i] / bests[0], cpu[i], cpu[i] / cpu[0], speeds[i],
        )
        for i, v in enumerate(variants)
    ]


def format_table(rows: list[BenchRow], cpu_columns: bool = False) -> str:
    """The table; `cpu_columns` adds images per CPU-second (for runs on the CPU)."""
    head = f"{'method':<7}{'setting':>10}{'final tokens':>14}{'max':>5}{'GFLOPs':>9}"
    head += f"{'img/s':>10}{'ratio':>8}{'best img/s':>12}{'ratio':>8}"
    head += f"{'img/CPU-s':>11}{'ratio':>8}" if cpu_columns else ""
    lines = [head]
    for r in rows:
        line = f"{r.method:<7}{r.setting:>10}{r.mean_final_tokens:>14.1f}{r.max_final_tokens:>5}{r.gflops:>9.2f}"
        line += f"{r.img_per_s:>10.2f}{r.ratio:>7.3f}x{r.best_img_per_s:>12.2f}{r.best_ratio:>7.3f}x"
        line += f"{r.img_per_cpu_s:>11.2f}{r.cpu_ratio:>7.3f}x" if cpu_columns else ""
        lines.append(line)
    return "\n".join(lines)


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:  # torch's word for a device string it does not know
        raise ValueError(f"--device {device!r}: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if dtype == "auto":
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return dev, DTYPES[dtype]


def batch_pictures(batch_size: int, pictures: int) -> str:
    """What a batch is made of, for the header: fill_batch takes the first pictures, then augmented copies."""
    if batch_size < pictures:
        return f"{batch_size} of the {pictures} pictures"
    return f"{pictures} pictures" + (" and augmented copies" if batch_size > pictures else "")


def check_report_target(target: str | None) -> None:
    """--json PATH must be writable before the run, not found unwritable after it: its folder is made if missing."""
    if target in (None, "-"):
        return
    path = Path(target)
    if path.is_dir():
        raise ValueError(f"--json {target}: is a directory, expected a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--json {target}: cannot create its folder: {err.strerror}") from err
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--json {target}: not writable")


def write_report(report: dict, target: str | None) -> None:
    """--json: the report as JSON on stdout ("-") or in a file (checked by check_report_target first)."""
    if target == "-":
        print(json.dumps(report, indent=2))
    elif target:
        Path(target).write_text(json.dumps(report, indent=2) + "\n")


def add_report_args(p: argparse.ArgumentParser) -> None:
    """--json and --no-progress, shared by mame-bench and mame-eval."""
    p.add_argument(
        "--json", nargs="?", const="-", default=None, metavar="PATH",
        help="write the results as JSON to PATH (alone: print JSON instead of the table)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mame-bench",
        description="Throughput of a timm ViT: unmerged vs MaMe (several tau) vs ToMe (several r).",
    )
    p.add_argument("--arch", default="vit_base_patch16_224", help="timm architecture")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (float16 on GPU, float32 on CPU), float32, ...")
    p.add_argument("--taus", default="1.0,0.9,0.8,0.7", help="MaMe thresholds, comma-separated")
    p.add_argument(
        "--mame-blocks", type=int, default=None,
        help="MaMe merges in the first N blocks (default 8, or all blocks of a shallower model)",
    )
    p.add_argument("--tome-r", default="8,13,16", help="ToMe tokens removed per block, comma-separated")
    p.add_argument("--images", type=Path, default=None, help="folder of pictures (default: bundled samples)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--iters", type=int, default=3, help="forward passes per setting per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per setting before timing")
    p.add_argument("--weights", default="random", help="random (default), hub, or a checkpoint file")
    p.add_argument("--model-kwargs", default=None, help="JSON overrides for timm.create_model")
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: torch's choice); 1 is steadier on a CPU shared with other jobs",
    )
    p.add_argument("--compile", action="store_true",
                   help="run timm and the patched model under torch.compile")
    add_report_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        if args.rounds < 1 or args.iters < 1 or args.warmup < 0:
            raise ValueError(f"need --rounds >= 1, --iters >= 1, --warmup >= 0; got {args.rounds}, {args.iters}, "
                             f"{args.warmup}")
        check_report_target(args.json)
        device, dtype = resolve_device_dtype(args.device, args.dtype)
        taus, tome_r = parse_list(args.taus, float, "--taus"), parse_list(args.tome_r, int, "--tome-r")
        paths = sample_images() if args.images is None else list_images(args.images)
        variants = make_variants(taus, tome_r, args.mame_blocks, unpatched=True)  # bad settings: before a download
        model = load_model(args.arch, args.weights, parse_model_kwargs(args.model_kwargs))
        check_merge_blocks("--mame-blocks", args.mame_blocks, model)
        x = make_batch(paths, model, args.batch_size)  # decodes every picture: a bad file is bad input
    except ValueError as err:
        print(f"mame-bench: error: {err}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    x = x.to(device, dtype)
    rows = run_bench(model.to(device, dtype), x, variants, args.rounds, args.iters, args.warmup,
                     progress=not args.no_progress, compile=args.compile)

    used = min(args.batch_size, len(paths))  # fill_batch takes the first pictures, then augmented copies
    report = {
        "arch": args.arch,
        "weights": "random-init" if args.weights == "random" else args.weights,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": args.batch_size,
        "images": "bundled samples" if args.images is None else str(args.images),
        "num_images": used,  # distinct pictures in the batch (later copies are augmented)
        "images_in_folder": len(paths),
        "rounds": args.rounds,
        "iters": args.iters,
        "torch_threads": torch.get_num_threads(),
        "compile": args.compile,
        "rows": [asdict(r) for r in rows],
    }
    if args.json != "-":
        print(
            f"{args.arch} ({report['weights']}), {report['device_name']}, {report['dtype']}, "
            f"batch {args.batch_size} ({batch_pictures(args.batch_size, len(paths))}), median of {args.rounds} rounds x {args.iters} iters"
        )
        print(format_table(rows, cpu_columns=device.type == "cpu"))
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
