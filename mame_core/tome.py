"""ToMe's merge step (Bolya et al., ICLR 2023), bipartite soft matching as the official code does it.

All tokens of an image, special ones included, are split alternately into set a (even positions) and set b
(odd positions). Each a token proposes its most similar b token (cosine of the metric); the r strongest
proposals merge into their b tokens by a size-weighted mean. Special tokens are protected with a score of
-inf: one in set a never proposes (its row), one in set b is never proposed to (its column). At most
(tokens - specials) // 2 merge, so a protected token is never reached.

Output order, as in the official code: with special tokens, [specials, unmerged a in position order, b];
without, [unmerged a in the order of their scores (strongest first), b]. The order matters: the next
block splits its tokens alternately again.

num_special > 1. The official code knows a class token (at position 0, set a: its row is -inf) and a
DeiT distillation token (position 1, set b: its column is -inf) and returns them first. This generalises
that rule to every leading special token (class, distillation, register tokens): each is protected in
whichever set its position puts it, and all come first in their original order. For a class token, and
for a class token with a distillation token, it is exactly the official behaviour; the official code has
no register tokens (it would merge them like patches), and here they are protected like the class token.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .merge import TokenBatch


@functools.lru_cache(maxsize=256)
def _alternate_positions(length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Positions of set a (even) and set b (odd). Cached: the same few lengths recur."""
    pos = torch.arange(length, device=device)
    return pos[0::2], pos[1::2]


def tome_scores(metric: Tensor, num_special: int) -> Tensor:
    """Cosine similarity [B, Na, Nb] of set a to set b in fp32 (so that half-precision keys do not decide
    near-ties by rounding), with -inf on the rows and columns of special tokens. A zero key gives 0."""
    work = metric.to(torch.promote_types(metric.dtype, torch.float32))
    unit = work / work.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(work.dtype).eps)
    a_pos, b_pos = _alternate_positions(metric.shape[1], metric.device)
    scores = unit[:, a_pos] @ unit[:, b_pos].transpose(-1, -2)
    if num_special:
        scores[:, : (num_special + 1) // 2] = float("-inf")  # specials at even positions: never sources
        scores[:, :, : num_special // 2] = float("-inf")  # specials at odd positions: never destinations
    return scores


def tome_merge(batch: TokenBatch, metric: Tensor, r: int, num_special: int) -> TokenBatch:
    """Merge the r most similar (a, b) pairs of every image (see the module docstring for sets and order).

    metric: [B, T, d] (the block's keys, mean over heads). Every image of a ToMe batch has the same length,
    so there is no padding. Fused tokens are computed in fp32 (fp64 for a float64 model) and return to the
    model's dtype; tokens that merge nothing come back bit for bit.
    """
    x, size, source = batch.x, batch.size, batch.source
    length = x.shape[1]
    r = min(r, (length - num_special) // 2)
    if r <= 0:
        return batch
    a_pos, b_pos = _alternate_positions(length, x.device)
    best_score, best_b = tome_scores(metric, num_special).max(dim=-1)  # [B, Na]
    # Stable: equal scores (identical keys) merge in position order, whatever the batch.
    edge_order = best_score.argsort(dim=-1, descending=True, stable=True)
    merged_a, unmerged_a = edge_order[:, :r], edge_order[:, r:]
    if num_special:
        # Specials first, as the official code does for its class token; they have the lowest positions,
        # so after this sort the special a tokens lead unmerged_a.
        unmerged_a = unmerged_a.sort(dim=-1).values
    target_b = best_b.gather(1, merged_a)  # [B, r]

    def take(values: Tensor, index: Tensor) -> Tensor:
        return values.gather(1, index.view(*index.shape, *([1] * (values.dim() - 2))).expand(
            -1, -1, *values.shape[2:]))

    def add_into_b(b_values: Tensor, moved: Tensor) -> Tensor:
        index = target_b.view(*target_b.shape, *([1] * (moved.dim() - 2))).expand_as(moved)
        return b_values.scatter_add(1, index, moved)

    size_a, size_b = size[:, a_pos], size[:, b_pos]
    size_moved = take(size_a, merged_a)
    new_size_b = add_into_b(size_b, size_moved)

    # Size-weighted mean with weights normalised first (size / the fused token's size): in any precision no
    # partial sum exceeds the mean itself. b tokens nothing merges into get weight exactly 1.
    work = torch.promote_types(x.dtype, torch.float32)
    share_b = (size_b / new_size_b).to(work).unsqueeze(-1)
    share_moved = (size_moved / take(new_size_b, target_b)).to(work).unsqueeze(-1)
    x_a, x_b = x[:, a_pos], x[:, b_pos]
    fused_b = add_into_b(x_b.to(work) * share_b, take(x_a, merged_a).to(work) * share_moved).to(x.dtype)

    a_special, b_special = (num_special + 1) // 2, num_special // 2

    def assemble(values: Tensor, kept_a: Tensor, new_b: Tensor) -> Tensor:
        """[specials, unmerged a, b]: the special a tokens lead kept_a (sorted), the special b tokens new_b."""
        if not num_special:
            return torch.cat([kept_a, new_b], dim=1)
        return torch.cat([values[:, :num_special], kept_a[:, a_special:], new_b[:, b_special:]], dim=1)

    new_x = assemble(x, take(x_a, unmerged_a), fused_b)
    new_size = assemble(size, take(size_a, unmerged_a), new_size_b)
    new_source = None
    if source is not None:
        # A source row sums to its token's size: merging adds the rows.
        source_a = source[:, a_pos]
        new_source_b = add_into_b(source[:, b_pos], take(source_a, merged_a))
        new_source = assemble(source, take(source_a, unmerged_a), new_source_b)
    return TokenBatch(new_x, new_size, new_source)
