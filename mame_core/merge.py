"""MaMe and ToMe merge steps as pure tensor functions (see MAME_SPEC.md).

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


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the merge's decisions: fp32 for half-precision models (spec 5a), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _mame_step(
    batch: TokenBatch, metric: Tensor, tau: Tensor | float, num_special: int, stride: int
) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
    """Steps 2-9 of the spec on a padded batch, up to where each token goes.

    Returns the real token count per image [B, 1] (on the device), each token's slot in its image's output
    row [B, T'] (-1: dropped, for merged sources and padding), and for x, size and source the parts
    (special, fused dst, src) whose concatenation along dim 1 the slots index.
    """
    x, size, source = batch.x, batch.size, batch.source
    dst_pos, src_pos, dst_slots = _split_positions(x.shape[1], num_special, stride, x.device)
    size_dst, size_src = size[:, dst_pos], size[:, src_pos]
    valid_dst, valid_src = size_dst > 0, size_src > 0
    work = _work_dtype(metric.dtype)
    sim = cosine_similarity(metric[:, dst_pos].to(work), metric[:, src_pos].to(work))
    weights = mame_fusion_weights(sim, tau, valid_dst, valid_src)
    preserved = valid_src & (weights.sum(dim=1) == 0)

    # Size-weighted fusion in the work dtype; only the fused tokens return to the model's dtype. Padding rows
    # may hold anything (NaN * 0 is NaN), so they are zeroed with where. Each term's weight is divided by the
    # dst's new size before it meets a token: the weights of a fused token sum to 1.
    mass = weights * size_src.to(work).unsqueeze(1)  # [B, M, N]
    x_src = x[:, src_pos]
    new_size_dst = size_dst + mass.sum(dim=2).to(size.dtype)
    src_share = _divide_where_positive(mass, new_size_dst.to(work).unsqueeze(-1))
    dst_share = _divide_where_positive(size_dst, new_size_dst).to(work).unsqueeze(-1)
    x_src_real = torch.where(valid_src.unsqueeze(-1), x_src, 0.0).to(work)
    fused = torch.where(valid_dst.unsqueeze(-1), dst_share * x[:, dst_pos].to(work), 0.0) + src_share @ x_src_real

    # Each image's output row is [special, its real dsts, its preserved srcs].
    n_valid_dst = valid_dst.sum(dim=1, keepdim=True)  # [B, 1]
    lengths = num_special + n_valid_dst + preserved.sum(dim=1, keepdim=True)
    dst_slot = torch.where(valid_dst, dst_slots, -1)
    src_slot = torch.where(preserved, num_special + n_valid_dst + preserved.cumsum(dim=1) - 1, -1)
    spec_slot = torch.arange(num_special, device=x.device).expand(x.shape[0], -1)
    slots = torch.cat([spec_slot, dst_slot, src_slot], dim=1)
    parts = [(x[:, :num_special], fused.to(x.dtype), x_src), (size[:, :num_special], new_size_dst, size_src)]
    if source is not None:
        # A source row already sums to its token's size, so it is spread by the weights alone.
        source_src = torch.where(valid_src.unsqueeze(-1), source[:, src_pos], 0.0)
        fused_source = source[:, dst_pos] + weights.to(source.dtype) @ source_src
        parts.append((source[:, :num_special], fused_source, source[:, src_pos]))
    return lengths, slots, parts


def _place(parts: tuple[Tensor, Tensor, Tensor], index: Tensor, total: int) -> Tensor:
    """Scatter the tokens of (special, dst, src) parts [B, T', ...] to flat rows `index` [B, T'] of a zeroed
    [total, ...] tensor; index == total drops a token (into one extra row that is cut off)."""
    values = torch.cat(parts, dim=1).flatten(0, 1)
    out = values.new_zeros(total + 1, *values.shape[1:])
    return out.index_copy_(0, index.flatten(), values)[:total]


def mame_merge(
    batch: TokenBatch, metric: Tensor, tau: Tensor | float, num_special: int, stride: int = 2
) -> tuple[TokenBatch, Tensor]:
    """One MaMe merge step (Algorithm 1 as read by MAME_SPEC.md) on a padded batch.

    metric: [B, T, d] similarity features (the block's keys, mean over heads); tau: [B] thresholds or one for all.
    Returns the merged batch (spec, fused dst, preserved src; compacted and cut to the longest image) and
    the real token count per image [B] (int64, on the CPU).
    """
    if batch.x.shape[1] - num_special < 2:  # at most one non-special token: nothing can merge, order is final
        return batch, (batch.size > 0).sum(dim=1).cpu()
    lengths, slots, parts = _mame_step(batch, metric, tau, num_special, stride)
    lengths_host = lengths.squeeze(1).cpu()  # the one host sync of a merge: the output's length depends on it
    bsz, new_len = batch.x.shape[0], int(lengths_host.max())
    row_start = torch.arange(0, bsz * new_len, new_len, device=slots.device).unsqueeze(1)
    index = torch.where(slots >= 0, row_start + slots, bsz * new_len)
    placed = [_place(p, index, bsz * new_len).unflatten(0, (bsz, new_len)) for p in parts]
    return TokenBatch(*placed), lengths_host


@dataclass(frozen=True)
class PackedBatch:
    """Each image's real tokens back to back, without padding: x [N, C], size [N], source [N, P] or None,
    with the tokens per image on the host (`lengths` [B], int64) and where each image starts on the device
    (`offsets` [B + 1], int64: cu_seqlens)."""

    x: Tensor
    size: Tensor
    source: Tensor | None
    lengths: Tensor
    offsets: Tensor

    @property
    def uniform(self) -> bool:
        """Do all images have the same length (then the packed rows are a [B, L] batch as they are)?"""
        return bool(self.lengths.min() == self.lengths.max())

    @staticmethod
    def from_padded(batch: TokenBatch) -> PackedBatch:
        """A padded batch without padding (every image as long as the tensor) as a packed one."""
        bsz, length = batch.x.shape[:2]
        source = batch.source.flatten(0, 1) if batch.source is not None else None
        offsets = torch.arange(0, (bsz + 1) * length, length, device=batch.x.device)
        return PackedBatch(batch.x.flatten(0, 1), batch.size.flatten(), source,
                           torch.full((bsz,), length, dtype=torch.int64), offsets)

    def padded(self, *extra: Tensor) -> tuple[TokenBatch, ...] | TokenBatch:
        """[B, longest, ...] views or copies: padding rows hold any real token and have size 0. Extra packed
        tensors [N, ...] (a metric) are padded alike and returned after the batch."""
        bsz, longest = self.lengths.numel(), int(self.lengths.max())
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
    batch: PackedBatch, metric: Tensor, tau: Tensor | float, num_special: int, stride: int = 2
) -> PackedBatch:
    """mame_merge on a packed batch (metric [N, d]), returning a packed batch: the same tokens and sizes as
    mame_merge gives, without its padding. One host sync (the new token count)."""
    padded, padded_metric = batch.padded(metric)
    if padded.x.shape[1] - num_special < 2:
        return batch
    lengths, slots, parts = _mame_step(padded, padded_metric, tau, num_special, stride)
    offsets = torch.nn.functional.pad(lengths.squeeze(1).cumsum(0), (1, 0))
    lengths_host = lengths.squeeze(1).cpu()  # the one host sync of a merge: the output's size depends on it
    total = int(lengths_host.sum())
    index = torch.where(slots >= 0, offsets[:-1].unsqueeze(1) + slots, total)
    placed = [_place(p, index, total) for p in parts]
    source = placed[2] if len(placed) > 2 else None
    return PackedBatch(placed[0], placed[1], source, lengths_host, offsets)


def mame_order(batch: TokenBatch, num_special: int, stride: int = 2) -> TokenBatch:
    """What mame_merge returns when nothing merges in an unpadded batch (tau >= 1): the same tokens in the
    order special, destinations, sources. A cheap path that keeps later partitions exactly as mame_merge's."""
    dst_pos, src_pos, _ = _split_positions(batch.x.shape[1], num_special, stride, batch.x.device)
    order = torch.cat([torch.arange(num_special, device=batch.x.device), dst_pos, src_pos])
    source = batch.source[:, order] if batch.source is not None else None
    return TokenBatch(batch.x[:, order], batch.size[:, order], source)


def tome_merge(batch: TokenBatch, metric: Tensor, r: int, num_special: int) -> TokenBatch:
    """ToMe bipartite soft matching (Bolya et al. 2023): merge the r most similar (a, b) pairs per image.

    Alternate non-special tokens go to sets A and B; each A token proposes its most similar B token; the r
    strongest edges merge (size-weighted mean). Output order: special, unmerged A, B. All images in a batch
    have the same length under ToMe, so there is no padding.
    """
    x, size, source = batch.x, batch.size, batch.source
    rest = x.shape[1] - num_special
    r = min(r, rest // 2)
    if r <= 0:
        return batch
    a_pos, b_pos, _ = _split_positions(x.shape[1], num_special, 2, x.device)  # alternate tokens: A, B
    scores = cosine_similarity(metric[:, a_pos], metric[:, b_pos])  # [B, Na, Nb]
    best_score, best_b = scores.max(dim=-1)
    edge_order = best_score.argsort(dim=-1, descending=True)
    merged_a, kept_a = edge_order[:, :r], edge_order[:, r:].sort(dim=-1).values  # keep A's original order
    target_b = best_b.gather(1, merged_a)

    def combine(values: Tensor, weight: Tensor | None) -> Tensor:
        """Sum of (weight * values) of the merged A tokens into their B targets; unmerged A kept."""
        a, b = values[:, a_pos], values[:, b_pos]
        squeeze = a.dim() == 2
        if squeeze:
            a, b = a.unsqueeze(-1), b.unsqueeze(-1)
        w_a = weight[:, a_pos].unsqueeze(-1) if weight is not None else 1
        w_b = weight[:, b_pos].unsqueeze(-1) if weight is not None else 1
        a_w, b_w = a * w_a, b * w_b
        width = a.shape[-1]
        moved = a_w.gather(1, merged_a.unsqueeze(-1).expand(-1, -1, width))
        b_w = b_w.scatter_add(1, target_b.unsqueeze(-1).expand(-1, -1, width), moved)
        kept = a_w.gather(1, kept_a.unsqueeze(-1).expand(-1, -1, width))
        out = torch.cat([kept, b_w], dim=1)
        return out.squeeze(-1) if squeeze else out

    new_size_body = combine(size, None)
    # Each token's weight is its size over the size of the token it ends up in (its B target's new size, or
    # its own when it stays): weights of a merged token sum to 1, so no fp16 partial sum overflows.
    new_size_b = new_size_body[:, -b_pos.numel():]
    end_size_a = size[:, a_pos].scatter(1, merged_a, new_size_b.gather(1, target_b))
    end_size = size.index_copy(1, a_pos, end_size_a).index_copy(1, b_pos, new_size_b)
    x_body = combine(x, (size / end_size).to(x.dtype))
    new_x = torch.cat([x[:, :num_special], x_body], dim=1)
    new_size = torch.cat([size[:, :num_special], new_size_body], dim=1)
    new_source = None
    if source is not None:
        new_source = torch.cat([source[:, :num_special], combine(source, None)], dim=1)
    return TokenBatch(new_x, new_size, new_source)
