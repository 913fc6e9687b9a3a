"""Segmentor: output tuple and shapes, attributes, state-dict prefixes, config factory."""

from __future__ import annotations

import pytest
import torch

from dida.config import ModelConfig
from dida.models import DAFormerHead, MiT, Segmentor, build_segmentor, segmentor_from_config


def tiny_segmentor(num_classes: int = 4) -> Segmentor:
    return build_segmentor("mit_tiny", num_classes=num_classes, embed_dim=16)


def test_forward_returns_quarter_resolution_pair() -> None:
    model = tiny_segmentor().eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, tuple) and len(out) == 2
    logits, embedding = out
    assert logits.shape == (2, 4, 16, 16) and embedding.shape == (2, 16, 16, 16)


def test_return_features() -> None:
    model = tiny_segmentor().eval()
    logits, embedding, feats = model(torch.randn(2, 3, 64, 64), return_features=True)
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]
    torch.testing.assert_close(model.head(feats)[0], logits)


def test_b0_segmentor_attributes_and_keys() -> None:
    model = build_segmentor("mit_b0", num_classes=5, embed_dim=32, dilations=(1, 2))
    assert (model.num_classes, model.embed_dim, model.variant) == (5, 32, "mit_b0")
    keys = list(model.state_dict())
    assert all(k.startswith(("encoder.", "head.")) for k in keys)
    assert "encoder.block1.0.attn.kv.weight" in keys
    assert "head.fuse_layer.aspp_modules.1.pointwise_conv.conv.weight" in keys
    with torch.no_grad():
        logits, embedding = model.eval()(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 5, 16, 16) and embedding.shape == (1, 32, 16, 16)


def test_from_config() -> None:
    cfg = ModelConfig(variant="mit_b0", num_classes=7, embed_dim=24, dilations=[1, 3], dropout=0.0)
    model = segmentor_from_config(cfg)
    assert (model.variant, model.num_classes, model.embed_dim) == ("mit_b0", 7, 24)
    assert len(model.head.fuse_layer.aspp_modules) == 2


def test_mismatched_head_is_refused() -> None:
    encoder = MiT(
        embed_dims=[8, 16, 32, 64], num_heads=[1] * 4, depths=[1] * 4, sr_ratios=[8, 4, 2, 1]
    )
    with pytest.raises(ValueError, match="in_channels"):
        Segmentor(encoder, DAFormerHead([8, 16, 32, 32], 4))


def test_training_step_changes_weights() -> None:
    model = tiny_segmentor().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.head.conv_seg.weight.detach().clone()
    logits, _ = model(torch.randn(2, 3, 64, 64))
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 4, (2, 16, 16))).backward()
    opt.step()
    assert not torch.equal(before, model.head.conv_seg.weight)


@pytest.mark.slow
def test_b5_segmentor_shapes() -> None:
    model = build_segmentor("mit_b5").eval()
    assert sum(p.numel() for p in model.parameters()) == 81_443_008 + 3_712_275
    with torch.no_grad():
        logits, embedding = model(torch.randn(1, 3, 128, 128))
    assert logits.shape == (1, 19, 32, 32) and embedding.shape == (1, 256, 32, 32)
