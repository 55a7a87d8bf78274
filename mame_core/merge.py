"""MaMe merge steps as pure tensor functions (see MAME_SPEC.md); ToMe's is in tome.py.

A batch of token sequences is a `TokenBatch`: tokens [B, T, C], sizes [B, T] (how many original patches
each token stands for; 0 marks padding) and, optionally, a source map [B, T, P] (which original patches
each token stands for). The first `num_special` tokens of every image (class, register, distillation
tokens) are never merged. Real tokens always sit at the front of each row; padding fills the rest.
"""

from __future__ import annotations

import functools
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


def mame_fusion_weights(sim: Tensor, tau: Tensor | float, valid_dst: Tensor, valid_src: Tensor) -> Tensor:
    """Steps 3-6 of the spec: thresholded, pruned and renormalised fusion weights WF [B, M, N].

    Every column (src) that merges sums to exactly 1; a column of zeros means the src is preserved.
    """
    threshold = tau.to(sim.dtype).view(-1, 1, 1) if isinstance(tau, Tensor) else tau
    pair_ok = valid_dst.unsqueeze(2) & valid_src.unsqueeze(1)
    excess = torch.where(pair_ok, (sim - threshold).relu(), 0.0)
    colsum = excess.sum(dim=1, keepdim=True)
    positive = excess > 0
    count = positive.sum(dim=1, keepdim=True)
    # Keep a dst if its weight reaches the mean positive weight of its column (zeta_j); compared on St so that
    # one candidate, or several equal ones, are kept regardless of float rounding.
    keep = positive & (excess * count >= colsum * (1 - 1e-5))
    kept = torch.where(keep, excess, 0.0)
    return _divide_where_positive(kept, kept.sum(dim=1, keepdim=True))


@functools.lru_cache(maxsize=256)
def _split_positions(length: int, num_special: int, stride: int, device: torch.device) -> tuple[Tensor, ...]:
    """Positions of the destinations (every `stride`-th non-special token) and of the sources (the rest),
    and the slots the destinations take after compaction. Cached: the same few lengths recur."""
    pos = torch.arange(num_special, length, device=device)
    is_dst = (pos - num_special) % stride == 0
    dst_pos = pos[is_dst]
    return dst_pos, pos[~is_dst], torch.arange(num_special, num_special + dst_pos.numel(), device=device)


def mame_merge(
    batch: TokenBatch, metric: Tensor, tau: Tensor | float, num_special: int, stride: int = 2
) -> tuple[TokenBatch, Tensor]:
    """One MaMe merge step (Algorithm 1 as read by MAME_SPEC.md) on a padded batch.

    metric: [B, T, d] similarity features (the block's keys, mean over heads); tau: [B] thresholds or one for all.
    Returns the merged batch (spec, fused dst, preserved src; compacted and cut to the longest image) and
    the real token count per image [B] (int64, on the CPU).
    """
    x, size, source = batch.x, batch.size, batch.source
    dst_pos, src_pos, dst_slots = _split_positions(x.shape[1], num_special, stride, x.device)
    if src_pos.numel() == 0:  # at most one non-special token: nothing can merge, and the order is already final
        return batch, (size > 0).sum(dim=1).cpu()

    size_dst, size_src = size[:, dst_pos], size[:, src_pos]
    valid_dst, valid_src = size_dst > 0, size_src > 0
    sim = cosine_similarity(metric[:, dst_pos], metric[:, src_pos])
    weights = mame_fusion_weights(sim, tau, valid_dst, valid_src)
    preserved = valid_src & (weights.sum(dim=1) == 0)

    # Size-weighted fusion. Padding rows may hold anything (NaN * 0 is NaN), so they are zeroed with where.
    # Each term's weight is divided by the dst's new size before it meets a token: the weights of a fused token
    # sum to 1, so in fp16 no partial sum can overflow where the mean itself fits (size 80 x 1000 would).
    mass = weights * size_src.to(weights.dtype).unsqueeze(1)  # [B, M, N]
    x_src = torch.where(valid_src.unsqueeze(-1), x[:, src_pos], 0.0)
    new_size_dst = size_dst + mass.sum(dim=2).to(size.dtype)
    src_share = _divide_where_positive(mass, new_size_dst.to(mass.dtype).unsqueeze(-1))
    dst_share = _divide_where_positive(size_dst, new_size_dst).to(x.dtype).unsqueeze(-1)
    fused = torch.where(valid_dst.unsqueeze(-1), dst_share * x[:, dst_pos], 0.0) + src_share.to(x.dtype) @ x_src

    # Compaction: each image's row becomes [special, its real dsts, its preserved srcs, padding]. Every
    # token is scattered to its slot; merged sources and padding go to one extra slot that is cut off.
    n_valid_dst = valid_dst.sum(dim=1, keepdim=True)  # [B, 1]
    lengths = num_special + n_valid_dst.squeeze(1) + preserved.sum(dim=1)
    lengths_host = lengths.cpu()  # the one host sync of a merge: the output's length depends on it
    new_len = int(lengths_host.max())
    dst_slot = torch.where(valid_dst, dst_slots, new_len)
    src_slot = torch.where(preserved, num_special + n_valid_dst + preserved.cumsum(dim=1) - 1, new_len)
    spec_slot = torch.arange(num_special, device=x.device).expand(x.shape[0], -1)
    slots = torch.cat([spec_slot, dst_slot, src_slot], dim=1)

    def compact(spec_part: Tensor, dst_part: Tensor, src_part: Tensor) -> Tensor:
        values = torch.cat([spec_part, dst_part, src_part], dim=1)
        index = slots if values.dim() == 2 else slots.unsqueeze(-1).expand(-1, -1, values.shape[-1])
        out = values.new_zeros(values.shape[0], new_len + 1, *values.shape[2:])
        return out.scatter_(1, index, values)[:, :new_len]

    new_x = compact(x[:, :num_special], fused, x[:, src_pos])
    new_size = compact(size[:, :num_special], new_size_dst, size_src)
    new_source = None
    if source is not None:
        # A source row already sums to its token's size, so it is spread by the weights alone.
        source_src = torch.where(valid_src.unsqueeze(-1), source[:, src_pos], 0.0)
        fused_source = source[:, dst_pos] + weights.to(source.dtype) @ source_src
        new_source = compact(source[:, :num_special], fused_source, source[:, src_pos])
    return TokenBatch(new_x, new_size, new_source), lengths_host


def mame_order(batch: TokenBatch, num_special: int, stride: int = 2) -> TokenBatch:
    """What mame_merge returns when nothing merges in an unpadded batch (tau >= 1): the same tokens in the
    order special, destinations, sources. A cheap path that keeps later partitions exactly as mame_merge's."""
    dst_pos, src_pos, _ = _split_positions(batch.x.shape[1], num_special, stride, batch.x.device)
    order = torch.cat([torch.arange(num_special, device=batch.x.device), dst_pos, src_pos])
    source = batch.source[:, order] if batch.source is not None else None
    return TokenBatch(batch.x[:, order], batch.size[:, order], source)

