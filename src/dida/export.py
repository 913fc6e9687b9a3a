"""ONNX export of a segmentor (`dida export`) and its onnxruntime runner (`dida predict --onnx`).

The exported graph is `encode_decode`: the segmentor plus the bilinear upsampling of its 1/4
logits to the input size, with dynamic batch, height and width; optionally the ImageNet
normalisation in front (uint8 RGB input) and an argmax behind (label output). The resolved config
travels in the ONNX metadata (`dida.config`), so a deployment needs the .onnx file only.

Exporter: `torch.onnx.export(..., dynamo=False)`, the TorchScript tracer with `dynamic_axes`.
The dynamo exporter needs the extra `onnxscript` package; the tracer was checked here (torch
2.13, onnxruntime 1.32) to give PyTorch's logits within 1e-7 to 1e-5 (random MiT-B0 models) at
several batch sizes and image sizes. Tracing records the two Python shape comparisons of the
model (head: "resize this level if its size differs"; `encode_decode`: "resize logits if they
differ from the input") as always-resize, which is exact at every size: a resize to the same size
is the identity.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dida.data.transforms import IMG_MEAN, IMG_STD, normalize_tensor
from dida.errors import CheckpointError, UserError
from dida.eval.inference import encode_decode

OPSET = 17
INPUT_NAME = "image"
# sample input traced once; batch 2 and H != W so that no dynamic size is specialised to 1 or H = W
_TRACE_SHAPE = (2, 3, 64, 96)


class ExportModule(nn.Module):
    """What is exported: optional normalisation, segmentor, upsampling, optional argmax.

    Shapes:
        image: [B, 3, H, W] float32 normalised, or uint8 RGB with `include_normalize`.
        returns: logits [B, C, H, W] float32, or labels [B, H, W] int64 with `argmax`.
    """

    def __init__(self, segmentor: nn.Module, include_normalize: bool, argmax: bool) -> None:
        super().__init__()
        self.segmentor, self.include_normalize, self.argmax = segmentor, include_normalize, argmax

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        img = normalize_tensor(image) if self.include_normalize else image
        logits = encode_decode(self.segmentor, img)
        return logits.argmax(dim=1) if self.argmax else logits


def export_onnx(
    segmentor: nn.Module,
    path: str | Path,
    *,
    include_normalize: bool = False,
    argmax: bool = False,
    opset: int = OPSET,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the segmentor (on the CPU, fp32, eval mode) as an ONNX file with dynamic B, H, W."""
    import onnx

    if opset < OPSET:
        raise UserError(f"--opset {opset}: expected {OPSET} or newer")
    module = ExportModule(segmentor, include_normalize, argmax).cpu().eval()
    sample = torch.randint(0, 256, _TRACE_SHAPE, dtype=torch.uint8)
    sample = sample if include_normalize else normalize_tensor(sample)
    output = "labels" if argmax else "logits"
    out_axes = (
        {0: "batch", 1: "height", 2: "width"} if argmax else {0: "batch", 2: "height", 3: "width"}
    )
    with warnings.catch_warnings():  # the tracer's shape-comparison and deprecation notes
        warnings.simplefilter("ignore")
        # the tracer; torch < 2.5 has no `dynamo` switch (and only the tracer)
        has_switch = "dynamo" in inspect.signature(torch.onnx.export).parameters
        tracer = {"dynamo": False} if has_switch else {}
        torch.onnx.export(
            module, (sample,), str(path), **tracer, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[output],
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, output: out_axes},
        )  # fmt: skip
    model = onnx.load(str(path))
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def export_metadata(
    config: dict[str, Any], include_normalize: bool, argmax: bool
) -> dict[str, str]:
    """The metadata `OnnxSegmentor` reads back: config, input and output conventions."""
    return {
        "dida.config": json.dumps(config),
        "dida.input": "uint8 RGB" if include_normalize else "float32 normalised RGB",
        "dida.output": "labels" if argmax else "logits",
        "dida.mean": json.dumps(IMG_MEAN),
        "dida.std": json.dumps(IMG_STD),
    }


class OnnxSegmentor:
    """An exported model in onnxruntime, called like a `Segmentor`: `model(img)[0]` = logits.

    Args:
        path: the .onnx file.
        device: "cpu", or "cuda" for onnxruntime's CUDA provider (if the installed build has it).
        threads: onnxruntime's intra-op threads (default: its own choice).
    """

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("onnxruntime is not installed: pip install 'dida[export]'") from None

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: ONNX file not found")
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError(f"{path}: this onnxruntime build has no CUDA provider")
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{path}: not a loadable ONNX model ({reason})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.path = path
        self.config: dict[str, Any] | None = (
            json.loads(meta["dida.config"]) if "dida.config" in meta else None
        )
        self.input_name = self.session.get_inputs()[0].name
        self.takes_uint8 = self.session.get_inputs()[0].type == "tensor(uint8)"
        self.outputs_labels = self.session.get_outputs()[0].type.startswith("tensor(int")

    def run(self, image: np.ndarray) -> np.ndarray:
        """Shapes: image [B, 3, H, W] (uint8 or float32, as exported) -> logits or labels."""
        return self.session.run(None, {self.input_name: image})[0]

    def __call__(self, img: torch.Tensor) -> tuple[torch.Tensor]:
        """Shapes: img [B, 3, H, W] float32 normalised -> ([B, C, H, W] float32 logits,)."""
        if self.outputs_labels:
            raise UserError(f"{self.path}: exported with --argmax (labels), logits are needed")
        if self.takes_uint8:  # the loader's images are resized uint8, so this is exact
            mean = torch.tensor(IMG_MEAN).view(3, 1, 1)
            std = torch.tensor(IMG_STD).view(3, 1, 1)
            image = (img.cpu() * std + mean).round().clamp(0, 255).to(torch.uint8).numpy()
        else:
            image = img.cpu().float().numpy()
        return (torch.from_numpy(self.run(image)).to(img.device),)


@dataclass
class CheckResult:
    """One size of the export check: max |Δ logits|, or for labels the share of equal pixels."""

    shape: tuple[int, ...]
    max_abs_diff: float | None
    label_agreement: float | None
    ok: bool


def check_export(
    segmentor: nn.Module,
    onnx_model: OnnxSegmentor,
    sizes: Sequence[tuple[int, int]],
    *,
    include_normalize: bool,
    argmax: bool,
    tolerance: float = 1e-4,
    batch: int = 1,
    seed: int = 0,
) -> list[CheckResult]:
    """Compare onnxruntime with PyTorch (CPU, fp32) on random images of each (H, W) in `sizes`.

    Logits pass within `tolerance`; labels pass where equal or where PyTorch's two best logits
    are within `tolerance` of each other (a tie either answer may break).
    """
    module = ExportModule(segmentor, include_normalize, argmax=False).cpu().eval()
    generator = torch.Generator().manual_seed(seed)
    results = []
    for height, width in sizes:
        image = torch.randint(0, 256, (batch, 3, height, width), generator=generator)
        image = image.to(torch.uint8) if include_normalize else normalize_tensor(image)
        with torch.no_grad():
            logits = module(image)  # [B, C, H, W]
        actual = onnx_model.run(image.numpy())
        if argmax:
            top2 = logits.topk(2, dim=1).values  # [B, 2, H, W]
            ties = (top2[:, 0] - top2[:, 1] <= tolerance).numpy()
            equal = actual == logits.argmax(dim=1).numpy()
            ok = bool((equal | ties).all())
            results.append(CheckResult(tuple(image.shape), None, float(equal.mean()), ok))
        else:
            diff = float(np.abs(actual.astype(np.float64) - logits.numpy()).max())
            results.append(CheckResult(tuple(image.shape), diff, None, diff <= tolerance))
    return results
