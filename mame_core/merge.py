"""MaMe and ToMe merge steps as pure tensor functions (see MAME_SPEC.md).

A batch of token sequences is a `TokenBatch`: tokens [B, T, C], sizes [B, T] (how many original patches
each token stands for; 0 marks padding) and, optionally, a source map [B, T, P] (which original patches
each token stands for). The first `num_special` tokens of every image (class, register, distillation
tokens) are never merged. Real tokens always sit at the front of each row; padding fills the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenBatch:
    x: Tensor  # [B, T, C]
    size: Tensor  # [B, T] float, 0 for padding
    source: Tensor | None = None  # [B, T, num_patches] or None


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den > 0, else 0 (no eps: an eps shifts weights when den is tiny)."""
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), torch.zeros_like(num))


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """[B, M, d] x [B, N, d] -> [B, M, N] cosine similarities in [-1, 1]; a zero vector gives 0."""
    tiny = torch.finfo(a.dtype).eps
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(tiny)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(tiny)
    return (a @ b.transpose(-1, -2)).clamp(-1.0, 1.0)


def mame_fusion_weights(sim: Tensor, tau: Tensor | float, valid_dst: Tensor, valid_src: Tensor) -> Tensor:
    """Steps 3-6 of the spec: thresholded, pruned and renormalised fusion weights WF [B, M, N].

    Every column (src) that merges sums to exactly 1; a column of zeros means the src is preserved.
    """
    excess = torch.relu(sim - (tau.to(sim.dtype).view(-1, 1, 1) if isinstance(tau, Tensor) else tau))
    pair_ok = valid_dst.unsqueeze(2) & valid_src.unsqueeze(1)
    excess = torch.where(pair_ok, excess, torch.zeros_like(excess))
    colsum = excess.sum(dim=1, keepdim=True)
    positive = excess > 0
    count = positive.sum(dim=1, keepdim=True).to(excess.dtype)
    # Keep a dst if its weight reaches the mean positive weight of its column (zeta_j); compared on St so that
    # one candidate, or several equal ones, are kept regardless of float rounding.
    keep = positive & (excess * count >= colsum * (1 - 1e-5))
    kept = torch.where(keep, excess, torch.zeros_like(excess))
    return _safe_divide(kept, kept.sum(dim=1, keepdim=True))


def _split_positions(num_tokens: int, stride: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Positions (among non-special tokens) of destinations (every `stride`-th) and sources (the rest)."""
    pos = torch.arange(num_tokens, device=device)
    is_dst = pos % stride == 0
    return pos[is_dst], pos[~is_dst]


def mame_merge(
    batch: TokenBatch, metric: Tensor, tau: Tensor | float, num_special: int, stride: int = 2
) -> tuple[TokenBatch, Tensor]:
    """One MaMe merge step (Algorithm 1 as read by MAME_SPEC.md) on a padded batch.

    metric: [B, T, d] similarity features (the block's keys, mean over heads); tau: [B] thresholds or one for all.
    Returns the merged batch (spec, fused dst, preserved src; compacted and cut to the longest image) and
    the real token count per image [B] (int64, on the CPU).
    """
    x, size, source = batch.x, batch.size, batch.source
    bsz = x.shape[0]
    special = slice(0, num_special)
    rest = x.shape[1] - num_special
    dst_pos, src_pos = _split_positions(rest, stride, x.device)
    dst_pos, src_pos = dst_pos + num_special, src_pos + num_special
    n_dst, n_src = dst_pos.numel(), src_pos.numel()
    if n_src == 0:  # at most one non-special token: nothing can merge, and the order is already final
        return batch, (size > 0).sum(dim=1).cpu()

    size_dst, size_src = size[:, dst_pos], size[:, src_pos]
    valid_dst, valid_src = size_dst > 0, size_src > 0

    weights = mame_fusion_weights(cosine_similarity(metric[:, dst_pos], metric[:, src_pos]), tau, valid_dst, valid_src)
    merged = weights.sum(dim=1) > 0  # [B, N]
    preserved = valid_src & ~merged

    # Size-weighted fusion; padding rows are zeroed with where (they may hold anything, NaN * 0 is NaN).
    mass = weights * size_src.to(weights.dtype).unsqueeze(1)  # [B, M, N]
    x_dst = torch.where(valid_dst.unsqueeze(-1), x[:, dst_pos], torch.zeros((), dtype=x.dtype, device=x.device))
    x_src = torch.where(valid_src.unsqueeze(-1), x[:, src_pos], torch.zeros((), dtype=x.dtype, device=x.device))
    new_size_dst = size_dst + mass.sum(dim=2).to(size.dtype)
    fused = size_dst.to(x.dtype).unsqueeze(-1) * x_dst + mass.to(x.dtype) @ x_src
    fused = _safe_divide(fused, new_size_dst.to(x.dtype).unsqueeze(-1))
    fused_source = None
    if source is not None:
        # A source row already sums to its token's size, so it is spread by the weights alone.
        fused_source = source[:, dst_pos] + weights.to(source.dtype) @ torch.where(
            valid_src.unsqueeze(-1), source[:, src_pos], torch.zeros((), dtype=source.dtype, device=x.device)
        )

    # Compaction: each image's row becomes [special, its real dsts, its preserved srcs, padding].
    n_valid_dst = valid_dst.sum(dim=1)  # [B]
    n_preserved = preserved.sum(dim=1)
    lengths = num_special + n_valid_dst + n_preserved
    lengths_host = lengths.cpu()  # the one host sync of a merge: the output's length depends on it
    new_len = int(lengths_host.max()) if bsz else num_special
    order = torch.arange(n_src, device=x.device).expand(bsz, n_src)
    preserved_first = torch.argsort(torch.where(preserved, order, order + n_src), dim=1)  # stable by construction

    slot = torch.arange(new_len - num_special, device=x.device).expand(bsz, -1)  # slot after the special tokens
    in_dst = slot < n_valid_dst.unsqueeze(1)
    real = slot < lengths.unsqueeze(1) - num_special
    # Index into cat(fused dst, src): a dst slot reads fused[slot], a preserved slot the next preserved src.
    pres_slot = (slot - n_valid_dst.unsqueeze(1)).clamp(0, n_src - 1)
    pick = torch.where(in_dst, slot.clamp(max=n_dst - 1), n_dst + preserved_first.gather(1, pres_slot))

    def compact(dst_part: Tensor, src_part: Tensor, spec_part: Tensor) -> Tensor:
        pool = torch.cat([dst_part, src_part], dim=1)
        idx = pick if pool.dim() == 2 else pick.unsqueeze(-1).expand(-1, -1, pool.shape[-1])
        body = pool.gather(1, idx)
        mask = real if body.dim() == 2 else real.unsqueeze(-1)
        body = torch.where(mask, body, torch.zeros((), dtype=body.dtype, device=body.device))
        return torch.cat([spec_part, body], dim=1)

    new_x = compact(fused, x_src, x[:, special])
    new_size = compact(new_size_dst, torch.where(valid_src, size_src, torch.zeros_like(size_src)), size[:, special])
    new_source = None
    if source is not None:
        new_source = compact(fused_source, source[:, src_pos], source[:, special])
    return TokenBatch(new_x, new_size, new_source), lengths_host


def mame_order(batch: TokenBatch, num_special: int, stride: int = 2) -> TokenBatch:
    """What mame_merge returns when nothing merges in an unpadded batch (tau >= 1): the same tokens in the
    order special, destinations, sources. A cheap path that keeps later partitions exactly as mame_merge's."""
    rest = batch.x.shape[1] - num_special
    dst_pos, src_pos = _split_positions(rest, stride, batch.x.device)
    order = torch.cat([torch.arange(num_special, device=batch.x.device), dst_pos + num_special, src_pos + num_special])
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
    a_pos = torch.arange(num_special, x.shape[1], 2, device=x.device)
    b_pos = torch.arange(num_special + 1, x.shape[1], 2, device=x.device)
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
    weight = size.to(x.dtype)
    x_body = combine(x, weight) / new_size_body.to(x.dtype).unsqueeze(-1)
    new_x = torch.cat([x[:, :num_special], x_body], dim=1)
    new_size = torch.cat([size[:, :num_special], new_size_body], dim=1)
    new_source = None
    if source is not None:
        new_source = torch.cat([source[:, :num_special], combine(source, None)], dim=1)
    return TokenBatch(new_x, new_size, new_source)
