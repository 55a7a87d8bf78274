"""MaMe (Matrix-Based Token Merging) for timm Vision Transformers, with ToMe as the baseline."""

from .merge import TokenBatch, mame_merge, tome_merge
from .patch import MergeResult, MergeSettings, MergingViT, UNMERGED, patch_vit

__all__ = [
    "MergeResult",
    "MergeSettings",
    "MergingViT",
    "TokenBatch",
    "UNMERGED",
    "mame_merge",
    "patch_vit",
    "tome_merge",
]
