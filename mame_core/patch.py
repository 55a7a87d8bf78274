"""Token merging for timm VisionTransformers, with the merge settings passed to every forward call.

`patch_vit(model)` wraps a timm `VisionTransformer` (class token or not, register tokens, average pooling,
DeiT distilled) in a `MergingViT` that shares its parameters. Its forward takes a `MergeSettings`, so one
copy of the weights serves unmerged, MaMe at any tau and ToMe at any r, with no state kept between calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from .merge import TokenBatch, mame_merge, mame_order
from .tome import tome_merge

Method = Literal["none", "mame", "tome"]
DEFAULT_MAME_BLOCKS = 8  # the paper's setting for ViT-B


@dataclass(frozen=True)
class MergeSettings:
    """How one forward pass merges tokens. Frozen and hashable: a serving variant is one of these.

    method: "none" (the unmerged model), "mame" (threshold `tau`, first `blocks` blocks, `tau` may be a
    per-block tuple) or "tome" (`r` tokens removed per block in the first `blocks` blocks, all by default).
    stride: every `stride`-th non-special token is a MaMe destination. prop_attn: proportional attention.
    """

    method: Method = "none"
    tau: float | tuple[float, ...] = 1.0
    blocks: int | None = None
    r: int = 0
    stride: int = 2
    prop_attn: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("none", "mame", "tome"):
            raise ValueError(f"method must be 'none', 'mame' or 'tome', not {self.method!r}")
        taus = self.tau if isinstance(self.tau, tuple) else (self.tau,)
        for t in taus:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < -1:
                raise ValueError(f"tau must be a finite number >= -1 (1 or more merges nothing), not {t!r}")
        if isinstance(self.tau, tuple) and not self.tau:
            raise ValueError("a per-block tau list needs at least one value")
        if isinstance(self.tau, tuple) and self.blocks is not None and len(self.tau) != self.blocks:
            raise ValueError(f"a per-block tau list needs one value per merging block: {len(self.tau)} != {self.blocks}")
        # blocks counts the leading blocks that merge (spec section 2): merging in none is method 'none'.
        if self.blocks is not None and (isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1):
            raise ValueError(f"blocks must be an integer >= 1 (merge in the first `blocks` blocks), not {self.blocks!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"r must be a non-negative integer, not {self.r!r}")
        if self.method == "tome" and self.r == 0:
            raise ValueError("method 'tome' needs r >= 1 tokens to remove per block")
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 2:
            raise ValueError(f"stride must be an integer >= 2, not {self.stride!r}")
        if not isinstance(self.prop_attn, bool):  # "false" is a true string: attention would stay proportional
            raise ValueError(f"prop_attn must be true or false, not {self.prop_attn!r}")  # noqa: TRY004 (user input)
        # A setting the method does not use is a mistake, not a no-op: {tau: 0.9} without `method: mame`
        # would serve the unmerged model under a MaMe variant's name.
        unused = {"none": {"tau": self.tau != 1.0, "r": self.r != 0, "blocks": self.blocks is not None,
                           "stride": self.stride != 2},
                  "mame": {"r": self.r != 0},
                  "tome": {"tau": self.tau != 1.0, "stride": self.stride != 2}}[self.method]
        named = [name for name, given in unused.items() if given]
        if named:
            raise ValueError(f"method {self.method!r} does not use {', '.join(named)} "
                             "(MaMe: tau, blocks, stride; ToMe: r, blocks)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeSettings:
        """Build from a config mapping; unknown keys are an error that names them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown merge setting(s) {unknown}; known: {sorted(known)}")
        values = dict(data)
        if isinstance(values.get("tau"), (list, tuple)):
            values["tau"] = tuple(float(t) for t in values["tau"])
        elif isinstance(values.get("tau"), int) and not isinstance(values.get("tau"), bool):
            values["tau"] = float(values["tau"])
        return cls(**values)

    def merge_blocks(self, depth: int) -> int:
        """How many leading blocks merge in a model of this depth."""
        if self.method == "none":
            return 0
        if self.blocks is not None:
            return min(self.blocks, depth)
        if isinstance(self.tau, tuple):
            return min(len(self.tau), depth)
        return min(DEFAULT_MAME_BLOCKS, depth) if self.method == "mame" else depth

    def check_depth(self, depth: int) -> None:
        """A ValueError when these settings name more merging blocks than a model of this depth has
        (merge_blocks would cut them silently): for checking a configured variant against its model."""
        wanted = self.blocks if self.blocks is not None else len(self.tau) if isinstance(self.tau, tuple) else None
        if self.method != "none" and wanted is not None and wanted > depth:
            raise ValueError(f"merging in the first {wanted} blocks, but the model has only {depth} blocks")

    def tau_at(self, block: int) -> float:
        return self.tau[block] if isinstance(self.tau, tuple) else self.tau


UNMERGED = MergeSettings()


@dataclass
class MergeResult:
    logits: Tensor  # [B, num_classes]
    tokens: Tensor  # [B, depth] int64, real tokens after each block (on the CPU)
    input_tokens: int  # tokens entering block 0
    gflops: Tensor  # [B] float64, estimated GFLOPs (multiply-accumulates, the fvcore convention)
    sources: list[Tensor] | None = None  # per block: [B, T, num_patches] source map


def check_supported(model: nn.Module) -> None:
    """A TypeError saying why `patch_vit` cannot patch this model (works on a model built on the meta device)."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"patch_vit needs a timm VisionTransformer, got {type(model).__name__}")
    if getattr(model, "attn_pool", None) is not None:
        raise TypeError("attention-pooling heads (global_pool='map') are not supported by token merging")
    if model.global_pool == "":
        # Per-token outputs: after merging, each image keeps its own number of tokens (padded in a batch).
        raise TypeError("per-token outputs (global_pool='') are not supported: merged images differ in length")
    if model.global_pool not in ("token", "avg", "max", "avgmax"):
        raise TypeError(f"unsupported global_pool {model.global_pool!r}")
    if getattr(model, "dynamic_img_size", False):
        raise TypeError("dynamic_img_size models are not supported: the patch counts tokens at the built input size")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(
                f"block {i} is a {type(blk).__name__} with {type(blk.attn).__name__}: only timm's standard "
                "Block/Attention pair is supported"
            )


RowFn = Callable[[Tensor], Tensor]


def _per_token(fn: RowFn, h: Tensor, real_rows: Tensor | None) -> Tensor:
    """Apply a per-token function to the real tokens only.

    With padding, the real rows are packed first, so the linear layers (most of a ViT's work) cost the sum of
    the images' token counts, not batch size x the longest image. Padding rows of the result are 0.
    """
    if real_rows is None:
        return fn(h)
    bsz, length, dim = h.shape
    out = fn(h.reshape(bsz * length, dim).index_select(0, real_rows))
    full = out.new_zeros(bsz * length, out.shape[-1]).index_copy_(0, real_rows, out)
    return full.view(bsz, length, -1)


def _block_attention(
    blk: Block, h: Tensor, key_bias: Tensor | None, real_rows: Tensor | None
) -> tuple[Tensor, Tensor]:
    """timm Block's attention branch (norm1, Attention, ls1), plus the keys averaged over heads (the metric)."""
    attn = blk.attn
    bsz, n, _ = h.shape
    gated = getattr(attn, "gate", None) is not None
    width = attn.attn_dim * (4 if gated else 3)

    def project(t: Tensor) -> Tensor:
        t = blk.norm1(t)
        return torch.cat([attn.qkv(t), attn.gate(t)], dim=-1) if gated else attn.qkv(t)

    projected = _per_token(project, h, real_rows)
    qkv = projected[..., : 3 * attn.attn_dim].reshape(bsz, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if key_bias is None:
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    else:
        out = _key_biased_attention(q, k, v, key_bias, attn.scale)
    out = out.transpose(1, 2).reshape(bsz, n, attn.attn_dim)
    if gated:
        out = torch.cat([out, projected[..., 3 * attn.attn_dim: width]], dim=-1)

    def finish(t: Tensor) -> Tensor:
        t, gate = (t[..., : attn.attn_dim], t[..., attn.attn_dim:]) if gated else (t, None)
        t = attn.norm(t)
        if gate is not None:
            t = t * gate.sigmoid()
        return blk.ls1(attn.proj_drop(attn.proj(t)))

    return _per_token(finish, out, real_rows), k.mean(dim=1)


def _key_bias(size: Tensor, prop_attn: bool, dtype: torch.dtype) -> Tensor:
    """Per key logit bias [B, 1, T, 1]: log(size) (proportional attention) or 0; -inf on padding either way."""
    weight = size if prop_attn else (size > 0).to(size.dtype)
    return weight.log().to(dtype)[:, None, :, None]


def _key_biased_attention(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale + bias) v with a per key bias [B, 1, T, 1], as one mask-free fused attention.

    The bias rides in `pad` extra head channels: q gets ones, k gets bias / (pad * scale), v gets zeros, so
    q_ext k_ext^T * scale is the biased logit and the first channels of the output are the result. A mask
    keeps SDPA off its fastest kernel (measured on the GPU: 2.6x slower attention); this costs one copy of
    q, k and v and a head dim rounded up to the next multiple of 8 (what the fused kernels take). Padding
    keys get -inf and drop out exactly, whatever finite values they hold.
    """
    dim = q.shape[-1]
    pad = 8 - dim % 8

    def extend(t: Tensor, extra: Tensor) -> Tensor:
        return torch.cat([t, extra.expand(*t.shape[:-1], pad)], dim=-1)

    out = F.scaled_dot_product_attention(
        extend(q, q.new_ones(())), extend(k, key_bias / (pad * scale)), extend(v, v.new_zeros(())), scale=scale
    )
    return out[..., :dim]


def _real_rows(size: Tensor, num_real: int) -> Tensor | None:
    """Flat indices of the real tokens of a padded batch, or None when no row is padding.
    num_real comes from the host, so that finding the indices needs no device sync."""
    if num_real == size.numel():
        return None
    real = size.reshape(-1) > 0
    try:
        return torch.nonzero_static(real, size=num_real).squeeze(1)
    except (NotImplementedError, RuntimeError):  # older torch builds lack it on some devices
        return real.nonzero().squeeze(1)


def _linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of all Linear layers in a module."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


class MergingViT(nn.Module):
    """A timm VisionTransformer whose forward takes the merge settings (shares the model's parameters)."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        check_supported(model)
        self.model = model
        self.depth = len(model.blocks)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.num_patches = int(model.patch_embed.num_patches)
        self.input_tokens = self.num_prefix_tokens + self.num_patches
        # Per block cost coefficients for the GFLOPs estimate (see _estimate_gmacs).
        as_row = lambda values: torch.tensor(values, dtype=torch.float64)
        self._attn_linear_macs = as_row([_linear_macs(blk.attn) for blk in model.blocks])
        self._mlp_linear_macs = as_row([_linear_macs(blk) - _linear_macs(blk.attn) for blk in model.blocks])
        self._attn_dims = as_row([blk.attn.attn_dim for blk in model.blocks])
        self._merge_macs_per_pair = as_row([blk.attn.head_dim + model.embed_dim for blk in model.blocks])
        proj = model.patch_embed.proj
        patch_macs = sum(p.numel() for p in proj.parameters() if p.dim() > 1) if isinstance(proj, nn.Conv2d) else 0
        head_macs = _linear_macs(model.head) + (_linear_macs(model.head_dist) if hasattr(model, "head_dist") else 0)
        self._fixed_macs = self.num_patches * patch_macs + head_macs

    def forward(
        self,
        x: Tensor,
        settings: MergeSettings = UNMERGED,
        tau: Tensor | Sequence[float] | None = None,
        return_source: bool = False,
    ) -> MergeResult:
        """Run the ViT on normalised images x [B, 3, H, W] with the given merge settings.

        tau: optional per-image thresholds [B] for MaMe, overriding settings.tau in every merging block.
        """
        m = self.model
        bsz = x.shape[0]
        merge_blocks = settings.merge_blocks(self.depth)
        if tau is not None and settings.method != "mame":
            raise ValueError("a per-image tau needs method 'mame'")
        image_tau = self._tau_tensor(tau, bsz, x.device) if tau is not None else None

        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        special = self.num_prefix_tokens
        size = torch.ones(h.shape[:2], device=h.device, dtype=torch.float32)
        source = None
        if return_source:
            source = torch.zeros(bsz, h.shape[1], self.num_patches, device=h.device, dtype=torch.float32)
            source[:, special:] = torch.eye(self.num_patches, device=h.device)
        lengths = torch.full((bsz,), h.shape[1], dtype=torch.int64)  # real tokens per image, kept on the CPU
        key_bias: Tensor | None = None  # None while every token has size 1 and there is no padding (fast path)
        real_rows: Tensor | None = None  # flat indices of real tokens, None while there is no padding
        merged_yet = False  # has any image of the batch merged a token so far?

        counts_in, counts_out, merge_pairs, sources = [], [], [], []
        for i, blk in enumerate(m.blocks):
            counts_in.append(lengths)
            attn_out, keys = _block_attention(blk, h, key_bias, real_rows)
            h = h + blk.drop_path1(attn_out)
            pairs = torch.zeros(bsz)
            if i < merge_blocks:
                batch = TokenBatch(h, size, source)
                if settings.method == "mame":
                    if tau is None and settings.tau_at(i) >= 1 and not merged_yet:
                        batch = mame_order(batch, special, settings.stride)  # merges nothing: just reorder
                    else:
                        real_dst = ((lengths - special + settings.stride - 1) // settings.stride).clamp(min=0)
                        pairs = (real_dst * (lengths - special - real_dst)).to(pairs.dtype)
                        block_tau = image_tau if image_tau is not None else settings.tau_at(i)
                        batch, lengths = mame_merge(batch, keys, block_tau, special, settings.stride)
                        merged_yet = merged_yet or bool((lengths < h.shape[1]).any())
                else:
                    n_a = (lengths + 1) // 2  # ToMe splits all tokens, special ones included
                    pairs = (n_a * (lengths - n_a)).to(pairs.dtype)
                    batch = tome_merge(batch, keys, settings.r, special)
                    lengths = torch.full_like(lengths, batch.x.shape[1])
                    merged_yet = merged_yet or batch.x.shape[1] < h.shape[1]
                h, size, source = batch.x, batch.size, batch.source
                if merged_yet:  # while nothing merged, every size is 1 and attention needs no bias
                    key_bias = _key_bias(size, settings.prop_attn, h.dtype)
                    real_rows = _real_rows(size, int(lengths.sum()))
            merge_pairs.append(pairs)
            h = h + blk.drop_path2(_per_token(lambda t, b=blk: b.ls2(b.mlp(b.norm2(t))), h, real_rows))
            counts_out.append(lengths)
            if return_source:
                sources.append(source)

        logits = self._head(m.norm(h), size)
        tokens_in = torch.stack(counts_in, dim=1).cpu()
        tokens = torch.stack(counts_out, dim=1).cpu()
        gflops = self._estimate_gmacs(tokens_in, tokens, torch.stack(merge_pairs, dim=1).cpu())
        return MergeResult(logits, tokens, self.input_tokens, gflops, sources if return_source else None)

    @staticmethod
    def _tau_tensor(tau: Tensor | Sequence[float], bsz: int, device: torch.device) -> Tensor:
        # float64, like a Python float: mame_fusion_weights casts it to the similarity's dtype, so a per-image
        # tau and the same scalar tau are one threshold in a float64 model too.
        t = torch.as_tensor(tau, dtype=torch.float64)
        if t.shape != (bsz,):
            raise ValueError(f"per-image tau must have shape [{bsz}], got {list(t.shape)}")
        if not bool((t.isfinite() & (t >= -1)).all()):
            raise ValueError(f"per-image tau must be finite numbers >= -1, got {t.tolist()}")
        return t.to(device)

    def _head(self, h: Tensor, size: Tensor) -> Tensor:
        """timm's forward_head with pooling over real tokens only (size-weighted for averages)."""
        m = self.model
        if hasattr(m, "head_dist"):  # DeiT distilled: average of the class and distillation heads
            return (m.head(m.head_drop(h[:, 0])) + m.head_dist(m.head_drop(h[:, 1]))) / 2
        pool = m.global_pool
        if pool == "token":
            pooled = h[:, 0]
        elif pool:
            start = 0 if getattr(m, "pool_include_prefix", False) else self.num_prefix_tokens
            body, weight = h[:, start:], size[:, start:].to(h.dtype).unsqueeze(-1)
            real = weight > 0
            mean = torch.where(real, body * weight, 0.0).sum(dim=1) / weight.sum(dim=1)
            peak = torch.where(real, body, float("-inf")).amax(dim=1)
            pooled = {"avg": mean, "max": peak, "avgmax": 0.5 * (mean + peak)}[pool]
        else:
            pooled = h
        return m.head(m.head_drop(m.fc_norm(pooled)))

    def _estimate_gmacs(self, tokens_in: Tensor, tokens_out: Tensor, merge_pairs: Tensor) -> Tensor:
        """Per image GMACs from real token counts: attention on the tokens entering a block, MLP on those
        leaving its merge, plus the merge's similarity and fusion products."""
        n_in, n_out = tokens_in.double(), tokens_out.double()
        per_block = (
            n_in * self._attn_linear_macs
            + 2 * n_in * n_in * self._attn_dims
            + n_out * self._mlp_linear_macs
            + merge_pairs.double() * self._merge_macs_per_pair
        )
        return (per_block.sum(dim=1) + self._fixed_macs) / 1e9


def patch_vit(model: VisionTransformer) -> MergingViT:
    """Wrap a timm VisionTransformer so its forward takes merge settings. The model is not copied."""
    return MergingViT(model)
