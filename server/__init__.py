"""HTTP inference server for timm vision transformers patched with MaMe token merging."""
