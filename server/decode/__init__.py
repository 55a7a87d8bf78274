"""Decoding untrusted image bytes and preprocessing them into the crops a model takes."""
