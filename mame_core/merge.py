"""MaMe merge steps as pure tensor functions (see MAME_SPEC.md); ToMe's is in tome.py.

A batch of token sequences is a `TokenBatch`: tokens [B, T, C], sizes [B, T] (how many original patches
each token stands for; 0 marks padding) and, optionally, a source map [B, T, P] (which original patches
each token stands for). The first `num_special` tokens of every image (class, register, distillation
tokens) are never merged. Real tokens always sit at the front of each row; padding fills the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenBatch:
    x: Tensor  # [B, T, C]
    size: Tensor  # [B, T] float, 0 for padding
    source: Tensor | None = None  # [B, T, num_patches] or None


def _divide_where_positive(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0; where den == 0 the callers' num is 0, and so is the result. No eps: an eps
    shifts weights by whole percents when den is tiny."""
    return num / torch.where(den > 0, den, 1.0)


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
    kept_sum = kept.sum(dim=1, keepdim=True)
    return _divide_where_positive(kept, kept_sum), kept_sum.squeeze(1) > 0


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


def mame_step(
    batch: TokenBatch, metric: Tensor, tau: Tensor | float, num_special: int, stride: int
) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
    """Steps 2-9 of the spec on a padded batch, up to which tokens the output keeps.

    Returns `keep` [B, T'] (bool) and, for x, size and source, the parts (special, fused dst, src) along
    dim 1 that it masks: each image's kept tokens, in order, are its output (special, real dsts, preserved
    srcs). Similarity, weights and fusion run in fp32 or wider; only fused tokens return to the model dtype.
    """
    x, size, source = batch.x, batch.size, batch.source
    dst_pos, src_pos, special_keep = _split_positions(x.shape[1], num_special, stride, x.device)
    work = work_dtype(metric.dtype)
    unit = _unit(as_dtype(metric, work))
    sim = (unit[:, dst_pos] @ unit[:, src_pos].mT).clamp(-1.0, 1.0)
    size_dst, size_src = size[:, dst_pos], size[:, src_pos]
    valid_dst, valid_src = size_dst > 0, size_src > 0
    weights, merges = mame_fusion_weights(sim, tau, valid_dst, valid_src)

    # Size-weighted fusion. Each term's weight is divided by the dst's new size before it meets a token (the
    # weights of a fused token sum to 1). Padding rows may hold anything (NaN * 0 is NaN): padding srcs are
    # zeroed with where; padding dsts (new size 0) give rows that are never kept.
    mass = weights * as_dtype(size_src, work).unsqueeze(1)  # [B, M, N]
    new_size_dst = size_dst + as_dtype(mass.sum(dim=2), size.dtype)
    inverse = as_dtype(new_size_dst, work).reciprocal().unsqueeze(-1)
    x_dst, x_src = x[:, dst_pos], x[:, src_pos]
    x_src_real = torch.where(valid_src.unsqueeze(-1), x_src, 0.0)
    dst_share = as_dtype(size_dst, work).unsqueeze(-1) * inverse
    fused = dst_share * as_dtype(x_dst, work) + (mass * inverse) @ as_dtype(x_src_real, work)

    keep = torch.cat([special_keep.expand(x.shape[0], -1), valid_dst, valid_src & ~merges], dim=1)
    parts = [(x[:, :num_special], as_dtype(fused, x.dtype), x_src),
             (size[:, :num_special], new_size_dst, size_src)]
    if source is not None:
        # A source row already sums to its token's size, so it is spread by the weights alone.
        source_src = torch.where(valid_src.unsqueeze(-1), source[:, src_pos], 0.0)
        fused_source = source[:, dst_pos] + as_dtype(weights, source.dtype) @ source_src
        parts.append((source[:, :num_special], fused_source, source[:, src_pos]))
    return keep, parts


def _kept_rows(keep: Tensor, total: int) -> Tensor:
    """Flat indices of the `total` true entries of keep [B, T'], in order (no host sync where torch can)."""
    flat = keep.flatten()
    try:
        return torch.nonzero_static(flat, size=total).squeeze(1)
    except (NotImplementedError, RuntimeError):  # older torch builds lack it on some devices
        return flat.nonzero().squeeze(1)


def mame_merge(
    batch: TokenBatch, metric: Tensor, tau: Tensor | float, num_special: int, stride: int = 2
) -> tuple[TokenBatch, Tensor]:
    """One MaMe merge step (Algorithm 1 as read by MAME_SPEC.md) on a padded batch.

    metric: [B, T, d] similarity features (the block's keys, mean over heads); tau: [B] thresholds or one
    for all.
    Returns the merged batch (spec, fused dst, preserved src; compacted and cut to the longest image) and
    the real token count per image [B] (int64, on the CPU).
    """
    if batch.x.shape[1] - num_special < 2:  # at most one non-special token: nothing can merge, order is final
        return batch, (batch.size > 0).sum(dim=1).cpu()
    keep, parts = mame_step(batch, metric, tau, num_special, stride)
    lengths_host = keep.sum(dim=1).cpu()  # the one host sync of a merge: the output's length depends on it
    bsz, new_len = batch.x.shape[0], int(lengths_host.max())
    slot = torch.arange(bsz, device=keep.device).unsqueeze(1) * new_len + keep.cumsum(dim=1) - 1
    index = torch.where(keep, slot, bsz * new_len)
    placed = []
    for part in parts:
        values = torch.cat(part, dim=1).flatten(0, 1)
        out = values.new_zeros(bsz * new_len + 1, *values.shape[1:]).index_copy_(0, index.flatten(), values)
        placed.append(out[:-1].unflatten(0, (bsz, new_len)))
    return TokenBatch(*placed), lengths_host


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
        else:
            position = torch.arange(longest, device=self.x.device)
            real = position < (self.offsets[1:] - self.offsets[:-1]).unsqueeze(1)
            index = torch.where(real, self.offsets[:-1].unsqueeze(1) + position, 0)
            out = [t[index] if t is not None else None for t in tensors]
            out[1] = torch.where(real, out[1], 0.0)
        batch = TokenBatch(*out[:3])
        return (batch, *out[3:]) if extra else batch


def mame_merge_packed(
    batch: PackedBatch, metric: Tensor, tau: Tensor | float, num_special: int, stride: int = 2,
    step: Callable[..., tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]]]] | None = None,
) -> PackedBatch:
    """mame_merge on a packed batch (metric [N, d]), returning a packed batch: the same tokens and sizes as
    mame_merge gives, without its padding. One host sync (the new token count). `step`: a compiled
    equivalent of the device part of the merge, if any."""
    padded, padded_metric = batch.padded(metric)
    if padded.x.shape[1] - num_special < 2:
        return batch
    keep, parts = (step or mame_step)(padded, padded_metric, tau, num_special, stride)
    lengths = keep.sum(dim=1)
    lengths_host = tuple(lengths.tolist())  # the one host sync of a merge: the output's size depends on it
    rows = _kept_rows(keep, sum(lengths_host))
    placed = [torch.cat(part, dim=1).flatten(0, 1).index_select(0, rows) for part in parts]
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    return PackedBatch(placed[0], placed[1], placed[2] if len(placed) > 2 else None, lengths_host, offsets)


def mame_order(batch: TokenBatch, num_special: int, stride: int = 2) -> TokenBatch:
    """What mame_merge returns when nothing merges in an unpadded batch (tau >= 1): the same tokens in the
    order special, destinations, sources. A cheap path that keeps later partitions exactly as mame_merge's."""
    dst_pos, src_pos, _ = _split_positions(batch.x.shape[1], num_special, stride, batch.x.device)
    order = torch.cat([torch.arange(num_special, device=batch.x.device), dst_pos, src_pos])
    source = batch.source[:, order] if batch.source is not None else None
    return TokenBatch(batch.x[:, order], batch.size[:, order], source)

