"""mame-bench: throughput of one timm ViT unmerged, with MaMe at several tau and with ToMe at several r.

All settings run in one process on one model copy, interleaved: every round times each setting once
(in a rotated order), and the table reports the median over rounds, so that a noisy or drifting
machine (thermal state, other jobs) hurts every setting alike. The reference row is timm's own forward
of the unpatched model; "none" is the patched model merging nothing, so the two show the patch's cost.
`efficiency` is a row's speedup over timm divided by its GFLOPs reduction (timm's GFLOPs / the row's):
1.0 when time falls as fast as the estimated work, below 1 when overheads eat the saving. One run may
cover several batch sizes (one table each).

The mixed case asks whether one image that does not merge drags its batch to its length. The sample
batch runs with one image held unmerged (per-image tau 1: the image that merges most at the mixed tau, so
that holding it makes the biggest difference) while the others merge at the mixed tau; it is timed in
the same rounds against its parts alone: the other images as a batch of their own at that tau, and the
held image alone, unmerged. `mixed / sum of parts` near 1 means a batch costs the sum of its images'
tokens; well above 1, the held image pads the others' attention to its length. `mixed / unmerged` is
the mixed batch against the whole batch unmerged (1: merging the others saved nothing).

--profile adds, per row, the aten operator counts of one forward (top-level and all, torch.profiler)
and the top operators by self time (device time on a GPU), measured after the timed rounds.

--compile runs every row a second time under torch.compile, in the same rounds as its eager twin, and
prints each row's compiled / eager ratio (the median of the per-round ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
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
from mame_core.profiling import OpProfile, profile_forward

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Variant:
    method: str  # timm (the unpatched model's own forward) | none | mame | tome | mixed
    setting: str  # as printed: "-", "tau=0.9", "r=13"
    settings: MergeSettings | None  # None: the unpatched timm model
    images: tuple[int, ...] | None = None  # which images of the batch it runs (None: all)
    tau: tuple[float, ...] | None = None  # per-image MaMe thresholds (None: settings.tau)
    compiled: bool = False  # runs under torch.compile (--compile)


@dataclass
class BenchRow:
    method: str
    setting: str
    images: int  # images per forward
    mean_final_tokens: float
    max_final_tokens: int  # the longest image sets a padded batch's cost
    gflops: float  # mean estimated GFLOPs per image
    img_per_s: float  # median over rounds
    ratio: float  # img_per_s / the reference row's img_per_s
    best_img_per_s: float  # fastest round: on a shared machine, the round least disturbed by others
    best_ratio: float
    img_per_cpu_s: float  # median over rounds of images per second of this process's CPU time
    cpu_ratio: float
    efficiency: float  # ratio / (reference GFLOPs / this row's GFLOPs)
    img_per_s_rounds: list[float]
    profile: OpProfile | None = None  # --profile
    compiled: bool = False  # --compile: this row's forward runs under torch.compile


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


def mixed_variants(
    model: torch.nn.Module, x: torch.Tensor, tau: float, mame_blocks: int | None
) -> list[Variant]:
    """The mixed case at `tau` (see the module docstring): the batch with one image held unmerged, the
    other images alone, and the held image alone. Holds the image that keeps the fewest tokens at `tau`
    (the first of those on a tie). Needs at least two images."""
    batch = x.shape[0]
    if batch < 2:
        raise ValueError("the mixed case needs a batch of at least 2 images")
    settings = MergeSettings(method="mame", tau=tau, blocks=mame_blocks)
    with torch.inference_mode():
        finals = patch_vit(model)(x, settings).tokens[:, -1]
    held = int(torch.argmin(finals))  # argmin returns the first minimum
    others = tuple(i for i in range(batch) if i != held)
    per_image = tuple(1.0 if i == held else tau for i in range(batch))
    return [
        Variant("mixed", f"tau={tau:g}, image {held} at 1", settings, None, per_image),
        Variant("mixed", f"{len(others)} others at tau={tau:g}", settings, others),
        # Alone, the held image takes the same path as in the batch (a per-image tau of 1).
        Variant("mixed", f"image {held} alone at 1", settings, (held,), (1.0,)),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _variant_forward(model: torch.nn.Module, vit: torch.nn.Module, x: torch.Tensor, v: Variant) -> Callable:
    """A zero-argument call that runs one forward of the variant on its images."""
    xs = x if v.images is None else x[list(v.images)]
    if v.settings is None:
        return lambda: model(xs)
    tau = torch.tensor(v.tau, dtype=torch.float64) if v.tau is not None else None
    return lambda: vit(xs, v.settings, tau=tau)


def run_bench(
    model: torch.nn.Module,
    x: torch.Tensor,
    variants: list[Variant],
    rounds: int = 5,
    iters: int = 3,
    warmup: int = 1,
    progress: bool = True,
    profile: bool = False,
    compile: bool = False,
) -> list[BenchRow]:
    """Time every variant on the batch `x` (or its images), interleaved over `rounds`. `model` is the timm
    model; the patched variants run through `patch_vit(model)`, which shares its weights. The first variant
    is the reference of the ratio and efficiency columns (make_variants puts the unpatched or unmerged
    model first). `profile`: after the timed rounds, one profiled forward per variant (OpProfile).
    `compile`: every row but the mixed case also runs under torch.compile, timed in the same rounds as its
    eager twin (rows with `compiled` set, after the eager ones)."""
    if rounds < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1, iters >= 1, warmup >= 0; got {rounds}, {iters}, {warmup}")
    vit = patch_vit(model)
    compiled_vit, compiled_model = vit, model
    if compile:  # the first, untimed pass of each compiled row compiles it
        compiled_vit, compiled_model = compile_merging_vit(vit), torch.compile(model)
        variants = variants + [replace(v, compiled=True) for v in variants if v.method != "mixed"]
    forwards = [_variant_forward(compiled_model, compiled_vit, x, v) if v.compiled
                else _variant_forward(model, vit, x, v) for v in variants]
    counts = [x.shape[0] if v.images is None else len(v.images) for v in variants]

    device = x.device
    tokens, longest, gflops = [], [], []
    with torch.inference_mode():
        for i, v in enumerate(variants):  # one untimed pass each: token counts, and the first-call costs
            # The unpatched model reports nothing: its figures are those of the patched one merging nothing.
            unmerged = replace(v, settings=MergeSettings(method="none"))
            res = (forwards[i] if v.settings is not None else _variant_forward(model, vit, x, unmerged))()
            tokens.append(res.tokens[:, -1].double().mean().item())
            longest.append(int(res.tokens[:, -1].max()))
            gflops.append(res.gflops.double().mean().item())
            for _ in range(warmup):
                forwards[i]()
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
                    forwards[i]()
                _sync(device)
                speeds[i].append(iters * counts[i] / (time.perf_counter() - start))
                cpu_speeds[i].append(iters * counts[i] / max(time.process_time() - cpu_start, 1e-9))
                bar.update(1)
        bar.close()
        profiles = [profile_forward(f, device) for f in forwards] if profile else [None] * len(variants)

    medians = [statistics.median(s) for s in speeds]
    bests = [max(s) for s in speeds]
    cpu = [statistics.median(s) for s in cpu_speeds]
    rows = []
    for i, v in enumerate(variants):
        ratio = medians[i] / medians[0]
        efficiency = ratio / (gflops[0] / gflops[i])
        rows.append(BenchRow(
            v.method, v.setting, counts[i], tokens[i], longest[i], gflops[i], medians[i], ratio,
            bests[i], bests[i] / bests[0], cpu[i], cpu[i] / cpu[0], efficiency, speeds[i], profiles[i],
            v.compiled,
        ))
    return rows


@dataclass
class MixedSummary:
    """The mixed case's reading, from the medians over rounds (as the table's ratio column)."""

    tau: float
    held_image: int  # index in the batch
    held_picture: str | None  # its file name, when it is one of the pictures (not an augmented copy)
    mixed_ms: float  # one forward of the mixed batch
    others_ms: float  # the other images alone, merging
    held_ms: float  # the held image alone, unmerged
    parts_ms: float  # others_ms + held_ms
    mixed_over_parts: float  # 1: the batch costs the sum of its parts
    unmerged_ms: float  # the whole batch unmerged (the "none" row)
    mixed_over_unmerged: float  # 1: merging the others saved nothing


def summarise_mixed(
    rows: list[BenchRow], tau: float, held: int, held_picture: str | None = None
) -> MixedSummary:
    """Read the three mixed rows (mixed, others, held; in run order) against the "none" row of `rows`."""
    mixed, others, alone = (r for r in rows if r.method == "mixed")
    unmerged = next(r for r in rows if r.method == "none")
    ms = {name: 1e3 * r.images / r.img_per_s for name, r in
          [("mixed", mixed), ("others", others), ("alone", alone), ("unmerged", unmerged)]}
    parts = ms["others"] + ms["alone"]
    return MixedSummary(tau, held, held_picture, ms["mixed"], ms["others"], ms["alone"], parts,
                        ms["mixed"] / parts, ms["unmerged"], ms["mixed"] / ms["unmerged"])


def format_table(rows: list[BenchRow], cpu_columns: bool = False) -> str:
    """The table; `cpu_columns` adds images per CPU-second (for runs on the CPU)."""
    head = f"{'method':<7}{'setting':>10}{'final tokens':>14}{'max':>5}{'GFLOPs':>9}"
    head += f"{'img/s':>10}{'ratio':>8}{'efficiency':>11}{'best img/s':>12}{'ratio':>8}"
    head += f"{'img/CPU-s':>11}{'ratio':>8}" if cpu_columns else ""
    lines = [head]
    for r in rows:
        line = (f"{r.method:<7}{r.setting:>10}{r.mean_final_tokens:>14.1f}{r.max_final_tokens:>5}"
                f"{r.gflops:>9.2f}")
        line += f"{r.img_per_s:>10.2f}{r.ratio:>7.3f}x{r.efficiency:>11.2f}"
        line += f"{r.best_img_per_s:>12.2f}{r.best_ratio:>7.3f}x"
        line += f"{r.img_per_cpu_s:>11.2f}{r.cpu_ratio:>7.3f}x" if cpu_columns else ""
        lines.append(line)
    return "\n".join(lines)


def format_mixed(rows: list[BenchRow], summary: MixedSummary) -> str:
    """The mixed case: its three rows, the sum of the parts, the unmerged batch, and the two ratios."""
    mixed, others, alone = (r for r in rows if r.method == "mixed")
    name = f" ({summary.held_picture})" if summary.held_picture else ""
    lines = [
        (f"mixed batch: image {summary.held_image}{name} held unmerged (per-image tau 1), "
         f"the other {others.images} merge at tau={summary.tau:g}"),
        (f"{'case':<28}{'images':>7}{'final tokens':>14}{'max':>5}{'GFLOPs':>9}{'ms/forward':>12}"
        f"{'img/s':>10}"),
    ]
    cases = [("mixed batch", mixed, summary.mixed_ms), ("others alone", others, summary.others_ms),
             ("held image alone, unmerged", alone, summary.held_ms)]
    for label, r, ms in cases:
        lines.append(f"{label:<28}{r.images:>7}{r.mean_final_tokens:>14.1f}{r.max_final_tokens:>5}"
                     f"{r.gflops:>9.2f}{ms:>12.1f}{r.img_per_s:>10.2f}")
    lines.append(f"{'sum of the two parts':<63}{summary.parts_ms:>12.1f}")
    lines.append(f"{'whole batch unmerged (none)':<63}{summary.unmerged_ms:>12.1f}")
    lines.append(f"mixed / sum of parts {summary.mixed_over_parts:.3f}x (1: the batch costs the sum of its "
                 "images; above: the held image pads the others to its length)")
    lines.append(f"mixed / unmerged batch {summary.mixed_over_unmerged:.3f}x "
                 "(1: merging the others saved nothing)")
    return "\n".join(lines)


def format_compiled(rows: list[BenchRow]) -> str:
    """--compile: each row compiled against the same row eager, timed in the same rounds (the median over
    rounds of the per-round ratio: steadier than a ratio of medians on a shared machine)."""
    eager = {(r.method, r.setting): r for r in rows if not r.compiled and r.method != "mixed"}
    lines = ["torch.compile: each row compiled against itself eager, in the same rounds",
             f"{'method':<7}{'setting':>10}{'eager img/s':>13}{'compiled':>10}{'compiled / eager':>18}"]
    for r in (r for r in rows if r.compiled):
        base = eager[(r.method, r.setting)]
        gain = statistics.median(c / e for c, e in zip(r.img_per_s_rounds, base.img_per_s_rounds))
        lines.append(f"{r.method:<7}{r.setting:>10}{base.img_per_s:>13.2f}{r.img_per_s:>10.2f}{gain:>17.3f}x")
    return "\n".join(lines)


def format_profile(rows: list[BenchRow], top: int = 4) -> str:
    """--profile: operator counts per forward against the first row's, and each row's top operators."""
    ref = rows[0].profile
    sorted_by = ref.sorted_by if ref else "self time"
    lines = [f"aten ops in one forward (torch.profiler); top ops by {sorted_by}",
             (f"{'method':<7}{'setting':>22}{'top-level':>11}{'x ref':>8}{'all aten':>10}{'x ref':>8}"
             "   top ops (ms, calls)")]
    for r in rows:
        p = r.profile
        on_device = p.sorted_by == "self device time"
        ops = ", ".join(
            f"{op.name.removeprefix('aten::')} {(op.self_device_ms if on_device else op.self_cpu_ms):.1f} "
            f"x{op.calls}" for op in p.top_ops[:top])
        lines.append(f"{r.method:<7}{r.setting:>22}{p.top_level_ops:>11}"
                     f"{p.top_level_ops / ref.top_level_ops:>7.2f}x{p.aten_ops:>10}"
                     f"{p.aten_ops / ref.aten_ops:>7.2f}x   {ops}")
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
    """--json PATH must be writable before the run, not found unwritable after it: its folder is made if
    missing."""
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
        description="Throughput of a timm ViT: unmerged vs MaMe (several tau) vs ToMe (several r), "
        "with each row's efficiency (speedup over timm / GFLOPs reduction), and the mixed case: the batch "
        "with one image held unmerged while the others merge, timed against those two parts alone (mixed / "
        "sum of parts near 1: the batch costs the sum of its images; above: the held image pads the others "
        "to its length).",
    )
    p.add_argument("--arch", default="vit_base_patch16_224", help="timm architecture")
    p.add_argument("--batch-size", default="8",
                   help="batch sizes, comma-separated: one table each (e.g. 64,256,1024)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (float16 on GPU, float32 on CPU), float32, ...")
    p.add_argument("--taus", default="1.0,0.9,0.8,0.7", help="MaMe thresholds, comma-separated")
    p.add_argument(
        "--mame-blocks", type=int, default=None,
        help="MaMe merges in the first N blocks (default 8, or all blocks of a shallower model)",
    )
    p.add_argument("--tome-r", default="8,13,16", help="ToMe tokens removed per block, comma-separated")
    p.add_argument(
        "--mixed-tau", default="auto",
        help="MaMe threshold of the mixed case's merging images: a number below 1, auto (the lowest of "
        "--taus below 1; none there: no mixed case) or off. The held image is the one that merges most at it",
    )
    p.add_argument("--profile", action="store_true",
                   help="after the timed rounds, count the aten ops of one forward per row and list the top "
                   "ops by self time (torch.profiler)")
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
                   help="also run every row under torch.compile, in the same rounds as eager, and print "
                   "each row's compiled / eager ratio")
    add_report_args(p)
    return p


def parse_mixed_tau(text: str, taus: list[float]) -> float | None:
    """--mixed-tau: a threshold below 1, 'auto' (the lowest of taus below 1, or None) or 'off' (None)."""
    if text == "off":
        return None
    if text == "auto":
        merging = [t for t in taus if t < 1]
        return min(merging) if merging else None
    try:
        tau = float(text)
    except ValueError:
        raise ValueError(f"--mixed-tau must be a number, auto or off, got {text!r}") from None
    if not -1 <= tau < 1:
        raise ValueError(f"--mixed-tau must be in [-1, 1) so that the other images merge, got {text}")
    return tau


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        batch_sizes = parse_list(args.batch_size, int, "--batch-size")
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"--batch-size must be one or more integers >= 1, got {args.batch_size!r}")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        if args.rounds < 1 or args.iters < 1 or args.warmup < 0:
            raise ValueError(f"need --rounds >= 1, --iters >= 1, --warmup >= 0; got {args.rounds}, "
                             f"{args.iters}, {args.warmup}")
        check_report_target(args.json)
        device, dtype = resolve_device_dtype(args.device, args.dtype)
        taus, tome_r = parse_list(args.taus, float, "--taus"), parse_list(args.tome_r, int, "--tome-r")
        mixed_tau = parse_mixed_tau(args.mixed_tau, taus)
        paths = sample_images() if args.images is None else list_images(args.images)
        # Bad settings fail here, before a download.
        variants = make_variants(taus, tome_r, args.mame_blocks, unpatched=True)
        if mixed_tau is not None:
            MergeSettings(method="mame", tau=mixed_tau, blocks=args.mame_blocks)
        model = load_model(args.arch, args.weights, parse_model_kwargs(args.model_kwargs))
        check_merge_blocks("--mame-blocks", args.mame_blocks, model)
        # Decodes every picture: a bad file is bad input.
        batches = [make_batch(paths, model, b) for b in batch_sizes]
    except ValueError as err:
        print(f"mame-bench: error: {err}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = model.to(device, dtype)

    report = {
        "arch": args.arch,
        "weights": "random-init" if args.weights == "random" else args.weights,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "batch_sizes": batch_sizes,
        "images": "bundled samples" if args.images is None else str(args.images),
        "images_in_folder": len(paths),
        "rounds": args.rounds,
        "iters": args.iters,
        "torch_threads": torch.get_num_threads(),
        "compile": args.compile,
        "runs": [],
    }
    text = args.json != "-"
    for batch_size, x in zip(batch_sizes, batches):
        x = x.to(device, dtype)
        mixed = mixed_tau is not None and batch_size >= 2
        run_variants = variants + (mixed_variants(model, x, mixed_tau, args.mame_blocks) if mixed else [])
        rows = run_bench(model, x, run_variants, args.rounds, args.iters, args.warmup,
                         progress=not args.no_progress, profile=args.profile,
                         compile=args.compile)
        table_rows = [r for r in rows if r.method != "mixed" and not r.compiled]
        run = {
            "batch_size": batch_size,
            "num_images": min(batch_size, len(paths)),  # distinct pictures (later copies are augmented)
            "rows": [asdict(r) for r in rows if r.method != "mixed"],
            "mixed": None,
        }
        summary = None
        if mixed:
            held = run_variants[-1].images[0]
            summary = summarise_mixed(rows, mixed_tau, held, paths[held].name if held < len(paths) else None)
            run["mixed"] = {**asdict(summary), "rows": [asdict(r) for r in rows if r.method == "mixed"]}
        report["runs"].append(run)
        if text:
            print(
                f"{args.arch} ({report['weights']}), {report['device_name']}, {report['dtype']}, "
                f"batch {batch_size} ({batch_pictures(batch_size, len(paths))}), "
                f"median of {args.rounds} rounds x {args.iters} iters"
            )
            print(format_table(table_rows, cpu_columns=device.type == "cpu"))
            if summary is not None:
                print()
                print(format_mixed(rows, summary))
            elif mixed_tau is not None:
                print("(no mixed case: it needs a batch of at least 2 images)")
            if args.compile:
                print()
                print(format_compiled(rows))
            if args.profile:
                print()
                print(format_profile(rows))
            print()
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
