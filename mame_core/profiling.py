"""Operator counts and top operators of one forward pass, from torch.profiler (mame-bench --profile).

A forward's launch and dispatch overhead grows with the number of aten operators it runs; on a GPU each
one is at least a kernel launch. Two counts: top-level operators (called from Python, not from inside
another aten operator: what the model code asks for) and all aten operators (every dispatch, nested ones
included). The top operators by self time say where the time goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass
class TopOp:
    name: str
    calls: int
    self_cpu_ms: float
    self_device_ms: float  # 0 on the CPU


@dataclass
class OpProfile:
    top_level_ops: int  # aten ops with no aten op above them
    aten_ops: int  # all aten ops, nested ones included
    sorted_by: str  # "self CPU time" or "self device time"
    top_ops: list[TopOp] = field(default_factory=list)


def _has_aten_ancestor(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def _self_device_us(avg) -> float:
    # The attribute's name changed across torch releases (cuda -> device).
    return float(getattr(avg, "self_device_time_total", getattr(avg, "self_cuda_time_total", 0.0)) or 0.0)


def profile_forward(forward: Callable[[], object], device: torch.device, top: int = 8) -> OpProfile:
    """Run `forward` once under torch.profiler and count its operators. Run it once before (warm-up):
    first calls allocate and pick kernels."""
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        forward()
        if on_gpu:
            torch.cuda.synchronize(device)
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top_level = sum(1 for e in aten if not _has_aten_ancestor(e))
    averages = list(prof.key_averages())
    if on_gpu:  # kernels are their own entries, with device time only
        key, sorted_by = _self_device_us, "self device time"
    else:
        key, sorted_by = (lambda a: float(a.self_cpu_time_total)), "self CPU time"
    ranked = sorted((a for a in averages if key(a) > 0), key=key, reverse=True)[:top]
    top_ops = [TopOp(a.key, int(a.count), a.self_cpu_time_total / 1e3, _self_device_us(a) / 1e3)
               for a in ranked]
    return OpProfile(top_level, len(aten), sorted_by, top_ops)
