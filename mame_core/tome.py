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

import torch
from torch import Tensor

from .merge import TokenBatch, as_dtype, work_dtype


def tome_scores(metric: Tensor, num_special: int) -> Tensor:
    """Cosine similarity [B, Na, Nb] of set a to set b in fp32 (so that half-precision keys do not decide
    near-ties by rounding), with -inf on the rows and columns of special tokens. A zero key gives 0."""
    work = as_dtype(metric, work_dtype(metric.dtype))
    unit = work / work.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(work.dtype).eps)
    scores = unit[:, 0::2] @ unit[:, 1::2].transpose(-1, -2)
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
    best_score, best_b = tome_scores(metric, num_special).max(dim=-1)  # [B, Na]
    # Stable: equal scores (identical keys) merge in position order, whatever the batch.
    edge_order = best_score.argsort(dim=-1, descending=True, stable=True)
    merged_a, unmerged_a = edge_order[:, :r], edge_order[:, r:]
    if num_special:
        # Specials first, as the official code does for its class token; they have the lowest positions,
        # so after this sort the special a tokens lead unmerged_a.
        unmerged_a = unmerged_a.sort(dim=-1).values
    target_b = best_b.gather(1, merged_a)  # [B, r]

    def along(index: Tensor, values: Tensor) -> Tensor:
        """index [B, n] spread over the trailing dimension of values [B, T, C]."""
        return index.unsqueeze(-1).expand(-1, -1, values.shape[-1])

    size_a, size_b = size[:, 0::2], size[:, 1::2]
    size_moved = size_a.gather(1, merged_a)
    new_size_b = size_b.scatter_add(1, target_b, size_moved)

    # Size-weighted mean with weights normalised first (size / the fused token's size): in any precision no
    # partial sum exceeds the mean itself. b tokens nothing merges into get weight exactly 1.
    work = work_dtype(x.dtype)
    share_b = as_dtype(size_b / new_size_b, work).unsqueeze(-1)
    share_moved = as_dtype(size_moved / new_size_b.gather(1, target_b), work).unsqueeze(-1)
    x_a, x_b = x[:, 0::2], x[:, 1::2]
    moved = as_dtype(x_a.gather(1, along(merged_a, x)), work) * share_moved
    fused_b = (as_dtype(x_b, work) * share_b).scatter_add_(1, along(target_b, moved), moved)
    fused_b = as_dtype(fused_b, x.dtype)

    a_special, b_special = (num_special + 1) // 2, num_special // 2

    def assemble(values: Tensor, kept_a: Tensor, new_b: Tensor) -> Tensor:
        """[specials, unmerged a, b]; the special a tokens lead kept_a (sorted), the special b ones new_b."""
        if not num_special:
            return torch.cat([kept_a, new_b], dim=1)
        return torch.cat([values[:, :num_special], kept_a[:, a_special:], new_b[:, b_special:]], dim=1)

    new_x = assemble(x, x_a.gather(1, along(unmerged_a, x)), fused_b)
    new_size = assemble(size, size_a.gather(1, unmerged_a), new_size_b)
    new_source = None
    if source is not None:
        # A source row sums to its token's size: merging adds the rows.
        source_a = source[:, 0::2]
        moved_source = source_a.gather(1, along(merged_a, source))
        new_source_b = source[:, 1::2].scatter_add(1, along(target_b, source), moved_source)
        new_source = assemble(source, source_a.gather(1, along(unmerged_a, source)), new_source_b)
    return TokenBatch(new_x, new_size, new_source)
