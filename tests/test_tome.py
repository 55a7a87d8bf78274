"""ToMe against a literal transcription of the official algorithm (facebookresearch/ToMe, tome/merge.py
`bipartite_soft_matching`, `merge_wavg`, and the timm patch's block and proportional attention)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import content_images, tiny_vit

from mame_core import MergeSettings, patch_vit
from mame_core.merge import TokenBatch
from mame_core.tome import tome_merge

# ---- The official algorithm, written out as the official code has it (float32, no batching tricks). ----

def official_bipartite_soft_matching(metric, r, class_token=False, distill_token=False):
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return lambda x, mode=None: x
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def official_merge_wavg(merge, x, size=None):
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def official_tome_vit(model, images, r):
    """The official timm patch's forward (ToMeBlock, ToMeAttention with proportional attention) on a timm
    VisionTransformer: returns logits and tokens after each block. Pooling of an average-pooling head is the
    size-weighted mean (MAME_SPEC section 2; the official repo leaves timm's head, a plain mean, alone)."""
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size, counts = None, []
    for blk in model.blocks:
        attn = blk.attn
        bsz, n, c = x.shape
        qkv = attn.qkv(blk.norm1(x)).reshape(bsz, n, 3, attn.num_heads, c // attn.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(bsz, n, c)
        x = x + attn.proj(out)
        merge = official_bipartite_soft_matching(k.mean(1), r, class_token, distill_token)
        x, size = official_merge_wavg(merge, x, size)
        x = x + blk.mlp(blk.norm2(x))
        counts.append(x.shape[1])
    x = model.norm(x)
    if distill_token:
        return (model.head(x[:, 0]) + model.head_dist(x[:, 1])) / 2, counts
    if model.global_pool == "token":
        pooled = x[:, 0]
    else:
        body, weight = x[:, model.num_prefix_tokens:], size[:, model.num_prefix_tokens:]
        pooled = (body * weight).sum(dim=1) / weight.sum(dim=1)
    return model.head(model.fc_norm(pooled)), counts


# ---- The patch against it. ----

SHAPES = {
    "cls": {"arch": "vit_tiny_patch16_224"},
    "no-cls avg": {"arch": "vit_tiny_patch16_224", "class_token": False, "global_pool": "avg"},
    "cls avg": {"arch": "vit_tiny_patch16_224", "global_pool": "avg"},
    "deit-distilled": {"arch": "deit_tiny_distilled_patch16_224"},
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", [1, 5, 13, 20, 100])
def test_patch_equals_the_official_algorithm(shape, r):
    model = tiny_vit(seed=1, **SHAPES[shape])
    noise = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(r))
    images = torch.cat([content_images(), noise])
    with torch.inference_mode():
        expected, counts = official_tome_vit(model, images, r)
        result = patch_vit(model)(images, MergeSettings(method="tome", r=r))
    assert result.tokens.tolist() == [counts] * len(images)
    assert (result.logits - expected).abs().max().item() <= 1e-4


def test_token_counts_follow_the_official_limit():
    # (tokens - protected) // 2 at most per block: 65 tokens with a class token, 64 without.
    for shape, expected in [("cls", [45, 25, 13, 7]), ("no-cls avg", [44, 24, 12, 6]),
                            ("deit-distilled", [46, 26, 14, 8])]:
        vit = patch_vit(tiny_vit(**SHAPES[shape]))
        with torch.inference_mode():
            tokens = vit(content_images(), MergeSettings(method="tome", r=20)).tokens
        assert tokens[0].tolist() == expected, shape


def test_the_class_token_takes_part_in_the_split():
    # Tokens: cls, then p1..p4. Official sets: a = cls, p2, p4; b = p1, p3. The non-special split of old
    # (a = p1, p3; b = p2, p4) would merge p1 into p2; here p2 (its best: p1) merges into p1.
    metric = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.05], [-1.0, 0.0], [0.0, -1.0]]])
    x = torch.tensor([[[100.0], [1.0], [3.0], [7.0], [9.0]]])
    out = tome_merge(TokenBatch(x, torch.ones(1, 5)), metric, r=1, num_special=1)
    # [cls, unmerged a (p4), b (p1 + p2, p3)]
    assert out.x[0, :, 0].tolist() == [100.0, 9.0, 2.0, 7.0]
    assert out.size[0].tolist() == [1.0, 1.0, 2.0, 1.0]


def test_without_special_tokens_unmerged_a_keep_score_order():
    # a = t0, t2, t4 with best scores 0.2, 0.9, 0.5 to b = t1, t3; r = 1 merges t2; t4 (0.5) precedes
    # t0 (0.2).
    b1, b3 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])

    def at(cos):
        return torch.tensor([cos, -math.sqrt(1 - cos * cos)])

    metric = torch.stack([at(0.2), b1, at(0.9), b3, at(0.5)])[None]
    x = torch.arange(5.0).view(1, 5, 1)
    out = tome_merge(TokenBatch(x, torch.ones(1, 5)), metric, r=1, num_special=0)
    assert out.x[0, :, 0].tolist() == [4.0, 0.0, 1.5, 3.0]
    reference = official_bipartite_soft_matching(metric, 1)(x)
    assert torch.equal(out.x, reference)


@pytest.mark.parametrize("num_special", [0, 1, 2])
@pytest.mark.parametrize("length", [9, 10, 17, 30])
def test_merge_step_equals_the_official_step_with_sizes_and_sources(num_special, length):
    gen = torch.Generator().manual_seed(length * 3 + num_special)
    x, metric = torch.randn(3, length, 6, generator=gen), torch.randn(3, length, 5, generator=gen)
    size = torch.randint(1, 5, (3, length), generator=gen).float()
    source = torch.eye(length).expand(3, -1, -1) * size.unsqueeze(-1)  # rows sum to the sizes
    for r in (1, 3, length):
        out = tome_merge(TokenBatch(x, size, source), metric, r, num_special)
        merge = official_bipartite_soft_matching(metric, r, num_special >= 1, num_special == 2)
        ref_x, ref_size = official_merge_wavg(merge, x, size.unsqueeze(-1))
        torch.testing.assert_close(out.x, ref_x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.size, ref_size.squeeze(-1), atol=0, rtol=0)
        torch.testing.assert_close(out.source, merge(source, mode="sum"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("r,expected", [(1, 15), (4, 12), (8, 8), (20, 8)])
def test_removes_exactly_r_until_half_and_conserves_sizes(r, expected):
    gen = torch.Generator().manual_seed(r)
    x, metric = torch.randn(2, 17, 4, generator=gen), torch.randn(2, 17, 3, generator=gen)
    out = tome_merge(TokenBatch(x, torch.ones(2, 17)), metric, r, num_special=1)
    assert out.x.shape[1] == 1 + expected
    assert torch.equal(out.x[:, 0], x[:, 0])
    torch.testing.assert_close(out.size.sum(dim=1), torch.full((2,), 17.0))


@pytest.mark.parametrize("num_special", [3, 4, 5])
def test_every_special_token_is_protected_and_first(num_special):
    # Register tokens (beyond the official class and distillation tokens): identical keys everywhere, so
    # any unprotected token would be a candidate; r past the limit merges as many as possible.
    length = num_special + 12
    x = torch.randn(2, length, 3)
    out = tome_merge(TokenBatch(x, torch.ones(2, length)), torch.ones(2, length, 4), 100, num_special)
    assert out.x.shape[1] == num_special + 6
    assert torch.equal(out.x[:, :num_special], x[:, :num_special])
    assert (out.size[:, :num_special] == 1).all() and (out.size.sum(dim=1) == length).all()


def test_weighted_average():
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 1.0]]])
    x = torch.tensor([[[2.0], [4.0], [8.0], [100.0]]])
    size = torch.tensor([[1.0, 3.0, 1.0, 1.0]])
    out = tome_merge(TokenBatch(x, size), metric, r=1, num_special=0)
    # a = tokens 0, 2; b = tokens 1, 3. Token 0 has the strongest edge (to 1): (2*1 + 4*3) / 4 = 3.5.
    assert out.size.tolist() == [[1.0, 4.0, 1.0]]
    assert out.x[0, :, 0].tolist() == [8.0, 3.5, 100.0]


def test_fp16_fusion_of_big_tokens_does_not_overflow():
    # size x value (40,000, then 80,000 once fused) passes fp16's 65,504; the size-weighted mean does not.
    x = torch.full((1, 9, 4), 1000.0, dtype=torch.float16)
    size = torch.full((1, 9), 40.0)
    size[0, 0] = 1
    out = tome_merge(TokenBatch(x, size), torch.ones(1, 9, 8, dtype=torch.float16), 3, num_special=1)
    assert out.x.dtype == torch.float16 and out.size.sum().item() == size.sum().item()
    assert torch.equal(out.x, torch.full_like(out.x, 1000.0))


def test_fp16_decisions_are_the_fp32_ones():
    # The scores are taken in fp32 from the fp16 keys, so the model's precision does not reorder the edges.
    gen = torch.Generator().manual_seed(0)
    x, metric = torch.randn(4, 33, 8, generator=gen), torch.randn(4, 33, 16, generator=gen)
    half = tome_merge(TokenBatch(x.half(), torch.ones(4, 33)), metric.half(), 10, 1)
    full = tome_merge(TokenBatch(x.half().float(), torch.ones(4, 33)), metric.half().float(), 10, 1)
    assert torch.equal(half.size, full.size)
    torch.testing.assert_close(half.x.float(), full.x, atol=1e-3, rtol=1e-3)
