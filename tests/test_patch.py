"""The timm patch: equivalence with the unpatched model, batch invariance, token counts, settings."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from conftest import content_images, tiny_vit

from mame_core import MergeSettings, patch_vit
from mame_core.merge import TokenBatch, mame_merge
from mame_core.patch import MergingViT

SHAPES = {
    "cls": {"arch": "vit_tiny_patch16_224"},
    "registers": {"arch": "vit_tiny_patch16_224", "reg_tokens": 4, "no_embed_class": True},
    "avg-pool": {"arch": "vit_tiny_patch16_224", "class_token": False, "global_pool": "avg"},
    "deit-distilled": {"arch": "deit_tiny_distilled_patch16_224"},
    "cls+avg+qknorm": {"arch": "vit_tiny_patch16_224", "global_pool": "avg", "qk_norm": True},
}
MAME = MergeSettings(method="mame", tau=0.7, blocks=3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("settings", [MergeSettings(), MergeSettings(method="mame", tau=1.0),
                                      MergeSettings(method="mame", tau=1.5)])
def test_no_merge_equals_unpatched_timm(shape, settings, images):
    model = tiny_vit(**SHAPES[shape])
    with torch.inference_mode():
        expected = model(images)
        result = patch_vit(model)(images, settings)
    assert (result.logits - expected).abs().max().item() <= 1e-5
    assert (result.tokens == result.input_tokens).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("settings", [MAME, MergeSettings(method="tome", r=6)])
def test_batch_invariance(shape, settings, images):
    vit = patch_vit(tiny_vit(**SHAPES[shape]))
    with torch.inference_mode():
        together = vit(images, settings)
        alone = [vit(images[i:i + 1], settings) for i in range(len(images))]
    for i, single in enumerate(alone):
        assert (together.logits[i] - single.logits[0]).abs().max().item() <= 1e-4
        assert torch.equal(together.tokens[i], single.tokens[0])
        assert together.gflops[i].item() == pytest.approx(single.gflops[0].item())
    if settings.method == "mame":
        finals = together.tokens[:, -1].tolist()
        assert len(set(finals)) >= 3, f"the images should merge very differently, got final counts {finals}"


def test_per_image_tau_equals_separate_runs(images):
    vit = patch_vit(tiny_vit())
    taus = [1.0, 0.8, 0.6, 0.3]
    with torch.inference_mode():
        mixed = vit(images, MAME, tau=torch.tensor(taus))
        for i, t in enumerate(taus):
            single = vit(images[i:i + 1], MergeSettings(method="mame", tau=t, blocks=3))
            assert (mixed.logits[i] - single.logits[0]).abs().max().item() <= 1e-4
            assert torch.equal(mixed.tokens[i], single.tokens[0])


def test_token_counts_per_block_and_lower_tau_keeps_fewer(images):
    vit = patch_vit(tiny_vit())
    after_first, finals = [], []
    with torch.inference_mode():
        for tau in (1.0, 0.9, 0.8, 0.7, 0.5, 0.3):
            result = vit(images, MergeSettings(method="mame", tau=tau, blocks=3))
            assert result.tokens.shape == (4, 4)
            # Merging happens in the first 3 blocks only; the counts never grow.
            assert (result.tokens[:, 3] == result.tokens[:, 2]).all()
            assert (result.tokens[:, 1:] <= result.tokens[:, :-1]).all()
            after_first.append(result.tokens[:, 0])
            finals.append(result.tokens[:, -1])
    # The first merge sees the same tokens at every tau, so a lower tau never keeps more there. Later blocks
    # see different partitions (an earlier merge shifts which tokens are destinations), so final counts are
    # only monotone in trend: a lower tau can keep a token or two more at the end (seen: 15 vs 16 tokens).
    first = torch.stack(after_first)
    assert (first[1:] <= first[:-1]).all(), first
    stacked = torch.stack(finals)
    assert (stacked[-1] <= stacked[0]).all() and stacked[-1].sum() < stacked[0].sum()


def test_tome_counts_and_flops(images):
    vit = patch_vit(tiny_vit())
    with torch.inference_mode():
        result = vit(images, MergeSettings(method="tome", r=20))
        plain = vit(images)
    # 65 tokens: 64 patches -> 44 -> 24 -> 12 (50 % limit: 24 // 2) -> 6
    assert result.tokens[0].tolist() == [45, 25, 13, 7]
    assert (result.gflops < plain.gflops).all()


def test_source_map_partitions_patches(images):
    vit = patch_vit(tiny_vit())
    with torch.inference_mode():
        result = vit(images, MAME, return_source=True)
    assert len(result.sources) == 4
    for block, source in enumerate(result.sources):
        torch.testing.assert_close(source.sum(dim=1), torch.ones(4, vit.num_patches))
        assert source.shape[1] == result.tokens[:, block].max()


def test_settings_validation():
    with pytest.raises(ValueError, match="unknown merge setting"):
        MergeSettings.from_dict({"method": "mame", "threshold": 0.9})
    with pytest.raises(ValueError, match="method"):
        MergeSettings(method="fast")
    with pytest.raises(ValueError, match="r >= 1"):
        MergeSettings(method="tome")
    with pytest.raises(ValueError, match="tau"):
        MergeSettings(method="mame", tau=float("nan"))
    with pytest.raises(ValueError, match="one value per merging block"):
        MergeSettings(method="mame", tau=(0.9, 0.8), blocks=3)
    # Settings the method does not use were silently ignored: {tau: 0.9} alone served the unmerged model.
    with pytest.raises(ValueError, match="method 'none' does not use tau, blocks"):
        MergeSettings.from_dict({"tau": 0.9, "blocks": 3})
    with pytest.raises(ValueError, match="method 'tome' does not use tau"):
        MergeSettings(method="tome", r=2, tau=(0.9, 0.8))
    with pytest.raises(ValueError, match="method 'mame' does not use r"):
        MergeSettings(method="mame", tau=0.9, r=4)
    with pytest.raises(ValueError, match="prop_attn must be true or false"):
        MergeSettings.from_dict({"method": "mame", "tau": 0.9, "prop_attn": "false"})
    per_block = MergeSettings.from_dict({"method": "mame", "tau": [0.9, 0.8]})
    assert per_block.merge_blocks(12) == 2 and per_block.tau_at(1) == 0.8
    assert MergeSettings(method="mame", tau=0.9).merge_blocks(12) == 8
    assert MergeSettings(method="tome", r=8).merge_blocks(12) == 12
    from_dict = MergeSettings.from_dict({"method": "mame", "tau": 1})
    assert hash(from_dict) == hash(MergeSettings(method="mame", tau=1.0))


def test_unsupported_models_are_refused():
    with pytest.raises(TypeError, match="VisionTransformer"):
        patch_vit(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="map"):
        patch_vit(tiny_vit(global_pool="map"))
    # Per-token outputs would come padded, with rows that depend on the batch; dynamic sizes break token
    # counts.
    with pytest.raises(TypeError, match="per-token"):
        patch_vit(tiny_vit(global_pool=""))
    with pytest.raises(TypeError, match="dynamic_img_size"):
        patch_vit(tiny_vit(dynamic_img_size=True))


def test_per_image_tau_is_the_scalar_threshold_in_float64_and_checked(images):
    # Keys at cosine 0.89999999: a float32 copy of tau = 0.9 (0.89999998) would merge what tau = 0.9 keeps.
    cos = 0.89999999
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [cos, math.sqrt(1 - cos * cos)]]], dtype=torch.float64)
    batch = TokenBatch(torch.randn(1, 3, 4, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))
    per_image = MergingViT._tau_tensor([0.9], 1, torch.device("cpu"))
    per_image_lengths = mame_merge(batch, keys, per_image, 1)[1].tolist()
    assert per_image_lengths == mame_merge(batch, keys, 0.9, 1)[1].tolist() == [3]
    vit = patch_vit(tiny_vit().double())
    settings = MergeSettings(method="mame", tau=0.9, blocks=3)
    with torch.inference_mode():
        x = images[:2].double()
        with pytest.raises(ValueError, match="finite"):
            vit(x, settings, tau=[float("nan"), 0.5])
        with pytest.raises(ValueError, match=">= -1"):
            vit(x, settings, tau=[-5.0, 0.5])


@pytest.mark.slow
def test_vit_base_unmerged_equivalence_invariance_and_flops():
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    vit = patch_vit(model)
    images = torch.nn.functional.interpolate(content_images(), size=224)
    with torch.inference_mode():
        expected = model(images)
        unmerged = vit(images, MergeSettings(method="mame", tau=1.0))
        merged = vit(images, MergeSettings(method="mame", tau=0.8))
        alone = vit(images[2:3], MergeSettings(method="mame", tau=0.8))
    assert (unmerged.logits - expected).abs().max().item() <= 1e-5
    assert (merged.logits[2] - alone.logits[0]).abs().max().item() <= 1e-4
    assert torch.equal(merged.tokens[2], alone.tokens[0])
    # fvcore counts 17.6 G multiply-accumulates for ViT-B/16 at 224.
    plain = vit(images[:1])
    assert plain.gflops.item() == pytest.approx(17.6, rel=0.01)
    # Images that lost tokens cost less; one that merged nothing pays the similarity products (< 1 %).
    shrunk = merged.tokens[:, -1] < merged.input_tokens
    assert shrunk.any() and (merged.gflops[shrunk] < unmerged.gflops[shrunk]).all()
    assert (merged.gflops[~shrunk] <= unmerged.gflops[~shrunk] * 1.01).all()


@pytest.mark.parametrize("carrier", ["channels", "masks", "none"])
@pytest.mark.parametrize("head_dim", [16, 13])
@pytest.mark.parametrize("lengths", [[7, 3, 5, 1], [5, 5, 5]])
def test_packed_attention_equals_per_image_additive_bias(carrier, head_dim, lengths):
    # The key bias log(size) rides in extra head channels (CUDA) or in SDPA masks (elsewhere); without a
    # bias (nothing merged, or proportional attention off) attention is plain.
    from mame_core.patch import _attend, _Layout

    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(sum(lengths), 3, 2, head_dim, generator=gen)
    size = torch.randint(1, 6, (sum(lengths),), generator=gen).float()
    scale = head_dim ** -0.5
    layout = _Layout(lengths, bias_size=None if carrier == "none" else size, channels=carrier == "channels")
    channels = layout.bias_channels(2, head_dim, scale, qkv.dtype)
    assert (channels is not None) == (carrier == "channels")
    packed = torch.cat([qkv, channels], dim=-1) if channels is not None else qkv
    got = _attend(packed, layout, scale)[..., :head_dim]
    got = got.reshape(qkv.shape[0], 2, head_dim)  # leading dims [B, L] when all images are as long
    start = 0
    for n in lengths:  # each image alone: its own keys only, log(size) added to every key's logit
        q, k, v = qkv[start:start + n].permute(1, 2, 0, 3)
        bias = size[start:start + n].log() if carrier != "none" else torch.zeros(n)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(n, n))
        torch.testing.assert_close(got[start:start + n], expected.transpose(0, 1), atol=1e-5, rtol=1e-5)
        start += n


def test_blocks_count_merging_blocks_from_one():
    # blocks = how many leading blocks merge (MAME_SPEC section 2); merging in none is method "none".
    for bad in (0, -1):
        with pytest.raises(ValueError, match="blocks must be an integer >= 1"):
            MergeSettings.from_dict({"method": "mame", "tau": 0.9, "blocks": bad})
    with pytest.raises(ValueError, match="at least one value"):
        MergeSettings.from_dict({"method": "mame", "tau": []})
    assert MergeSettings.from_dict({"method": "mame", "tau": 0.9, "blocks": 1}).merge_blocks(12) == 1


def test_check_depth_refuses_blocks_the_model_lacks():
    MergeSettings(method="mame", tau=0.9, blocks=4).check_depth(4)
    MergeSettings(method="mame", tau=0.9).check_depth(4)  # the default, 8, is cut to a shallower model
    MergeSettings(method="tome", r=2).check_depth(4)
    with pytest.raises(ValueError, match="first 5 blocks, but the model has only 4 blocks"):
        MergeSettings(method="mame", tau=0.9, blocks=5).check_depth(4)
    with pytest.raises(ValueError, match="first 5 blocks"):
        MergeSettings(method="mame", tau=(0.9,) * 5).check_depth(4)
    with pytest.raises(ValueError, match="first 99 blocks"):
        MergeSettings(method="tome", r=2, blocks=99).check_depth(4)


def _linear_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) == "aten.addmm")


def test_cost_follows_the_sum_of_tokens_not_the_longest_image(images, monkeypatch):
    # One image keeps every token (tau 1) while the others merge: attention (query x key pairs, summed over
    # the SDPA calls) and the per-token layers of the batch cost what the images cost alone.
    pairs: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(q, k, v, **kwargs):
        pairs.append(q.shape[:-2].numel() * q.shape[-2] * k.shape[-2])
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    vit = patch_vit(tiny_vit())
    taus = [1.0, 0.6, 0.6, 0.6]

    def cost(i: slice) -> tuple[int, int]:
        pairs.clear()
        linear = _linear_flops(lambda: vit(images[i], MAME, tau=torch.tensor(taus[i])))
        return sum(pairs), linear

    with torch.inference_mode():
        mixed = vit(images, MAME, tau=torch.tensor(taus))
        batch = cost(slice(0, 4))
        alone = [cost(slice(i, i + 1)) for i in range(4)]
    assert (mixed.tokens[0] == vit.input_tokens).all() and (mixed.tokens[1:, -1] < vit.input_tokens).all()
    assert batch[0] > 0 and batch[1] > 0
    assert batch == (sum(a[0] for a in alone), sum(a[1] for a in alone))


def test_a_nan_image_leaves_the_others_of_its_batch_untouched(images):
    # Padding rows of the merge repeat tokens of their own image only: a NaN image cannot leak into others.
    vit = patch_vit(tiny_vit())
    bad = images.clone()
    bad[0] = float("nan")
    taus = torch.tensor([0.6, 0.6, 1.0, 0.6])  # a long image beside shorter ones: every merge pads
    with torch.inference_mode():
        together = vit(bad, MAME, tau=taus)
        good = vit(images[1:], MAME, tau=taus[1:])
    assert together.logits[0].isnan().all()
    torch.testing.assert_close(together.logits[1:], good.logits, atol=1e-4, rtol=1e-4)


def test_per_image_tau_one_image_keeps_all_tokens(images):
    vit = patch_vit(tiny_vit())
    settings = MergeSettings(method="mame", tau=0.6, blocks=4)
    with torch.inference_mode():
        mixed = vit(images, settings, tau=[0.6, 1.0, 0.6, 0.6])
        kept = vit(images[1:2], MergeSettings(method="mame", tau=1.0, blocks=4))
        merged = vit(images[2:3], settings)
    assert (mixed.tokens[1] == vit.input_tokens).all()
    assert (mixed.tokens[[0, 2, 3], -1] < vit.input_tokens).all()
    assert (mixed.logits[1] - kept.logits[0]).abs().max().item() <= 1e-4
    assert (mixed.logits[2] - merged.logits[0]).abs().max().item() <= 1e-4
    assert torch.equal(mixed.tokens[2], merged.tokens[0])


def test_compiled_forward_equals_eager(images):
    from mame_core import compile_merging_vit

    vit = patch_vit(tiny_vit(depth=2))
    compiled = compile_merging_vit(vit)
    # Unmerged and ToMe shapes are static (one input each); MaMe's second input brings new token counts,
    # which its dynamic-shape stages serve.
    cases = [(MergeSettings(), images), (MergeSettings(method="tome", r=6), images)]
    mame = MergeSettings(method="mame", tau=0.7, blocks=2)
    cases += [(mame, images), (mame, images[[2, 0, 3]])]
    with torch.inference_mode():
        for s, x in cases:
            eager, fast = vit(x, s), compiled(x, s)
            assert torch.equal(eager.tokens, fast.tokens)
            torch.testing.assert_close(fast.logits, eager.logits, atol=1e-5, rtol=1e-5)


def test_bias_in_channels_or_masks_gives_the_same_forward(images, monkeypatch):
    # CUDA carries proportional attention's bias in extra head channels, the CPU in SDPA masks: one model.
    from mame_core import patch as patch_module

    vit = patch_vit(tiny_vit())
    taus = torch.tensor([0.6, 0.8, 1.0, 0.5])
    with torch.inference_mode():
        masks = vit(images, MAME, tau=taus)
        monkeypatch.setattr(patch_module, "_bias_in_channels", lambda x: True)
        channels = vit(images, MAME, tau=taus)
    assert torch.equal(masks.tokens, channels.tokens)
    torch.testing.assert_close(masks.logits, channels.logits, atol=1e-5, rtol=1e-5)
