"""MaMe (Matrix-Based Token Merging) for timm Vision Transformers, with ToMe as the baseline."""

from .merge import TokenBatch, mame_merge
from .patch import UNMERGED, MergeResult, MergeSettings, MergingViT, compile_merging_vit, patch_vit
from .tome import tome_merge

__all__ = [
    "UNMERGED",
    "MergeResult",
    "MergeSettings",
    "MergingViT",
    "TokenBatch",
    "compile_merging_vit",
    "mame_merge",
    "patch_vit",
    "tome_merge",
]
