"""Tests for the instance bank: updates against naive loops, fill, init, state, files, DDP."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import gloo_group, run_two_ranks

from dida.adapt.instance_bank import InstanceBank, boundary_mask, class_vectors
from dida.engine.bank_io import read_bank_file, save_bank_file
from dida.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CACHE = SHARED_DATA / "embedding_cache"

B, D, H, W, K, C = 2, 6, 7, 9, 12, 4


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    embed = torch.rand(B, D, H, W, generator=g)
    # blocky label maps, so that interior and boundary pixels both occur
    coarse = torch.randint(0, C, (B, 1, 3, 3), generator=g).float()
    labels = torch.nn.functional.interpolate(coarse, size=(H, W), mode="nearest")[:, 0].long()
    labels[:, 0, :3] = 255
    return embed, labels


def _naive_boundary(labels: torch.Tensor, threshold: int) -> torch.Tensor:
    out = torch.zeros_like(labels, dtype=torch.bool)
    b, h, w = labels.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                seen = {
                    int(labels[i, yy, xx])
                    for yy in range(max(0, y - 1), min(h, y + 2))
                    for xx in range(max(0, x - 1), min(w, x + 2))
                }
                out[i, y, x] = len(seen) >= threshold
    return out


def _naive_update(bank_feats, bank_labels, embed, labels, momentum, mode, threshold=2):
    feats = bank_feats.clone().double()
    edge = _naive_boundary(labels, threshold)
    for i in range(embed.shape[0]):
        for c in range(C):
            pix = [(y, x) for y in range(H) for x in range(W) if int(labels[i, y, x]) == c]
            if not pix:
                continue
            vec = sum(embed[i, :, y, x].double() for y, x in pix) / len(pix)
            edge_pix = [(y, x) for y, x in pix if edge[i, y, x]]
            if mode == "boundary" and edge_pix:
                edge_vec = sum(embed[i, :, y, x].double() for y, x in edge_pix) / len(edge_pix)
                vec = 0.5 * vec + 0.5 * edge_vec
            for k in range(feats.shape[0]):
                if int(bank_labels[k]) == c:
                    feats[k] = momentum * feats[k] + (1 - momentum) * vec
    return feats.float()


def _full_bank(mode: str = "class_mean", momentum: float = 0.9) -> InstanceBank:
    bank = InstanceBank(K, D, C, momentum=momentum, update_mode=mode)
    bank.init_random_(torch.Generator().manual_seed(1))
    return bank


@pytest.mark.parametrize("mode", ["class_mean", "boundary"])
def test_update_matches_naive_loop(mode: str) -> None:
    embed, labels = _data()
    bank = _full_bank(mode)
    expected = _naive_update(bank.feats, bank.labels, embed, labels, 0.9, mode)
    bank.update_(embed, labels)
    torch.testing.assert_close(bank.feats, expected, rtol=1e-5, atol=1e-6)


def test_boundary_mode_differs_from_class_mean() -> None:
    embed, labels = _data()
    a, b = _full_bank("class_mean"), _full_bank("boundary")
    a.update_(embed, labels)
    b.update_(embed, labels)
    assert not torch.allclose(a.feats, b.feats)


def test_absent_classes_untouched() -> None:
    embed, labels = _data()
    labels[labels == 2] = 0
    labels[labels == 3] = 255
    bank = _full_bank()
    before = bank.feats.clone()
    bank.update_(embed, labels)
    absent = (bank.labels == 2) | (bank.labels == 3)
    assert torch.equal(bank.feats[absent], before[absent])
    assert not torch.allclose(bank.feats[~absent], before[~absent])


def test_all_ignore_batch_leaves_bank_unchanged() -> None:
    embed, _ = _data()
    bank = _full_bank()
    before = bank.feats.clone()
    bank.update_(embed, torch.full((B, H, W), 255))
    assert torch.equal(bank.feats, before)


def test_boundary_mask_hand_drawn() -> None:
    labels = torch.tensor(
        [
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0],
        ]
    )[None]
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 0],
            [0, 1, 1, 1, 1],
            [0, 1, 1, 1, 1],
            [0, 1, 1, 1, 1],
            [0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )[None]
    assert torch.equal(boundary_mask(labels, 2), expected)
    assert not boundary_mask(labels, 3).any()
    three = labels.clone()
    three[0, 0, 0] = 255  # the ignore label counts as a label
    assert boundary_mask(three, 3)[0].nonzero().tolist() == [[1, 1]]
    assert torch.equal(boundary_mask(three, 3), _naive_boundary(three, 3))


def test_boundary_mask_general_threshold_matches_naive() -> None:
    labels = torch.randint(0, 3, (2, 6, 8), generator=torch.Generator().manual_seed(3))
    for threshold in (2, 3, 4):
        assert torch.equal(boundary_mask(labels, threshold), _naive_boundary(labels, threshold))


def test_class_vectors_presence_and_fallback() -> None:
    embed = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    vectors, present = class_vectors(embed, labels, 3, mode="boundary")
    # a single class has no boundary pixel: falls back to the plain class mean
    torch.testing.assert_close(vectors[0, 0], embed[0].mean(dim=(1, 2)))
    assert present.tolist() == [[True, False, False]]
    assert torch.equal(vectors[0, 1:], torch.zeros(2, 2))


def test_online_fill_is_class_balanced() -> None:
    bank = InstanceBank(10, D, C)
    g = torch.Generator().manual_seed(0)
    full = False
    steps = 0
    while not full:
        labels = torch.randint(0, C, (B, H, W), generator=g)
        labels[:, 0, 0] = 0  # class 0 is in every image: it must still stop at ceil(10/4) = 3
        full = bank.fill_online_(torch.rand(B, D, H, W, generator=g), labels)
        steps += 1
        assert bank.class_counts().max() <= 3
    assert int(bank.count) == 10 and bank.is_full
    assert sorted(bank.class_counts().tolist()) == [2, 2, 3, 3]
    assert steps <= 5


def test_online_fill_with_missing_class_still_fills() -> None:
    bank = InstanceBank(10, D, C)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        labels = torch.randint(0, C - 1, (B, H, W), generator=g)  # class 3 never occurs
        if bank.fill_online_(torch.rand(B, D, H, W, generator=g), labels):
            break
    assert bank.is_full
    counts = bank.class_counts().tolist()
    assert counts[3] == 0 and sorted(counts[:3]) == [3, 3, 4]


def test_online_fill_stores_image_class_means() -> None:
    embed, labels = _data()
    bank = InstanceBank(100, D, C)
    assert not bank.fill_online_(embed, labels)
    vectors, present = class_vectors(embed, labels, C)
    expected = vectors[present]  # image-major, class ascending
    n = int(bank.count)
    assert n == int(present.sum())
    torch.testing.assert_close(bank.feats[:n], expected)
    assert bank.labels[:n].tolist() == present.nonzero()[:, 1].tolist()


def test_init_random_unit_round_robin() -> None:
    bank = _full_bank()
    torch.testing.assert_close(bank.feats.norm(dim=1), torch.ones(K))
    assert bank.labels.tolist() == [k % C for k in range(K)]
    assert bank.is_full and bank.class_counts().tolist() == [3, 3, 3, 3]


def test_state_dict_round_trip() -> None:
    bank = InstanceBank(K, D, C)
    embed, labels = _data()
    bank.fill_online_(embed, labels)
    state = bank.state_dict()
    assert set(state) == {"feats", "labels", "count"}
    fresh = InstanceBank(K, D, C)
    fresh.load_state_dict(state)
    assert int(fresh.count) == int(bank.count) > 0
    assert torch.equal(fresh.feats, bank.feats) and torch.equal(fresh.labels, bank.labels)
    assert fresh.count.dtype == torch.long and fresh.count.dim() == 0
    # the host's copy of the count (is_full never reads the device) follows the loaded buffer
    assert fresh.filled == bank.filled == int(bank.count)
    assert fresh.is_full == bank.is_full


def test_load_checks_shapes_and_labels() -> None:
    bank = InstanceBank(K, D, C)
    with pytest.raises(ValueError, match="expected"):
        bank.load_(torch.zeros(K + 1, D), torch.zeros(K + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        bank.load_(torch.zeros(K, D), torch.full((K,), C))


def test_update_rejects_bad_shapes() -> None:
    bank = _full_bank()
    with pytest.raises(ValueError, match="labels"):
        bank.update_(torch.rand(B, D, H, W), torch.zeros(B, H + 1, W, dtype=torch.long))
    with pytest.raises(ValueError, match="embedding"):
        bank.update_(torch.rand(B, D + 1, H, W), torch.zeros(B, H, W, dtype=torch.long))


def test_save_read_round_trip(tmp_path: Path) -> None:
    bank = _full_bank()
    for name in ("bank.pt", "bank.safetensors"):
        save_bank_file(tmp_path / name, bank.feats, bank.labels)
        feats, labels = read_bank_file(tmp_path / name, size=K, dim=D, num_classes=C)
        assert torch.equal(feats, bank.feats) and torch.equal(labels, bank.labels)
    with pytest.raises(DataError, match="bank.pt.*K=12"):
        read_bank_file(tmp_path / "bank.pt", size=K + 1)
    with pytest.raises(DataError, match="not found"):
        read_bank_file(tmp_path / "missing.pt")


def test_read_npz_pair_layout(tmp_path: Path) -> None:
    np.savez(tmp_path / "f_buffer_s.npz", np.ones((5, 3), np.float32))
    np.savez(tmp_path / "l_buffer_s.npz", np.arange(5, dtype=np.int64))
    for src in (tmp_path, tmp_path / "f_buffer_s.npz", tmp_path / "l_buffer_s.npz"):
        feats, labels = read_bank_file(src)
        assert feats.shape == (5, 3) and labels.tolist() == [0, 1, 2, 3, 4]
    np.savez(tmp_path / "l_buffer_s.npz", np.arange(4, dtype=np.int64))
    with pytest.raises(DataError, match="expected \\[K, D\\] and \\[K\\]"):
        read_bank_file(tmp_path)
    (tmp_path / "l_buffer_s.npz").unlink()
    with pytest.raises(DataError, match="l_buffer_s.npz: bank file not found"):
        read_bank_file(tmp_path)


@pytest.mark.skipif(not CACHE.is_dir(), reason="shared embedding_cache not available")
def test_import_original_caches(caplog: pytest.LogCaptureFixture) -> None:
    feats, labels = read_bank_file(CACHE / "gta_balanced_300", size=300, dim=256, num_classes=19)
    assert feats.dtype == torch.float32 and labels.dtype == torch.long
    counts = torch.bincount(labels, minlength=19).tolist()
    assert counts == [16, 16, 16, 17, 15, 17, 16, 16, 17, 17, 16, 16, 15, 15, 15, 15, 15, 15, 15]
    bank = InstanceBank(300, 256, 19)
    with caplog.at_level(logging.WARNING, logger="dida.adapt.instance_bank"):
        bank.load_(feats, labels)
    assert not caplog.records
    feats, labels = read_bank_file(CACHE / "synthia_300", size=300, dim=256, num_classes=19)
    with caplog.at_level(logging.WARNING, logger="dida.adapt.instance_bank"):
        bank.load_(feats, labels)
    assert "[9, 14, 16]" in caplog.text
    assert bank.is_full and bank.class_counts()[[9, 14, 16]].tolist() == [0, 0, 0]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world, port):
        for mode in ("class_mean", "boundary"):
            bank = InstanceBank(K, D, C, momentum=0.9, update_mode=mode)
            bank.init_random_(torch.Generator().manual_seed(1))
            embed, labels = _data(seed=10 + rank)  # different data per rank
            bank.update_(embed, labels)
            fill = InstanceBank(K, D, C)
            fill.fill_online_(embed, labels)
            ref = InstanceBank(K, D, C, momentum=0.9, update_rule="reference")
            ref.init_random_(torch.Generator().manual_seed(1))
            ref.update_(embed, labels)
            torch.save(
                {"update": bank.state_dict(), "fill": fill.state_dict(), "ref": ref.state_dict()},
                os.path.join(out_dir, f"{mode}_{rank}.pt"),
            )


def test_ddp_ranks_end_with_identical_bank() -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    with tempfile.TemporaryDirectory() as out_dir:
        run_two_ranks(_ddp_worker, out_dir)
        for mode in ("class_mean", "boundary"):
            r0, r1 = (torch.load(f"{out_dir}/{mode}_{r}.pt") for r in (0, 1))
            for key in ("update", "fill"):
                for name in ("feats", "labels", "count"):
                    assert torch.equal(r0[key][name], r1[key][name])
            # the synced result equals one process applying rank 0's then rank 1's images
            bank = InstanceBank(K, D, C, momentum=0.9, update_mode=mode)
            bank.init_random_(torch.Generator().manual_seed(1))
            (e0, l0), (e1, l1) = _data(10), _data(11)
            bank.update_(torch.cat([e0, e1]), torch.cat([l0, l1]))
            torch.testing.assert_close(r0["update"]["feats"], bank.feats)
            # the reference rule: one event per rank, applied in rank order on every rank
            assert torch.equal(r0["ref"]["feats"], r1["ref"]["feats"])
            ref = InstanceBank(K, D, C, momentum=0.9, update_rule="reference")
            ref.init_random_(torch.Generator().manual_seed(1))
            ref.update_(e0, l0)
            ref.update_(e1, l1)
            torch.testing.assert_close(r0["ref"]["feats"], ref.feats)
