"""Tests for dida.eval.metrics: confusion matrix, IoU/Acc by hand, subsets, DDP reduction."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.multiprocessing as mp
from conftest import gloo_group, run_two_ranks

from dida.data.labels import CLASSES, SYNTHIA_13, SYNTHIA_16
from dida.eval.metrics import (
    SegEvaluator,
    confusion_matrix,
    format_results,
    metrics_from_confusion,
    to_jsonable,
)

# 4 classes; class 3 absent from both label and prediction; one ignored pixel (255)
LABEL = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
PRED = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])


def test_confusion_matrix_by_hand() -> None:
    conf = confusion_matrix(PRED, LABEL, num_classes=4)
    expected = torch.tensor(
        [
            [2, 1, 0, 0],  # label 0: pred 0, 1, 0
            [0, 2, 0, 0],  # label 1: pred 1, 1
            [1, 0, 1, 0],  # label 2: pred 2, 0
            [0, 0, 0, 0],
        ]
    )
    assert torch.equal(conf, expected)
    assert conf.sum() == 7  # the ignored pixel is not counted


def test_ignored_label_pixels_are_skipped_even_with_out_of_range_prediction() -> None:
    label = torch.tensor([255, 1])
    pred = torch.tensor([200, 1])  # an invalid prediction under an ignored pixel is harmless
    assert confusion_matrix(pred, label, 2).tolist() == [[0, 0], [0, 1]]
    with pytest.raises(ValueError, match="prediction values"):
        confusion_matrix(torch.tensor([5, 1]), label.clone().fill_(1), 2)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(3), torch.zeros(4), 2)


def test_metrics_hand_computed_with_absent_class_excluded() -> None:
    res = metrics_from_confusion(confusion_matrix(PRED, LABEL, 4), ["a", "b", "c", "d"])
    # IoU: I / (label + pred - I): class 0: 2/(3+3-2), class 1: 2/(2+3-2), class 2: 1/(2+1-1)
    iou = [2 / 4, 2 / 3, 1 / 2]
    acc = [2 / 3, 2 / 2, 1 / 2]
    assert [res["IoU"][k] for k in "abc"] == pytest.approx(iou)
    assert [res["Acc"][k] for k in "abc"] == pytest.approx(acc)
    assert math.isnan(res["IoU"]["d"]) and math.isnan(res["Acc"]["d"])
    assert res["mIoU"] == pytest.approx(sum(iou) / 3)  # nan-mean: class d not in the mean
    assert res["mAcc"] == pytest.approx(sum(acc) / 3)
    assert res["aAcc"] == pytest.approx(5 / 7)
    assert res["num_pixels"] == 7


def test_class_predicted_but_absent_from_labels_counts_as_zero() -> None:
    label = torch.tensor([0, 0, 0, 0])
    pred = torch.tensor([0, 0, 1, 1])
    res = metrics_from_confusion(confusion_matrix(pred, label, 3))
    assert res["IoU"]["1"] == 0.0  # union 2, intersection 0
    assert math.isnan(res["Acc"]["1"])  # no label pixels: accuracy undefined
    assert math.isnan(res["IoU"]["2"])
    assert res["mIoU"] == pytest.approx((0.5 + 0.0) / 2)


def test_evaluator_accumulates_intersection_and_union_over_dataset() -> None:
    # per-image mean IoU would differ from the dataset-level value
    ev = SegEvaluator(2)
    ev.process(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 0]))
    ev.process(torch.tensor([[1, 1]]), torch.tensor([[1, 0]]))
    res = ev.compute()
    # totals: class 0: I=3, label=5, pred=3 -> 3/5; class 1: I=1, label=1, pred=3 -> 1/3
    assert res["IoU"]["0"] == pytest.approx(3 / 5)
    assert res["IoU"]["1"] == pytest.approx(1 / 3)
    ev.reset()
    assert ev.confusion().sum() == 0
    assert math.isnan(ev.compute()["mIoU"])


def test_subsets_recomputed_from_per_class_values_not_rescaled() -> None:
    torch.manual_seed(1)
    label = torch.randint(0, 19, (64, 64))
    pred = torch.where(torch.rand(64, 64) < 0.6, label, torch.randint(0, 19, (64, 64)))
    # terrain/truck/train absent from labels and predictions: NaN, not 0
    for c in (9, 14, 16):
        label[label == c] = 255
        pred[pred == c] = 0
    res = metrics_from_confusion(
        confusion_matrix(pred, label, 19), CLASSES, {"16": SYNTHIA_16, "13": SYNTHIA_13}
    )
    iou = [res["IoU"][CLASSES[c]] for c in range(19)]
    assert all(math.isnan(iou[c]) for c in (9, 14, 16))
    mean16 = sum(iou[c] for c in SYNTHIA_16) / 16
    mean13 = sum(iou[c] for c in SYNTHIA_13) / 13
    assert res["mIoU16"] == pytest.approx(mean16)
    assert res["mIoU13"] == pytest.approx(mean13)
    assert res["mIoU"] == pytest.approx(mean16)  # the 3 NaN classes are excluded from the mean
    assert res["mIoU13"] != pytest.approx(res["mIoU"] * 19 / 13)
    assert res["subsets"] == {"16": list(SYNTHIA_16), "13": list(SYNTHIA_13)}
    with pytest.raises(ValueError, match="subset 'x'"):
        metrics_from_confusion(torch.eye(3, dtype=torch.long), subsets={"x": [0, 3]})


def test_table_and_json_output() -> None:
    ev = SegEvaluator(4, class_names=["a", "b", "c", "d"], subsets={"2": [0, 1]})
    ev.process(PRED, LABEL)
    res = ev.compute()
    text = format_results(res)
    assert "| Class | IoU   | Acc    |" in text
    assert "| a     | 50.00 | 66.67  |" in text
    assert "| d     | nan   | nan    |" in text
    assert "mIoU2" in text and "71.43" in text  # aAcc 5/7
    data = json.loads(json.dumps(to_jsonable(res), allow_nan=False))
    assert data["IoU"]["d"] is None and data["mIoU2"] == pytest.approx((0.5 + 2 / 3) / 2)


def _ddp_worker(rank: int, world: int, port: int, out: dict) -> None:
    with gloo_group(rank, world, port):
        ev = SegEvaluator(4)
        half = slice(0, 1) if rank == 0 else slice(1, 2)
        ev.process(PRED[half], LABEL[half])
        out[rank] = ev.confusion().tolist()


def test_confusion_matrix_is_all_reduced_under_ddp() -> None:
    manager = mp.Manager()
    out = manager.dict()
    run_two_ranks(_ddp_worker, out)
    expected = confusion_matrix(PRED, LABEL, 4).tolist()
    assert out[0] == expected and out[1] == expected
