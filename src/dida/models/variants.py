"""The MiT variants' architecture settings: plain data, no torch (config validation reads them)."""

from __future__ import annotations

# Per-variant settings of the original `mit_b0`..`mit_b5` classes (NVlabs `mix_transformer.py`).
_WIDE = [64, 128, 320, 512]
_HEADS = [1, 2, 5, 8]
_SR = [8, 4, 2, 1]
MIT_VARIANTS: dict[str, dict] = {
    "mit_b0": dict(
        embed_dims=[32, 64, 160, 256], num_heads=_HEADS, depths=[2, 2, 2, 2], sr_ratios=_SR
    ),
    "mit_b1": dict(embed_dims=_WIDE, num_heads=_HEADS, depths=[2, 2, 2, 2], sr_ratios=_SR),
    "mit_b2": dict(embed_dims=_WIDE, num_heads=_HEADS, depths=[3, 4, 6, 3], sr_ratios=_SR),
    "mit_b3": dict(embed_dims=_WIDE, num_heads=_HEADS, depths=[3, 4, 18, 3], sr_ratios=_SR),
    "mit_b4": dict(embed_dims=_WIDE, num_heads=_HEADS, depths=[3, 8, 27, 3], sr_ratios=_SR),
    "mit_b5": dict(embed_dims=_WIDE, num_heads=_HEADS, depths=[3, 6, 40, 3], sr_ratios=_SR),
    # not in the paper: a tiny encoder for tests and CPU smoke runs (no pretrained weights exist)
    "mit_tiny": dict(
        embed_dims=[8, 16, 32, 64], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], sr_ratios=_SR
    ),
}
