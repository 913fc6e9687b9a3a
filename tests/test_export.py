"""Tests for the ONNX export: round trip through onnxruntime at two sizes, normalisation and argmax
variants, the `dida export` command, and `dida predict --onnx` against PyTorch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from test_cli_test import make_run  # noqa: E402

from dida.cli.main import main  # noqa: E402
from dida.data.transforms import normalize_tensor  # noqa: E402
from dida.eval.inference import encode_decode  # noqa: E402
from dida.export import OnnxSegmentor, check_export, export_onnx  # noqa: E402
from dida.models import build_segmentor  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
SIZES = [(64, 128), (45, 77)]  # two sizes, the second not a multiple of 32


@pytest.fixture(scope="module")
def segmentor() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_segmentor("mit_b0", num_classes=5, embed_dim=32, dilations=(1, 2))
    with torch.no_grad():
        model.head.conv_seg.weight.mul_(20.0)  # spread the logits: several classes in the argmax
    return model.eval()


def test_export_round_trip_dynamic_batch_and_sizes(
    segmentor: torch.nn.Module, tmp_path: Path
) -> None:
    path = tmp_path / "model.onnx"
    export_onnx(segmentor, path, metadata={"dida.config": json.dumps({"x": 1})})
    onnx_model = OnnxSegmentor(path)
    assert onnx_model.config == {"x": 1} and not onnx_model.takes_uint8
    import onnx

    assert onnx.load(str(path)).opset_import[0].version >= 17
    for size, batch in zip(SIZES, (1, 3), strict=True):  # traced at batch 2 and 64x96
        (result,) = check_export(
            segmentor, onnx_model, [size], include_normalize=False, argmax=False, batch=batch
        )
        assert result.shape == (batch, 3, *size)
        assert result.ok and result.max_abs_diff <= 1e-4, result
    # the same numbers computed here, and onnxruntime called the way `dida predict` calls it
    img = normalize_tensor(torch.randint(0, 256, (2, 3, 45, 77)))
    with torch.no_grad():
        expected = encode_decode(segmentor, img)
        actual = onnx_model(img)[0]
    assert actual.shape == (2, 5, 45, 77)
    assert (actual - expected).abs().max() <= 1e-4
    assert len(expected.argmax(1).unique()) > 1


def test_export_with_normalisation_and_argmax(segmentor: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "labels.onnx"
    export_onnx(segmentor, path, include_normalize=True, argmax=True)
    onnx_model = OnnxSegmentor(path)
    assert onnx_model.takes_uint8 and onnx_model.outputs_labels
    image = torch.randint(0, 256, (2, 3, 45, 77), dtype=torch.uint8)
    labels = onnx_model.run(image.numpy())
    with torch.no_grad():
        expected = encode_decode(segmentor, normalize_tensor(image)).argmax(1).numpy()
    assert labels.shape == (2, 45, 77) and np.array_equal(labels, expected)
    results = check_export(segmentor, onnx_model, SIZES, include_normalize=True, argmax=True)
    assert all(r.ok and r.label_agreement == 1.0 for r in results)
    # a broken export fails the check: a model with other weights
    torch.manual_seed(1)
    other = build_segmentor("mit_b0", num_classes=5, embed_dim=32, dilations=(1, 2)).eval()
    results = check_export(other, onnx_model, SIZES[:1], include_normalize=True, argmax=True)
    assert not results[0].ok


def test_dida_export_and_predict_onnx(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = make_run(tmp_path / "run")
    out = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("max |Δ logits|") == 2 and "(ok)" in text and "FAILED" not in text
    assert "1x3x64x128" in text  # the run's test scale, then a second size
    before = out.read_bytes()
    assert main(["export", str(run_dir), "-o", str(out)]) == 2  # never overwritten silently
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before

    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k, shape in enumerate([(50, 90, 3), (90, 50, 3), (64, 128, 3)]):
        cv2.imwrite(str(images / f"{k}.png"), rng.integers(0, 256, shape, dtype=np.uint8))
    common = ["--save", "label", "--workers", "0", "--no-progress"]
    torch_out, onnx_out = tmp_path / "torch", tmp_path / "onnx"
    assert main(["predict", str(run_dir), str(images), "-o", str(torch_out), *common]) == 0
    assert main(["predict", "--onnx", str(out), str(images), "-o", str(onnx_out), *common]) == 0
    for k in range(3):
        a = cv2.imread(str(torch_out / f"{k}_trainIds.png"), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(onnx_out / f"{k}_trainIds.png"), cv2.IMREAD_UNCHANGED)
        assert a.shape == b.shape and (a == b).mean() > 0.999

    # the README's deployment snippet (onnxruntime, numpy, OpenCV only) gives the same labels
    snippet = next(
        b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "ort." in b
    )
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run_dir), "-o", "model_uint8.onnx", "--include-normalize"]) == 0
    (tmp_path / "street.png").write_bytes((images / "0.png").read_bytes())
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    expected = cv2.imread(str(torch_out / "0_trainIds.png"), cv2.IMREAD_UNCHANGED)
    assert namespace["labels"].shape == expected.shape
    assert (namespace["labels"] == expected).mean() > 0.999
