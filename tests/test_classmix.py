"""Tests for ClassMix: half of the batch's classes per image, consistent masks, same-mask mixing."""

from __future__ import annotations

import pytest
import torch

from dida.adapt.classmix import mix, sample_class_masks


def _labels_all_classes() -> torch.Tensor:
    """Both images contain every class of {0, 1, 2, 3, 255} (n = 5 → 3 chosen), in stripes."""
    values = torch.tensor([0, 1, 2, 3, 255])
    lbl = values.repeat_interleave(4)[:, None].expand(20, 6)  # [20, 6]
    return torch.stack([lbl, lbl.flip(0)]).contiguous()  # [2, 20, 6]


def _chosen_classes(mask: torch.Tensor, label: torch.Tensor) -> set[int]:
    return set(label[mask.bool()].unique().tolist())


def test_masks_pick_ceil_half_of_batch_classes_and_are_consistent() -> None:
    labels = _labels_all_classes()
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        masks = sample_class_masks(labels, g)
        assert masks.shape == labels.shape and masks.dtype == torch.float32
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
        for b in range(2):
            chosen = _chosen_classes(masks[b], labels[b])
            assert len(chosen) == 3
            expected = torch.isin(labels[b], torch.tensor(sorted(chosen)))
            assert torch.equal(masks[b].bool(), expected)


def test_candidates_are_the_whole_batch_including_ignore() -> None:
    # image 0 holds {0, 1}, image 1 holds {2, 255}: n = 4 → 2 chosen from all four per image
    labels = torch.tensor([[[0, 1], [0, 1]], [[2, 255], [2, 255]]])
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(4)
    draws = 400
    for _ in range(draws):
        masks = sample_class_masks(labels, g)
        for b in range(2):
            for c in _chosen_classes(masks[b], labels[b]):
                counts[[0, 1, 2, 255].index(c)] += 1
    # each class is chosen with probability 1/2 for the image that holds it
    assert torch.all((counts / draws - 0.5).abs() < 0.1), counts
    # 255 is a candidate and gets mixed like any class
    assert counts[3] > 0


def test_masks_are_deterministic_with_a_seeded_generator() -> None:
    labels = torch.randint(0, 6, (2, 16, 16), generator=torch.Generator().manual_seed(5))
    a = sample_class_masks(labels, torch.Generator().manual_seed(7))
    b = sample_class_masks(labels, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(8)
    others = [sample_class_masks(labels, g) for _ in range(5)]
    assert any(not torch.equal(a, o) for o in others)


def test_sample_class_masks_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="integer"):
        sample_class_masks(torch.zeros(2, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        sample_class_masks(torch.zeros(2, 4, 4))


def test_image_label_and_weight_are_mixed_with_the_same_mask() -> None:
    g = torch.Generator().manual_seed(3)
    src_label = torch.randint(0, 4, (2, 8, 8), generator=g)
    tgt_label = torch.randint(4, 8, (2, 8, 8), generator=g)
    src_img, tgt_img = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    tgt_weight = torch.full((2, 8, 8), 0.3)
    src_copy, tgt_copy = src_img.clone(), tgt_img.clone()
    masks = sample_class_masks(src_label, g)

    mixed_img = mix(masks, src_img, tgt_img)
    mixed_label = mix(masks, src_label, tgt_label)
    mixed_weight = mix(masks, torch.ones_like(tgt_weight), tgt_weight)

    assert mixed_label.dtype == torch.int64 and mixed_img.shape == src_img.shape
    from_src = mixed_label < 4  # source labels are 0..3, target 4..7
    assert torch.equal(from_src, masks.bool())
    assert torch.equal(mixed_weight, torch.where(from_src, 1.0, 0.3))
    cond = from_src[:, None].expand_as(src_img)
    assert torch.equal(mixed_img, torch.where(cond, src_img, tgt_img))
    assert torch.equal(src_img, src_copy) and torch.equal(tgt_img, tgt_copy)


def test_mix_is_arithmetic_for_soft_masks_and_validates_shapes() -> None:
    masks = torch.full((1, 2, 2), 0.25)
    out = mix(masks, torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    assert torch.allclose(out, torch.full((1, 3, 2, 2), 0.25))
    with pytest.raises(ValueError, match="must match"):
        mix(masks, torch.ones(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="spatial"):
        mix(masks, torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4))


def test_with_num_classes_the_ignore_label_is_one_candidate_and_nothing_is_read() -> None:
    """`num_classes` given: every label outside [0, C) is the one ignore candidate, ceil(n/2) of
    the batch's n candidates per image, and the sampling reads no value back to the host."""
    from torch.profiler import profile

    labels = _labels_all_classes()  # {0, 1, 2, 3, 255}: n = 5 -> 3 chosen
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        masks = sample_class_masks(labels, g, num_classes=19)
        for b in range(2):
            chosen = _chosen_classes(masks[b], labels[b])
            assert len(chosen) == 3
            assert torch.equal(masks[b].bool(), torch.isin(labels[b], torch.tensor(sorted(chosen))))
    with profile() as prof:
        sample_class_masks(labels, g, num_classes=19)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2"}
