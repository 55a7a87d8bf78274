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


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """[B, M, d] x [B, N, d] -> [B, M, N] cosine similarities in [-1, 1]; a zero vector gives 0."""
    return (_unit(a) @ _unit(b).transpose(-1, -2)).clamp(-1.0, 1.0)


def mame_fusion_weights(
    sim: Tensor, tau: Tensor | float, valid_dst: Tensor, valid_src: Tensor
) -> tuple[Tensor, Tensor]:
    """Steps 3-6 of the spec: thresholded, pruned and renormalised fusion weights WF [B, M, N], and which
    sources merge [B, N] (a column of WF that is all zero: the src is preserved, or is padding).

    Every column (src) that merges sums to exactly 1.
    """
    threshold = as_dtype(tau, sim.dtype).view(-1, 1, 1) if isinstance(tau, Tensor) else tau
    pair_ok = valid_dst.unsqueeze(2) & valid_src.unsqueeze(1)
    excess = torch.where(pair_ok, (sim - threshold).relu(), 0.0)
    colsum = excess.sum(dim=1, keepdim=True)
    count = (excess > 0).sum(dim=1, keepdim=True)
    # Keep a dst if its weight reaches the mean positive weight of its column (zeta_j); compared on St so that
    # one candidate, or several equal ones, are kept regardless of float rounding. A zero entry is kept only
    # where its column is all zero, and adds nothing.
    kept = torch.where(excess * count >= colsum * (1 - 1e-5), excess, 0.0)
    kept_sum = kept.sum(dim=1)
    merges = kept_sum > 0
    # A column that does not merge is all zero and stays so (divided by 1). No eps: an eps shifts weights by
    # whole percents when the column sum is tiny.
    return kept / torch.where(merges, kept_sum, 1.0).unsqueeze(1), merges


def _positions(length: int, num_special: int, stride: int, device: torch.device) -> tuple[Tensor, ...]:
    """Positions of the destinations (every `stride`-th non-special token) and of the sources (the rest),
    and an all-true [1, num_special] mask (the special tokens are always kept). Arithmetic only, no
    data-dependent op, so that it traces under torch.compile."""
    rest = max(length - num_special, 0)
    n_dst = -(-rest // stride)
    src = torch.arange(rest - n_dst, device=device)
    src_pos = num_special + src // (stride - 1) * stride + src % (stride - 1) + 1
    dst_pos = torch.arange(num_special, length, stride, device=device)
    return dst_pos, src_pos, torch.ones(1, num_special, dtype=torch.bool, device=device)


_cached_positions = functools.lru_cache(maxsize=256)(_positions)


def _split_positions(length: int, num_special: int, stride: int, device: torch.device) -> tuple[Tensor, ...]:
    """_positions, cached in eager mode: the same few lengths recur."""
    if torch.compiler.is_compiling():
        return _positions(length, num_special, stride, device)
    return _cached_positions(length, num_special, stride, device)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the merge's decisions: fp32 for half-precision models (spec 5a), float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, without an op when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def _order(length: int, num_special: int, stride: int) -> np.ndarray:
    """The positions of a length-`length` image in the merge's order: special, destinations, sources."""
    dst_pos, src_pos, _ = _cached_positions(length, num_special, stride, torch.device("cpu"))
    return np.concatenate([np.arange(num_special), dst_pos.numpy(), src_pos.numpy()])


_cached_order = functools.lru_cache(maxsize=256)(_order)


def mame_step(
    x: Tensor, size: Tensor, source: Tensor | None, metric: Tensor, tau: Tensor | float, num_special: int,
    n_dst: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Steps 2-9 of the spec on a padded batch already in merge order (special, `n_dst` destinations, then
    sources; padding has size 0 and finite rows): x [B, T, C], size [B, T], source [B, T, P] or None,
    metric [B, T, d].

    Returns `keep` [B, T] (bool) and x, size, source [B, T, ...] with the fused destinations in place:
    each image's kept tokens, in order, are its output (special, real dsts, preserved srcs). Similarity,
    weights and fusion run in fp32 or wider; only fused tokens return to the model dtype.
    """
    work = work_dtype(metric.dtype)
    parts = [num_special, n_dst, x.shape[1] - num_special - n_dst]
    _, unit_dst, unit_src = _unit(as_dtype(metric, work)).split(parts, dim=1)
    sim = (unit_dst @ unit_src.mT).clamp(-1.0, 1.0)
    size_special, size_dst, size_src = size.split(parts, dim=1)
    _, valid_dst, valid_src = (size > 0).split(parts, dim=1)
    weights, merges = mame_fusion_weights(sim, tau, valid_dst, valid_src)

    # Size-weighted fusion. Each term's weight is divided by the dst's new size before it meets a token (the
    # weights of a fused token sum to 1). Padding srcs weigh 0, so their rows must be finite (NaN * 0 is NaN):
    # copies of the same image's tokens, or zeros. Padding dsts (new size 0) give rows that are never kept.
    mass = weights * as_dtype(size_src, work).unsqueeze(1)  # [B, M, N]
    new_size_dst = size_dst + as_dtype(mass.sum(dim=2), size.dtype)
    inverse = as_dtype(new_size_dst, work).reciprocal().unsqueeze(-1)
    x_special, x_dst, x_src = x.split(parts, dim=1)
    dst_share = as_dtype(size_dst, work).unsqueeze(-1) * inverse
    fused = dst_share * as_dtype(x_dst, work) + (mass * inverse) @ as_dtype(x_src, work)

    # A merged src keeps no size: the kept tokens are those with a size (specials, real dsts, preserved srcs).
    new_size = torch.cat([size_special, new_size_dst, torch.where(merges, 0.0, size_src)], dim=1)
    new_x = torch.cat([x_special, as_dtype(fused, x.dtype), x_src], dim=1)
    new_source = None
    if source is not None:
        # A source row already sums to its token's size, so it is spread by the weights alone.
        source_special, source_dst, source_src = source.split(parts, dim=1)
        fused_source = source_dst + as_dtype(weights, source.dtype) @ source_src
        new_source = torch.cat([source_special, fused_source, source_src], dim=1)
    return new_size > 0, new_x, new_size, new_source


def _to_device(array: np.ndarray, device: torch.device) -> Tensor:
    t = torch.from_numpy(array)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _kept(keep: Tensor) -> tuple[np.ndarray, tuple[int, ...]]:
    """keep [B, T] on the host (the one host sync of a merge: the output's size depends on it): the kept
    (image, position) pairs, in order, [2, total], and the kept tokens per image."""
    keep_host = (keep if keep.device.type == "cpu" else keep.cpu()).numpy()
    return np.stack(keep_host.nonzero()), tuple(int(n) for n in keep_host.sum(axis=1))


def mame_merge(
    batch: TokenBatch, metric: Tensor, tau: Tensor | float, num_special: int, stride: int = 2
) -> tuple[TokenBatch, Tensor]:
    """One MaMe merge step (Algorithm 1 as read by MAME_SPEC.md) on a padded batch.

    metric: [B, T, d] similarity features (the block's keys, mean over heads); tau: [B] thresholds or one
    for all.
    Returns the merged batch (spec, fused dst, preserved src; compacted and cut to the longest image) and
    the real token count per image [B] (int64, on the CPU).
    """
    length = batch.x.shape[1]
    if length - num_special < 2:  # at most one non-special token: nothing can merge, order is final
        return batch, (batch.size > 0).sum(dim=1).cpu()
    order = _to_device(_cached_order(length, num_special, stride), batch.x.device)
    real = (batch.size[:, order] > 0).unsqueeze(-1)  # padding rows may hold anything: zeroed for mame_step
    source = torch.where(real, batch.source[:, order], 0.0) if batch.source is not None else None
    n_dst = -(-(length - num_special) // stride)
    x = torch.where(real, batch.x[:, order], 0.0)
    keep, *merged = mame_step(x, batch.size[:, order], source, metric[:, order], tau, num_special, n_dst)
    kept, lengths = _kept(keep)
    bsz, new_len = batch.x.shape[0], max(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    slot = _to_device(np.arange(kept.shape[1]) - starts[kept[0]], batch.x.device)
    image, position = (_to_device(np.ascontiguousarray(k), batch.x.device) for k in kept)
    placed = []
    for values in merged:
        if values is None:
            placed.append(None)
            continue
        out = values.new_zeros(bsz, new_len, *values.shape[2:])
        out[image, slot] = values[image, position]
        placed.append(out)
    return TokenBatch(*placed), torch.tensor(lengths, dtype=torch.int64)


@dataclass(frozen=True)
class PackedBatch:
    """Each image's real tokens back to back, without padding: x [N, C], size [N], source [N, P] or None,
    with the tokens per image on the host (`lengths`, B ints) and where each image starts on the device
    (`offsets` [B + 1], int64: cu_seqlens)."""

    x: Tensor
    size: Tensor
    source: Tensor | None
    lengths: tuple[int, ...]
    offsets: Tensor

    @property
    def uniform(self) -> bool:
        """Do all images have the same length (then the packed rows are a [B, L] batch as they are)?"""
        return min(self.lengths) == max(self.lengths)

    def with_x(self, x: Tensor) -> PackedBatch:
        return PackedBatch(x, self.size, self.source, self.lengths, self.offsets)

    @staticmethod
    def from_padded(batch: TokenBatch) -> PackedBatch:
        """A padded batch without padding (every image as long as the tensor) as a packed one."""
        bsz, length = batch.x.shape[:2]
        source = batch.source.flatten(0, 1) if batch.source is not None else None
        offsets = torch.arange(0, (bsz + 1) * length, length, device=batch.x.device)
        return PackedBatch(batch.x.flatten(0, 1), batch.size.flatten(), source, (length,) * bsz, offsets)

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


def mame_merge_packed(
    batch: PackedBatch, metric: Tensor, tau: Tensor | float, num_special: int, stride: int = 2,
    step: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor | None]] | None = None,
) -> PackedBatch:
    """mame_merge on a packed batch (metric [N, d]), returning a packed batch: the same tokens and sizes as
    mame_merge gives, without its padding. One host sync (the kept tokens). `step`: a compiled equivalent
    of mame_step, if any.

    The padded batch in merge order is one gather per tensor, with indices made on the host from the known
    lengths, and the output one gather back: few operators, as each is a launch on a GPU."""
    longest = max(batch.lengths)
    if longest - num_special < 2:
        return batch
    order = _cached_order(longest, num_special, stride)
    starts = np.asarray(_starts(batch.lengths))
    real = order[None, :] < np.asarray(batch.lengths)[:, None]  # [B, T]
    device = batch.x.device
    # A padding row repeats its own image's first token (finite where the image is, and never another's).
    index = _to_device(np.where(real, starts[:, None] + order[None, :], starts[:, None]), device)
    size = torch.where(_to_device(real, device), batch.size[index], 0.0)
    source = batch.source[index] if batch.source is not None else None
    n_dst = -(-(longest - num_special) // stride)
    keep, x, size, source = (step or mame_step)(batch.x[index], size, source, metric[index], tau,
                                                num_special, n_dst)
    kept, lengths = _kept(keep)
    image, position = (_to_device(np.ascontiguousarray(k), device) for k in kept)
    source = source[image, position] if source is not None else None
    offsets = _to_device(np.asarray(_starts(lengths) + [sum(lengths)], dtype=np.int64), device)
    return PackedBatch(x[image, position], size[image, position], source, lengths, offsets)


def _starts(lengths: tuple[int, ...]) -> list[int]:
    """Where each image starts in its packed rows."""
    return [0, *itertools.accumulate(lengths)][:-1]


def mame_order(batch: TokenBatch, num_special: int, stride: int = 2) -> TokenBatch:
    """What mame_merge returns when nothing merges in an unpadded batch (tau >= 1): the same tokens in the
    order special, destinations, sources. A cheap path that keeps later partitions exactly as mame_merge's."""
    dst_pos, src_pos, _ = _split_positions(batch.x.shape[1], num_special, stride, batch.x.device)
    order = torch.cat([torch.arange(num_special, device=batch.x.device), dst_pos, src_pos])
    source = batch.source[:, order] if batch.source is not None else None
    return TokenBatch(batch.x[:, order], batch.size[:, order], source)

