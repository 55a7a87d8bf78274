"""MaMe merge steps as pure tensor functions (see MAME_SPEC.md); ToMe's is in tome.py.

A batch of token sequences is a `TokenBatch`: tokens [B, T, C], sizes [B, T] (how many original patches
each token stands for; 0 marks padding) and, optionally, a source map [B, T, P] (which original patches
each token stands for). The first `num_special` tokens of every image (class, register, distillation
tokens) are never merged. Real tokens always sit at the front of each row; padding fills the rest.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenBatch:
    x: Tensor  # [B, T, C]
    size: Tensor  # [B, T] float, 0 for padding
    source: Tensor | None = None  # [B, T, num_patches] or None


def _unit(v: Tensor) -> Tensor:
    """Rows scaled to unit length; a zero row stays 0 (clamped norm, never NaN)."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).eps)


def mame_fusion_weights(
    unit_dst: Tensor, unit_src: Tensor, tau: Tensor | float, pair_bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Steps 2-6 of the spec: thresholded, pruned and renormalised fusion weights WF [B, M, N] from unit
    keys [B, M, d] and [B, N, d], and the column sums before renormalising [B, 1, N] (a src merges where its
    sum is positive; a zero column of WF: the src is preserved, or is padding). pair_bias [B, M, N]: 0 for
    real pairs, PADDING_BIAS where the dst or the src is padding (its similarity falls below any tau >= -1,
    so it never merges); None without padding.

    Every column (src) that merges sums to exactly 1.
    """
    # Added in the product's own op; a zero bias without padding, so that an image's similarities come from
    # the same kernel alone and in a batch.
    bias = pair_bias if pair_bias is not None else _zero(unit_dst.device, unit_dst.dtype)
    sim = torch.baddbmm(bias, unit_dst, unit_src.mT)
    # Cosines of unit rows may round past 1: clamped, so that tau = 1 merges nothing (below -1 never matters:
    # tau >= -1).
    if isinstance(tau, Tensor):
        excess = (sim.clamp_(max=1.0) - as_dtype(tau, sim.dtype).view(-1, 1, 1)).relu_()
    else:  # the same values in one op fewer: rounding is monotonic, so sim - tau <= 1 - tau where sim <= 1
        excess = (sim - tau).clamp_(0.0, max(1.0 - tau, 0.0))
    colsum = excess.sum(dim=1, keepdim=True)
    count = (excess > 0).sum(dim=1, keepdim=True)
    # Keep a dst if its weight reaches the mean positive weight of its column (zeta_j); compared on St so that
    # one candidate, or several equal ones, are kept regardless of float rounding. A zero entry is kept only
    # where its column is all zero, and adds nothing.
    kept = torch.where(excess * count >= colsum * (1 - 1e-5), excess, 0.0)
    kept_sum = kept.sum(dim=1, keepdim=True)
    # A column that does not merge is all zero and stays so (0 / tiny). No eps: an eps shifts weights by whole
    # percents when the column sum is tiny; a positive sum is far above `tiny`, so it divides exactly.
    return kept / kept_sum.clamp_min(torch.finfo(kept.dtype).tiny), kept_sum


def mame_fuse(
    x_dst: Tensor, x_src: Tensor, size_dst: Tensor, size_src: Tensor, unit_dst: Tensor, unit_src: Tensor,
    tau: Tensor | float, pair_bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 2-8 of the spec on the gathered destinations and sources of a batch: x_dst [B, M, C], x_src
    [B, N, C], their sizes [B, M, 1] and [B, 1, N] and unit keys, in fp32 or wider (spec 5a).

    Returns the fused destinations [B, M, C] (in x's dtype), their new sizes [B, M, 1], the weight columns'
    sums [B, 1, N] (positive where a src merged) and the fusion weights [B, M, N]. The device part of a
    merge: no host value inside.
    """
    work = unit_dst.dtype
    size_dst = as_dtype(size_dst, work)
    weights, column_sums = mame_fusion_weights(unit_dst, unit_src, tau, pair_bias)
    mass = weights * as_dtype(size_src, work)  # [B, M, N]: how many patches each src gives each dst
    new_size_dst = size_dst + mass.sum(dim=2, keepdim=True)
    # Size-weighted mean in fp32 or wider: (s_dst x_dst + sum_j mass_ij x_src_j) / s'_dst. Padding dsts repeat
    # a real token with its size (finite, never kept); padding srcs carry no mass.
    fused = torch.baddbmm(as_dtype(x_dst, work) * size_dst, mass, as_dtype(x_src, work)) / new_size_dst
    return as_dtype(fused, x_dst.dtype), new_size_dst, column_sums, weights


def eager_cached(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """fn (small constant tensors from hashable arguments), its results cached in eager mode and computed
    afresh while torch.compile traces."""
    cached = functools.lru_cache(maxsize=16)(fn)

    @functools.wraps(fn)
    def call(*args: Any) -> Tensor:
        return fn(*args) if torch.compiler.is_compiling() else cached(*args)

    return call


def _partition_rows(n_dst: int, n_src: int, num_special: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions in an image of its first n_dst destinations (every `stride`-th non-special token) and its
    first n_src sources (the rest)."""
    dst = num_special + np.arange(n_dst) * stride
    k = np.arange(n_src)
    return dst, num_special + k // (stride - 1) * stride + k % (stride - 1) + 1


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the merge's decisions: fp32 for half-precision models (spec 5a), float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, without an op when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def _to_device(array: np.ndarray, device: torch.device) -> Tensor:
    t = torch.from_numpy(array)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def mame_merge(
    batch: TokenBatch, metric: Tensor, tau: Tensor | float, num_special: int, stride: int = 2
) -> tuple[TokenBatch, Tensor]:
    """One MaMe merge step (Algorithm 1 as read by MAME_SPEC.md) on a padded batch: mame_merge_packed on its
    real tokens (a row's real tokens are at its front; padding has size 0 and may hold anything).

    metric: [B, T, d]; tau: [B] thresholds or one for all. Returns the merged batch (spec, fused dst,
    preserved src; padding zeroed, cut to the longest image) and the real token count per image [B] (int64,
    on the CPU).
    """
    length = batch.x.shape[1]
    counts = (batch.size > 0).sum(dim=1).cpu()
    if length - num_special < 2:  # at most one non-special token: nothing can merge, order is final
        return batch, counts
    image, position = _real_positions(tuple(counts.tolist()), batch.x.device)
    lengths = tuple(counts.tolist())
    packed = PackedBatch(batch.x[image, position], batch.size[image, position],
                         batch.source[image, position] if batch.source is not None else None,
                         lengths)
    merged = mame_merge_packed(packed, metric[image, position], tau, num_special, stride)
    image, position = _real_positions(merged.lengths, batch.x.device)
    longest = max(merged.lengths)

    def padded(values: Tensor | None) -> Tensor | None:
        if values is None:
            return None
        out = values.new_zeros(len(merged.lengths), longest, *values.shape[1:])
        out[image, position] = values
        return out

    return (TokenBatch(padded(merged.x), padded(merged.size), padded(merged.source)),
            torch.tensor(merged.lengths, dtype=torch.int64))


def _real_positions(lengths: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """(image, position) of every real token of a padded batch with these lengths, in packed order."""
    image = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(len(image)) - np.repeat(_starts(lengths), lengths)
    return _to_device(image, device), _to_device(position, device)


@dataclass(frozen=True)
class PackedBatch:
    """Each image's real tokens back to back, without padding: x [N, C], size [N], source [N, P] or None,
    with the tokens per image on the host (`lengths`, B ints)."""

    x: Tensor
    size: Tensor
    source: Tensor | None
    lengths: tuple[int, ...]

    @property
    def uniform(self) -> bool:
        """Do all images have the same length (then the packed rows are a [B, L] batch as they are)?"""
        return min(self.lengths) == max(self.lengths)

    def with_x(self, x: Tensor) -> PackedBatch:
        return PackedBatch(x, self.size, self.source, self.lengths)

    def leading(self, count: int) -> Tensor:
        """Each image's first `count` rows of x, [B, count, C] (its special tokens)."""
        rows = np.asarray(_starts(self.lengths))[:, None] + np.arange(count)
        return self.x[_to_device(rows, self.x.device)]

    @staticmethod
    def from_padded(batch: TokenBatch) -> PackedBatch:
        """A padded batch without padding (every image as long as the tensor) as a packed one."""
        bsz, length = batch.x.shape[:2]
        source = batch.source.flatten(0, 1) if batch.source is not None else None
        return PackedBatch(batch.x.flatten(0, 1), batch.size.flatten(), source, (length,) * bsz)

    def padded(self, *extra: Tensor) -> tuple[TokenBatch, ...] | TokenBatch:
        """[B, longest, ...] views or copies: padding rows hold any real token and have size 0. Extra packed
        tensors [N, ...] (a metric) are padded alike and returned after the batch."""
        bsz, longest = len(self.lengths), max(self.lengths)
        tensors = [self.x, self.size, self.source, *extra]
        if self.uniform:
            out = [t.unflatten(0, (bsz, longest)) if t is not None else None for t in tensors]
        else:  # indices made on the host from the known lengths: two small copies, no index arithmetic ops
            position = np.arange(longest)
            real = position[None, :] < np.asarray(self.lengths)[:, None]
            # A padding row repeats its own image's first token: nothing of another image (a NaN) leaks in.
            starts = np.asarray(_starts(self.lengths))[:, None]
            index = np.where(real, starts + position, starts)
            index_t = _to_device(index, self.x.device)
            out = [t[index_t] if t is not None else None for t in tensors]
            out[1] = torch.where(_to_device(real, self.x.device), out[1], 0.0)
        batch = TokenBatch(*out[:3])
        return (batch, *out[3:]) if extra else batch


@dataclass(frozen=True)
class _MergePlan:
    """Where a packed batch's destinations and sources are (host arrays, from the images' lengths alone).

    dst [B, M] and src [B, N]: packed row of each image's j-th destination and k-th source; a padding entry
    (an image with fewer) repeats the image's first row, so it is finite where the image is and never another
    image's. dst_real [B, M], src_real [B, N]: which entries are real."""

    dst: np.ndarray
    src: np.ndarray
    dst_real: np.ndarray
    src_real: np.ndarray

    @property
    def padded(self) -> bool:
        return not (self.dst_real.all() and self.src_real.all())


def _merge_plan(lengths: tuple[int, ...], num_special: int, stride: int) -> _MergePlan:
    rest = np.maximum(np.asarray(lengths) - num_special, 0)
    n_dst = -(-rest // stride)
    dst_row, src_row = _partition_rows(int(n_dst.max()), int((rest - n_dst).max()), num_special, stride)
    dst_real = np.arange(len(dst_row))[None, :] < n_dst[:, None]
    src_real = np.arange(len(src_row))[None, :] < (rest - n_dst)[:, None]
    starts = np.asarray(_starts(lengths))[:, None]
    dst = starts + np.where(dst_real, dst_row[None, :], 0)
    src = starts + np.where(src_real, src_row[None, :], 0)
    return _MergePlan(dst, src, dst_real, src_real)


PADDING_BIAS = -4.0  # added to a similarity in [-1, 1] where a pair holds padding: below every tau >= -1


def _pair_bias(plan: _MergePlan, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    """[B, M, N]: 0 for real (dst, src) pairs, PADDING_BIAS or less where either is padding; None without
    padding. Made on the host where the batch is (no copy), else from two small arrays on the device."""
    if not plan.padded:
        return None
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    bias_dst = np.where(plan.dst_real, 0.0, PADDING_BIAS).astype(np_dtype)[:, :, None]
    bias_src = np.where(plan.src_real, 0.0, PADDING_BIAS).astype(np_dtype)[:, None, :]
    if device.type == "cpu":
        return torch.from_numpy(bias_dst + bias_src)
    return _to_device(bias_dst, device) + _to_device(bias_src, device)


@eager_cached
def _zero(device: torch.device, dtype: torch.dtype) -> Tensor:
    """A 0-dim zero."""
    return torch.zeros((), device=device, dtype=dtype)


def _output_rows(plan: _MergePlan, merges: np.ndarray, total: int, num_special: int,
                 starts: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """The merged batch's rows in the table [packed rows; fused destinations (B x M)]: per image its
    specials, its real destinations, its preserved sources, in this order (spec step 9); and its lengths."""
    bsz, n_dst = plan.dst.shape
    special = starts[:, None] + np.arange(num_special)[None, :]
    fused = total + np.arange(bsz * n_dst).reshape(bsz, n_dst)
    rows = np.concatenate([special, fused, plan.src], axis=1)
    kept = np.concatenate([np.ones_like(special, dtype=bool), plan.dst_real, plan.src_real & ~merges], axis=1)
    return rows[kept], tuple(int(n) for n in kept.sum(axis=1))


def mame_merge_packed(
    batch: PackedBatch, metric: Tensor, tau: Tensor | float, num_special: int, stride: int = 2,
    fuse: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]] | None = None,
) -> PackedBatch:
    """One MaMe merge step (Algorithm 1 as read by MAME_SPEC.md) on a packed batch.

    metric: [N, d] similarity features (the block's keys, mean over heads); tau: [B] thresholds or one for
    all. `fuse`: a compiled equivalent of mame_fuse, if any. Returns each image's kept tokens packed, in the
    order specials, fused destinations, preserved sources.

    Few operators, as each is a launch on a GPU: the destinations and sources are gathered with indices made
    on the host from the known lengths, and the output is one gather from [packed rows; fused destinations].
    One host sync: which sources merged.
    """
    if max(batch.lengths) - num_special < 2:  # at most one non-special token: nothing can merge
        return batch
    device = batch.x.device
    plan = _merge_plan(batch.lengths, num_special, stride)
    # One gather per tensor: [B, M + N] rows, destinations then sources.
    rows = _to_device(np.concatenate([plan.dst, plan.src], axis=1), device)
    parts = [plan.dst.shape[1], plan.src.shape[1]]
    work = work_dtype(metric.dtype)
    unit_dst, unit_src = _unit(as_dtype(metric, work))[rows].split(parts, dim=1)
    size_dst, size_src = batch.size[rows].split(parts, dim=1)
    fused, new_size, column_sums, weights = (fuse or mame_fuse)(
        *batch.x[rows].split(parts, dim=1), size_dst.unsqueeze(2), size_src.unsqueeze(1), unit_dst, unit_src,
        tau, _pair_bias(plan, device, work))
    # DLPack: a view of the host tensor, without the dispatcher calls of Tensor.numpy().
    merges = np.from_dlpack(column_sums if column_sums.device.type == "cpu" else column_sums.cpu())[:, 0] > 0
    starts = np.asarray(_starts(batch.lengths))
    out_rows, lengths = _output_rows(plan, merges, batch.x.shape[0], num_special, starts)
    out_rows_t = _to_device(out_rows, device)
    x = torch.cat([batch.x, fused.flatten(0, 1)])[out_rows_t]
    new_size = torch.cat([batch.size, as_dtype(new_size, batch.size.dtype).flatten()])[out_rows_t]
    source = None
    if batch.source is not None:
        # A source row already sums to its token's size, so it is spread by the weights alone.
        source_dst, source_src = batch.source[rows].split(parts, dim=1)
        fused_source = torch.baddbmm(source_dst, as_dtype(weights, batch.source.dtype), source_src)
        source = torch.cat([batch.source, fused_source.flatten(0, 1)])[out_rows_t]
    return PackedBatch(x, new_size, source, lengths)


def _starts(lengths: tuple[int, ...]) -> list[int]:
    """Where each image starts in its packed rows."""
    return [0, *itertools.accumulate(lengths)][:-1]


def cu_seqlens(lengths: tuple[int, ...], device: torch.device) -> Tensor:
    """[B + 1] int32 on the device: where each image starts in its packed rows, then the total."""
    return _to_device(np.asarray([0, *itertools.accumulate(lengths)], dtype=np.int32), device)


def mame_order(batch: TokenBatch, num_special: int, stride: int = 2) -> TokenBatch:
    """What mame_merge returns when nothing merges in an unpadded batch (tau >= 1): the same tokens in the
    order special, destinations, sources. A cheap path that keeps later partitions exactly as mame_merge's."""
    rest = max(batch.x.shape[1] - num_special, 0)
    n_dst = -(-rest // stride)
    dst, src = _partition_rows(n_dst, rest - n_dst, num_special, stride)
    order = _to_device(np.concatenate([np.arange(num_special), dst, src]), batch.x.device)
    source = batch.source[:, order] if batch.source is not None else None
    return TokenBatch(batch.x[:, order], batch.size[:, order], source)

