"""Tests for dataset construction, the validation view and the UDA pair dataset's determinism."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dida.config import DataConfig, DatasetConfig, RCSConfig
from dida.data import synthetic
from dida.data.convert import convert_dataset
from dida.data.datasets import build_dataset
from dida.data.io import read_label
from dida.data.labels import CLASSES
from dida.data.uda import VIRTUAL_LENGTH, UDADataset, build_train_dataset, build_val_dataset
from dida.errors import DataError


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("data")
    synthetic.make_gta(base / "gta", 4, size=(40, 72), seed=1)
    synthetic.make_synthia(base / "synthia", 3, size=(38, 64), seed=2)
    synthetic.make_cityscapes(base / "cityscapes", 3, size=(32, 64), seed=3)
    for kind in ("gta", "synthia", "cityscapes"):
        convert_dataset(kind, base / kind, nproc=1)
    return {k: base / k for k in ("gta", "synthia", "cityscapes")}


def test_default_layouts(roots: dict[str, Path]) -> None:
    gta = build_dataset(DatasetConfig(kind="gta", root=str(roots["gta"])))
    assert [Path(i).name for i, _ in gta.files] == [f"{k:05d}.png" for k in (1, 2, 3, 4)]
    assert Path(gta.files[2][1]).name == "00003_labelTrainIds.png"
    assert gta.label_path_to_index["00003_labelTrainIds.png"] == 2
    image, label = gta.load(0)
    assert image.shape == (40, 72, 3) and label.shape == (40, 72) and label.dtype == np.uint8
    synthia = build_dataset(DatasetConfig(kind="synthia", root=str(roots["synthia"])))
    assert len(synthia) == 3 and synthia.classes == CLASSES
    cs = build_dataset(DatasetConfig(kind="cityscapes", root=str(roots["cityscapes"]), split="val"))
    assert [Path(i).name for i, _ in cs.files][0] == "frankfurt_000000_000000_leftImg8bit.png"
    assert cs.files[0][1].endswith(
        "gtFine/val/frankfurt/frankfurt_000000_000000_gtFine_labelTrainIds.png"
    )


def test_folder_kind_and_errors(roots: dict[str, Path], tmp_path: Path) -> None:
    cfg = DatasetConfig(kind="folder", root=str(roots["gta"]), img_dir="images", ann_dir="labels",
                        seg_suffix="_labelTrainIds.png", classes=["a", "b"])  # fmt: skip
    folder = build_dataset(cfg)
    assert len(folder) == 4 and folder.classes == ("a", "b") and len(folder.palette) == 2
    with pytest.raises(DataError, match="img_dir and ann_dir"):
        build_dataset(DatasetConfig(kind="folder", root=str(roots["gta"])))
    with pytest.raises(DataError, match="kind 'nope'"):
        build_dataset(DatasetConfig(kind="nope", root=str(roots["gta"])))
    with pytest.raises(DataError, match="missing"):
        build_dataset(DatasetConfig(kind="gta", root=str(tmp_path / "missing")))
    (tmp_path / "g/images").mkdir(parents=True)
    (tmp_path / "g/labels").mkdir()
    with pytest.raises(DataError, match="no images"):
        build_dataset(DatasetConfig(kind="gta", root=str(tmp_path / "g")))
    with pytest.raises(DataError, match="RGB: image folder not found"):
        build_dataset(DatasetConfig(kind="synthia", root=str(tmp_path / "g")))
    synthetic.make_gta(tmp_path / "g", 2, size=(8, 8))
    with pytest.raises(DataError, match="00001.png: no label"):
        build_dataset(DatasetConfig(kind="gta", root=str(tmp_path / "g")))
    assert len(build_dataset(DatasetConfig(kind="gta", root=str(tmp_path / "g")), False)) == 2


def test_val_dataset(roots: dict[str, Path]) -> None:
    cfg = DatasetConfig(kind="cityscapes", root=str(roots["cityscapes"]), split="val")
    val = build_val_dataset(cfg, [32, 16])
    item = val[1]
    assert item["img"].shape == (3, 16, 32) and item["img"].dtype == torch.float32
    assert item["label"].shape == (32, 64) and item["label"].dtype == torch.int64
    assert item["img_path"].endswith("frankfurt_000000_000001_leftImg8bit.png")
    assert item["label_path"].endswith("frankfurt_000000_000001_gtFine_labelTrainIds.png")
    assert val.img_root == roots["cityscapes"] / "leftImg8bit/val"
    assert val.classes == CLASSES and len(val.palette) == 19


def _data_cfg(roots: dict[str, Path], rcs: bool) -> DataConfig:
    return DataConfig(
        source=DatasetConfig(kind="gta", root=str(roots["gta"]), scale=[64, 36]),
        target=DatasetConfig(kind="cityscapes", root=str(roots["cityscapes"]), scale=[48, 24]),
        crop_size=[24, 32],
        rcs=RCSConfig(enabled=rcs, min_pixels=100),
    )


@pytest.mark.parametrize("rcs", [True, False])
def test_uda_dataset_is_pure_function_of_seed_and_index(roots, rcs: bool) -> None:
    data = build_train_dataset(_data_cfg(roots, rcs), seed=3)
    assert len(data) == VIRTUAL_LENGTH and data.classes == CLASSES
    assert (data.rcs is not None) == rcs
    item = data[5]
    assert item["src_img"].shape == (3, 24, 32) and item["tgt_img"].shape == (3, 24, 32)
    assert item["src_label"].shape == (24, 32) and item["src_label"].dtype == torch.int64
    again = build_train_dataset(_data_cfg(roots, rcs), seed=3)[5]
    for key in item:
        assert torch.equal(item[key], again[key])
    other = data[6]
    assert not torch.equal(item["src_img"], other["src_img"])
    reseeded = build_train_dataset(_data_cfg(roots, rcs), seed=4)[5]
    assert not torch.equal(item["src_img"], reseeded["src_img"])


@pytest.mark.parametrize("rcs", [True, False])
def test_small_datasets_are_decoded_once_with_identical_items(
    roots, rcs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within the budget each file is decoded and resized once; items are bit-identical to
    those of a dataset that reads every time; above the budget nothing is kept."""
    from dida.data import uda

    cfg = _data_cfg(roots, rcs)
    cfg.target_pseudo_margins = [2, 2, 3, 3]
    monkeypatch.setattr(uda, "CACHE_BUDGET_MB", 0)
    reading = build_train_dataset(cfg, seed=2)
    assert not reading.cache
    monkeypatch.setattr(uda, "CACHE_BUDGET_MB", 512)
    cached = build_train_dataset(cfg, seed=2)
    assert cached.cache and cached.cache_bytes() == 4 * (64 * 36 * 4 + 48 * 24 * 3)
    loads: list[str] = []
    for ds in (cached.source, cached.target):
        monkeypatch.setattr(ds, "load", lambda i, _load=ds.load: loads.append(i) or _load(i))
    for i in range(20):
        item, ref = cached[i], reading[i]
        assert item.keys() == ref.keys()
        for key in item:
            assert torch.equal(item[key], ref[key]), key
    assert len(loads) <= len(cached.source) + len(cached.target) < 40  # 20 items, 2 files each
    assert all(not a.flags.writeable for pair in cached._cache.values() for a in pair
               if a is not None)  # fmt: skip
    assert reading._cache == {}


def test_uda_rcs_crop_holds_sampled_class(roots) -> None:
    data = build_train_dataset(_data_cfg(roots, True), seed=0)
    assert isinstance(data, UDADataset)
    rare = int(data.rcs.classes[0])
    hits = [int((data[i]["src_label"] == rare).sum()) > 50 for i in range(12)]
    assert np.mean(hits) > 0.5  # P(rarest) ~ 1 at T = 0.01, and crops are retried for it


def test_margin_mask() -> None:
    from dida.data.uda import margin_mask

    mask = margin_mask((10, 12), (2, 3, 1, 4))
    assert mask.dtype == np.uint8 and mask.shape == (10, 12)
    expected = np.zeros((10, 12), dtype=np.uint8)
    expected[2:7, 1:8] = 1
    assert np.array_equal(mask, expected)
    assert margin_mask((4, 4), (3, 3, 0, 0)).sum() == 0  # margins overlapping: nothing valid


def test_target_pseudo_margins_follow_the_target_crop(roots) -> None:
    """HRDA "cpl v2": the mask is resized, cropped, flipped and padded with the target image;
    the crop draws are unchanged, so the images equal those of a run without margins."""
    plain = build_train_dataset(_data_cfg(roots, False), seed=1)
    cfg = _data_cfg(roots, False)
    cfg.target_pseudo_margins = [4, 8, 6, 6]  # on the 32x64 originals; resized ×0.75 to 24x48
    data = build_train_dataset(cfg, seed=1)
    for i in range(6):
        item, ref = data[i], plain[i]
        assert "valid_pseudo_mask" not in ref
        assert torch.equal(item["tgt_img"], ref["tgt_img"])
        valid = item["valid_pseudo_mask"]
        assert valid.shape == (24, 32) and valid.dtype == torch.float32
        assert (valid[:3] == 0).all() and (valid[18:] == 0).all()  # rows 0..3 / 24..31 of 32
        assert (valid[4:17, 6:26] == 1).all()  # interior: side margins at most 5 px of the crop
    # a crop larger than the resized target is padded; padding is never valid
    cfg.crop_size = [28, 32]
    padded = build_train_dataset(cfg, seed=1)[0]["valid_pseudo_mask"]
    assert padded.shape == (28, 32) and (padded[24:] == 0).all() and padded[10].sum() > 0


def test_libpng_messages_become_a_warning_not_console_output(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """libpng prints "libpng error: IDAT: CRC error" straight to file descriptor 2; reading such a
    file gives our one-line DataError and a warning naming the file, and nothing on the console."""
    import cv2

    from dida.data.io import read_unchanged

    ok, buf = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))
    data = bytearray(buf.tobytes())
    at = data.find(b"IDAT") + 20
    data[at : at + 4] = b"\xff\xff\xff\xff"  # the IDAT chunk's CRC no longer matches
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    capfd.readouterr()
    with pytest.warns(RuntimeWarning, match=r"bad\.png: libpng error: IDAT"):
        with pytest.raises(DataError, match="cannot decode"):
            read_unchanged(bad)
    assert "libpng" not in capfd.readouterr().err
    good = tmp_path / "good.png"
    good.write_bytes(buf.tobytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file warns about nothing
        assert read_unchanged(good).shape == (32, 32, 3)


@pytest.mark.parametrize("bits", [8, 4])
def test_palette_label_pngs_give_their_indices(tmp_path: Path, bits: int) -> None:
    # a colour-coded label, as `dida predict` writes and many datasets ship: OpenCV would decode
    # its colours, the loader takes its indices (as mmseg's label loading)
    ids = np.array([[0, 1, 2, 255], [3, 3, 0, 1]], dtype=np.uint8) if bits == 8 else (
        np.array([[0, 1, 2, 15], [3, 3, 0, 1]], dtype=np.uint8)
    )  # fmt: skip
    label = Image.fromarray(ids, mode="P")
    label.putpalette([v for i in range(256) for v in (255 - i, (7 * i) % 256, 40)])
    label.save(tmp_path / "l.png", bits=bits)
    assert np.array_equal(read_label(tmp_path / "l.png"), ids)
    Image.fromarray(ids, mode="L").save(tmp_path / "gray.png")
    assert np.array_equal(read_label(tmp_path / "gray.png"), ids)  # 8-bit grayscale as before
    Image.fromarray(np.stack([ids] * 3, axis=-1), mode="RGB").save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"rgb.png: expected a single-channel 8-bit"):
        read_label(tmp_path / "rgb.png")


def test_label_values_outside_the_classes_name_their_file(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name, values in (("ok", [0, 1, 255]), ("bad", [0, 1, 255, 2, 7, 200])):
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(root / "images" / f"{name}.png")
        label = np.full((4, 6), values[-1], np.uint8)
        label[0, : len(values)] = values
        Image.fromarray(label).save(root / "labels" / f"{name}.png")
    cfg = DatasetConfig(kind="folder", root=str(root), img_dir="images", ann_dir="labels",
                        classes=["a", "b"])  # fmt: skip
    dataset = build_dataset(cfg)
    names = [Path(image).stem for image, _ in dataset.files]
    assert dataset.load(names.index("ok"))[1].tolist()[0][:3] == [0, 1, 255]
    with pytest.raises(DataError, match=r"labels/bad.png: has label values 2, 7, 200; expected the "
                       r"indices 0..1 of the dataset's 2 classes, or 255"):  # fmt: skip
        dataset.load(names.index("bad"))
    # with three classes, 2 is a class
    cfg.classes = ["a", "b", "c"]
    with pytest.raises(DataError, match="label values 7, 200;"):
        build_dataset(cfg).load(names.index("bad"))
