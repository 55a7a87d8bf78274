"""Token merging for timm VisionTransformers, with the merge settings passed to every forward call.

`patch_vit(model)` wraps a timm `VisionTransformer` (class token or not, register tokens, average pooling,
DeiT distilled) in a `MergingViT` that shares its parameters. Its forward takes a `MergeSettings`, so one
copy of the weights serves unmerged, MaMe at any tau and ToMe at any r, with no state kept between calls.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from .merge import (
    PackedBatch,
    TokenBatch,
    as_dtype,
    cu_seqlens,
    eager_cached,
    mame_fuse,
    mame_merge_packed,
    mame_order,
    work_dtype,
)
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
            raise ValueError("a per-block tau list needs one value per merging block: "
                             f"{len(self.tau)} != {self.blocks}")
        # blocks counts the leading blocks that merge (spec section 2): merging in none is method 'none'.
        bad_blocks = isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1
        if self.blocks is not None and bad_blocks:
            raise ValueError("blocks must be an integer >= 1 (merge in the first `blocks` blocks), "
                             f"not {self.blocks!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"r must be a non-negative integer, not {self.r!r}")
        if self.method == "tome" and self.r == 0:
            raise ValueError("method 'tome' needs r >= 1 tokens to remove per block")
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 2:
            raise ValueError(f"stride must be an integer >= 2, not {self.stride!r}")
        # "false" is a true string: attention would stay proportional.
        if not isinstance(self.prop_attn, bool):
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
        wanted = (self.blocks if self.blocks is not None
                  else len(self.tau) if isinstance(self.tau, tuple) else None)
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
    """A TypeError saying why `patch_vit` cannot patch this model (works on a model built on the meta
    device)."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"patch_vit needs a timm VisionTransformer, got {type(model).__name__}")
    if getattr(model, "attn_pool", None) is not None:
        raise TypeError("attention-pooling heads (global_pool='map') are not supported by token merging")
    if model.global_pool == "":
        # Per-token outputs: after merging, each image keeps its own number of tokens (padded in a batch).
        raise TypeError("per-token outputs (global_pool='') are not supported: "
                        "merged images differ in length")
    if model.global_pool not in ("token", "avg", "max", "avgmax"):
        raise TypeError(f"unsupported global_pool {model.global_pool!r}")
    if getattr(model, "dynamic_img_size", False):
        raise TypeError("dynamic_img_size models are not supported: "
                        "the patch counts tokens at the built input size")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(
                f"block {i} is a {type(blk).__name__} with {type(blk.attn).__name__}: only timm's standard "
                "Block/Attention pair is supported"
            )


def _load_varlen_attn() -> Callable[..., Tensor] | None:
    """torch's variable-length flash attention (torch.nn.attention.varlen), where this torch has it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


_VARLEN_ATTN = _load_varlen_attn()
# torch 2.10 has no scale argument (the softmax scale is then 1/sqrt(head dim)): q is scaled instead.
_VARLEN_TAKES_SCALE = _VARLEN_ATTN is not None and "scale" in inspect.signature(_VARLEN_ATTN).parameters


def _varlen_usable(qkv: Tensor) -> bool:
    """Can torch's varlen flash attention run on these packed [N, 3, H, D] rows?"""
    return (_VARLEN_ATTN is not None and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16)
            and qkv.shape[-1] <= 256 and torch.backends.cuda.is_flash_attention_available())


@dataclass
class _Layout:
    """How a forward's packed tokens [N, C] split into images, and the key bias attention needs.

    lengths: tokens per image (host ints). bias_size: the token sizes whose log biases every key (proportional
    attention), or None when attention needs no bias (nothing merged yet, or proportional attention off).
    channels: carry the bias in extra head channels (on CUDA, where a mask keeps SDPA off its fastest kernel
    and varlen attention takes none) rather than as an attention mask (elsewhere: no copy of qkv).
    cu_seqlens: [B + 1] int32 on the device, for varlen attention.
    """

    lengths: list[int]
    bias_size: Tensor | None = None
    channels: bool = False
    cu_seqlens: Tensor | None = None
    _cache: dict[Any, Any] = field(default_factory=dict)

    @property
    def uniform(self) -> bool:
        return min(self.lengths) == max(self.lengths)

    def bias_channels(self, num_heads: int, head_dim: int, scale: float, dtype: torch.dtype) -> Tensor | None:
        """Extra q/k/v head channels [N, 3, H, pad] that carry the key bias log(size) through a mask-free
        attention: q gets ones, k gets bias / (pad * scale), v gets zeros, so q_ext k_ext^T * scale is the
        biased logit and the first head_dim channels of the output are the result. A mask keeps SDPA off its
        fastest kernel (measured on the GPU: 2.6x slower attention) and varlen attention takes none; this
        costs a head dim rounded up to the next multiple of 8 (what the fused kernels take)."""
        if self.bias_size is None or not self.channels:
            return None
        key = ("channels", num_heads, head_dim, scale, dtype)
        if key not in self._cache:
            pad = 8 - head_dim % 8
            bias = self.bias_size.log() / (pad * scale)
            # [1, bias, 0] per token in one op: ones + bias * [0, 1, 0] (exact: the products are bias and 0).
            q_ones, k_bias = _channel_basis(bias.device, bias.dtype)
            extra = torch.addcmul(q_ones, bias.view(-1, 1, 1, 1), k_bias)  # [N, 3, 1, 1]
            self._cache[key] = as_dtype(extra, dtype).expand(-1, -1, num_heads, pad)
        return self._cache[key]

    def key_masks(self, dtype: torch.dtype) -> Tensor | tuple[Tensor, ...] | None:
        """The key bias log(size) as SDPA masks: [B, 1, 1, L] when all images are as long, else one [n_i]
        per image; None without a bias or when the channels carry it."""
        if self.bias_size is None or self.channels:
            return None
        key = ("masks", dtype)
        if key not in self._cache:
            bias = as_dtype(self.bias_size.log(), dtype)
            self._cache[key] = (bias.view(len(self.lengths), 1, 1, -1) if self.uniform
                                else bias.split(self.lengths))
        return self._cache[key]


@eager_cached
def _channel_basis(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[1, 0, 0] and [0, 1, 0] as [3, 1, 1] tensors: the q and k rows of the bias channels."""
    eye = torch.eye(3, dtype=dtype, device=device)
    return eye[0].view(3, 1, 1), eye[1].view(3, 1, 1)


def _bias_in_channels(x: Tensor) -> bool:
    """Carry the key bias in extra head channels (see _Layout.bias_channels) rather than as masks: on CUDA."""
    return x.is_cuda


def _attend(qkv: Tensor, layout: _Layout, scale: float) -> Tensor:
    """softmax(q k^T * scale + key bias) v within each image, for packed rows qkv [N, 3, H, D] -> [..., H, D]
    whose leading dims flatten to N.

    All images as long: one SDPA over [B, H, L, D]. Otherwise each image attends over its own tokens only
    (no padding): torch's varlen flash attention where it can run, else one SDPA per image."""
    n, _, heads, dim = qkv.shape
    masks = layout.key_masks(qkv.dtype)
    if layout.uniform:
        bsz = len(layout.lengths)
        q, k, v = qkv.view(bsz, n // bsz, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=masks, scale=scale).transpose(1, 2)
    if layout.cu_seqlens is not None and masks is None and _varlen_usable(qkv):
        q, k, v = qkv.unbind(1)
        longest = max(layout.lengths)
        if _VARLEN_TAKES_SCALE:
            return _VARLEN_ATTN(q, k, v, layout.cu_seqlens, layout.cu_seqlens, longest, longest, scale=scale)
        q = q * (scale * dim ** 0.5)
        return _VARLEN_ATTN(q, k, v, layout.cu_seqlens, layout.cu_seqlens, longest, longest)
    q, k, v = (t.split(layout.lengths, dim=1) for t in qkv.permute(1, 2, 0, 3).unbind(0))  # [H, n_i, D] each
    masks = masks if masks is not None else (None,) * len(layout.lengths)
    outs = [F.scaled_dot_product_attention(*image, attn_mask=mask, scale=scale)
            for *image, mask in zip(q, k, v, masks)]
    return torch.cat(outs, dim=1).transpose(0, 1)


def _project(
    blk: Block, h: Tensor, channels: Tensor | None, want_metric: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """norm1 and the qkv projection of packed tokens h [N, C]: qkv [N, 3, H, D (+ bias channels)], the keys
    averaged over heads in fp32 or wider if wanted (the merge's metric, [N, D]), and norm1's output."""
    attn = blk.attn
    t = blk.norm1(h)
    qkv = attn.qkv(t).unflatten(-1, (3, attn.num_heads, attn.head_dim))
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        qkv = torch.stack([attn.q_norm(qkv[:, 0]), attn.k_norm(qkv[:, 1]), qkv[:, 2]], dim=1)
    metric = qkv[:, 1].mean(dim=1, dtype=work_dtype(qkv.dtype)) if want_metric else None
    if channels is not None:
        qkv = torch.cat([qkv, channels], dim=-1)
    return qkv, metric, t


def _apply(module: nn.Module, x: Tensor) -> Tensor:
    """module(x), with no operator where the module is the identity (a dropout in eval mode or of p 0)."""
    if isinstance(module, nn.Dropout) and (module.p == 0 or not module.training):
        return x
    return module(x)


def _finish_attention(blk: Block, h: Tensor, out: Tensor, normed: Tensor) -> Tensor:
    """The rest of the attention branch: h + ls1(proj(norm(out))), out [..., H, D (+ bias channels)]."""
    attn = blk.attn
    if out.shape[-1] != attn.head_dim:
        out = out[..., : attn.head_dim]
    out = attn.norm(out.reshape(h.shape[0], attn.attn_dim))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(normed).sigmoid()
    return h + blk.drop_path1(blk.ls1(_apply(attn.proj_drop, attn.proj(out))))


def _mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    """timm's Mlp without its identity dropouts; any other MLP as it is."""
    if type(mlp) is not Mlp:
        return mlp(x)
    return _apply(mlp.drop2, mlp.fc2(mlp.norm(_apply(mlp.drop1, mlp.act(mlp.fc1(x))))))


def _mlp_branch(blk: Block, h: Tensor) -> Tensor:
    return h + blk.drop_path2(blk.ls2(_mlp(blk.mlp, blk.norm2(h))))


@dataclass(frozen=True)
class _Stages:
    """The tensor-only stages of a forward (no host values inside): compile_merging_vit compiles them."""

    project: Callable[..., tuple[Tensor, Tensor | None, Tensor]] = _project
    finish_attention: Callable[..., Tensor] = _finish_attention
    mlp: Callable[..., Tensor] = _mlp_branch
    fuse: Callable[..., Any] = mame_fuse


def _last_merge_block(settings: MergeSettings, merge_blocks: int, per_image_tau: bool, sources: bool) -> int:
    """The last block that runs a merge step (-1: none). Past the last block whose tau can merge (< 1), a MaMe
    step would only reorder tokens, which attention and pooling do not see: skipped, unless the source maps
    (which show the order) are wanted."""
    if settings.method != "mame" or per_image_tau or sources:
        return merge_blocks - 1
    return max((j for j in range(merge_blocks) if settings.tau_at(j) < 1), default=-1)


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
        self._stages = _Stages()
        self._whole: Callable[..., MergeResult] | None = None  # a compiled forward for the unmerged and ToMe
        # Per block cost coefficients for the GFLOPs estimate (see _estimate_gmacs).
        # Plain floats: host bookkeeping, no tensor operators in the forward (and nothing for torch.compile
        # to guard on).
        as_row = lambda values: [float(v) for v in values]
        self._attn_linear_macs = as_row([_linear_macs(blk.attn) for blk in model.blocks])
        self._mlp_linear_macs = as_row([_linear_macs(blk) - _linear_macs(blk.attn) for blk in model.blocks])
        self._attn_dims = as_row([blk.attn.attn_dim for blk in model.blocks])
        self._merge_macs_per_pair = as_row([blk.attn.head_dim + model.embed_dim for blk in model.blocks])
        proj = model.patch_embed.proj
        patch_macs = (sum(p.numel() for p in proj.parameters() if p.dim() > 1)
                      if isinstance(proj, nn.Conv2d) else 0)
        head_macs = _linear_macs(model.head) + (
            _linear_macs(model.head_dist) if hasattr(model, "head_dist") else 0)
        self._fixed_macs = self.num_patches * patch_macs + head_macs
        # How many leading tokens the head reads, if it reads only those (class and distillation tokens).
        self._head_tokens = 2 if hasattr(model, "head_dist") else 1 if model.global_pool == "token" else 0

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
        if self._whole is not None and settings.method != "mame":
            return self._whole(x, settings, tau, return_source)
        return self._forward(x, settings, tau, return_source)

    def _forward(
        self, x: Tensor, settings: MergeSettings, tau: Tensor | Sequence[float] | None, return_source: bool
    ) -> MergeResult:
        m = self.model
        bsz = x.shape[0]
        merge_blocks = settings.merge_blocks(self.depth)
        if tau is not None and settings.method != "mame":
            raise ValueError("a per-image tau needs method 'mame'")
        image_tau = self._tau_tensor(tau, bsz, x.device) if tau is not None else None

        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        special, first_len = self.num_prefix_tokens, h.shape[1]
        size = torch.ones(h.shape[:2], device=h.device, dtype=work_dtype(h.dtype))
        source = None
        if return_source:
            source = torch.zeros(bsz, first_len, self.num_patches, device=h.device, dtype=torch.float32)
            source[:, special:] = torch.eye(self.num_patches, device=h.device)
        # The tokens stay packed ([N, C], each image's real tokens back to back): per-token layers cost the
        # sum of the images' token counts, and attention runs within each image.
        tokens = PackedBatch.from_padded(TokenBatch(h, size, source))
        layout = _Layout([first_len] * bsz)
        merged_yet = False  # has any image of the batch merged a token so far?
        last_merge = _last_merge_block(settings, merge_blocks, tau is not None, return_source)

        # Per block and image, on the host: tokens entering, tokens leaving, similarity pairs of the merge.
        counts_in, counts_out, merge_pairs, sources = [], [], [], []
        for i, blk in enumerate(m.blocks):
            lengths = layout.lengths
            counts_in.append(lengths)
            merging = i <= last_merge
            channels = layout.bias_channels(blk.attn.num_heads, blk.attn.head_dim, blk.attn.scale,
                                            tokens.x.dtype)
            qkv, metric, normed = self._stages.project(blk, tokens.x, channels, merging)
            out = _attend(qkv, layout, blk.attn.scale)
            tokens = tokens.with_x(self._stages.finish_attention(blk, tokens.x, out, normed))
            pairs = [0] * bsz
            if merging:
                if settings.method == "mame":
                    if tau is None and settings.tau_at(i) >= 1 and not merged_yet:  # merges nothing: reorder
                        ordered = mame_order(tokens.padded(), special, settings.stride)
                        tokens = PackedBatch.from_padded(ordered)
                    else:
                        rest = [n - special for n in lengths]
                        pairs = [-(-r // settings.stride) * (r + (r // -settings.stride)) for r in rest]
                        block_tau = image_tau if image_tau is not None else settings.tau_at(i)
                        tokens = mame_merge_packed(tokens, metric, block_tau, special, settings.stride,
                                                   self._stages.fuse)
                else:
                    # ToMe splits all tokens, specials included.
                    pairs = [(n + 1) // 2 * (n // 2) for n in lengths]
                    padded, padded_metric = tokens.padded(metric)
                    tokens = PackedBatch.from_padded(tome_merge(padded, padded_metric, settings.r, special))
                layout = _Layout(list(tokens.lengths))
                merged_yet = merged_yet or any(a < b for a, b in zip(layout.lengths, lengths))
                # While nothing merged, every size is 1 and attention needs no bias.
                if merged_yet and settings.prop_attn:
                    layout.bias_size = tokens.size
                    layout.channels = _bias_in_channels(tokens.x)
                if not layout.uniform and tokens.x.is_cuda:  # varlen attention runs on CUDA only
                    layout.cu_seqlens = cu_seqlens(tokens.lengths, tokens.x.device)
            merge_pairs.append(pairs)
            tokens = tokens.with_x(self._stages.mlp(blk, tokens.x))
            counts_out.append(layout.lengths)
            if return_source:
                padded = tokens.padded()
                sources.append(torch.where(padded.size.unsqueeze(-1) > 0, padded.source, 0.0))

        if self._head_tokens:  # the head reads the leading tokens only: norm those alone (it is per token)
            logits = self._head(m.norm(tokens.leading(self._head_tokens)), None)
        else:
            final = tokens.with_x(m.norm(tokens.x)).padded()
            logits = self._head(final.x, final.size)
        gflops = torch.from_numpy(np.asarray(self._estimate_gmacs(counts_in, counts_out, merge_pairs)))
        tokens_out = torch.from_numpy(np.asarray(counts_out, dtype=np.int64).T.copy())
        return MergeResult(logits, tokens_out, self.input_tokens, gflops, sources if return_source else None)

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

    def _head(self, h: Tensor, size: Tensor | None) -> Tensor:
        """timm's forward_head with pooling over real tokens only (size-weighted for averages): h [B, T, C],
        size [B, T] (None: h holds the leading tokens only, for a class-token head)."""
        m = self.model
        if hasattr(m, "head_dist"):  # DeiT distilled: average of the class and distillation heads
            return (m.head(_apply(m.head_drop, h[:, 0])) + m.head_dist(_apply(m.head_drop, h[:, 1]))) / 2
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
        return m.head(_apply(m.head_drop, m.fc_norm(pooled)))

    def _estimate_gmacs(
        self, tokens_in: list[list[int]], tokens_out: list[list[int]], merge_pairs: list[list[int]]
    ) -> list[float]:
        """Per image GMACs from real token counts (per block, a list over images): attention on the tokens
        entering a block, MLP on those leaving its merge, plus the merge's similarity and fusion products."""
        per_block = zip(tokens_in, tokens_out, merge_pairs, self._attn_linear_macs, self._attn_dims,
                        self._mlp_linear_macs, self._merge_macs_per_pair)
        totals = [0.0] * len(tokens_in[0])
        for n_in, n_out, pairs, attn_linear, attn_dim, mlp_linear, per_pair in per_block:
            totals = [t + (i * attn_linear + 2 * i * i * attn_dim + o * mlp_linear + p * per_pair)
                      for t, i, o, p in zip(totals, n_in, n_out, pairs)]
        return [(t + self._fixed_macs) / 1e9 for t in totals]


def patch_vit(model: VisionTransformer) -> MergingViT:
    """Wrap a timm VisionTransformer so its forward takes merge settings. The model is not copied."""
    return MergingViT(model)


def compile_merging_vit(vit: MergingViT, mode: str | None = None) -> MergingViT:
    """A MergingViT sharing `vit`'s model whose forward runs under torch.compile, with the same results.

    Unmerged and ToMe forwards have static shapes and no host sync: they compile whole (one graph per
    settings; mode "reduce-overhead" adds CUDA graphs). A MaMe forward needs the host once per merge (the
    next token counts): its tensor-only stages (projections, MLP, the merge's device part) compile with
    dynamic shapes, so new token counts reuse them; attention and the token bookkeeping stay eager.
    """
    compiled = MergingViT(vit.model)
    # A stage compiles once per block (and per variant: with or without bias channels, metric): more than
    # torch's default of 8 recompiles per function, past which it would silently run the rest eagerly.
    limit = 8 * len(vit.model.blocks)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    stage_mode = None if mode == "reduce-overhead" else mode  # CUDA graphs need static shapes
    stage = lambda fn: torch.compile(fn, dynamic=True, mode=stage_mode)
    stages = (_project, _finish_attention, _mlp_branch, mame_fuse)
    compiled._stages = _Stages(*(stage(fn) for fn in stages))
    compiled._whole = torch.compile(compiled._forward, mode=mode)
    return compiled
