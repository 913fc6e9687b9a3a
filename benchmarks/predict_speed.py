"""Inference speed (images/s) of the segmentor: PyTorch eager against onnxruntime.

Times what `dida predict` runs per batch and what `dida export` writes: the segmentor and the
upsampling of its logits to the input size (`encode_decode`), fp32, on random weights (speed does
not depend on them). Each (variant, size, batch) is exported once to a temporary ONNX file. On a
GPU, PyTorch also runs with bf16 autocast, and onnxruntime with its CUDA provider if installed.
Rows are printed as they finish; the first call of each row is a warm-up, not timed.

    python benchmarks/predict_speed.py          # MiT-B0 and MiT-B5 at 1024x512 and 2048x1024
    python benchmarks/predict_speed.py --variant mit_b0 --size 1024x512 --batch 1 4 --repeats 5
    python benchmarks/predict_speed.py --device cuda --precision bf16 fp32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dida.errors import UserError
from dida.eval.inference import encode_decode
from dida.export import OnnxSegmentor, export_onnx
from dida.models import build_segmentor

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _size(text: str) -> tuple[int, int]:
    """`1024x512` (W x H) -> (H, W)."""
    width, height = (int(v) for v in text.lower().split("x"))
    return height, width


def _rate(fn: Callable[[], object], batch: int, repeats: int, device: torch.device) -> float:
    """Images per second of `fn` over `repeats` timed calls after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def _torch_fn(
    model: torch.nn.Module, img: torch.Tensor, dtype: torch.dtype
) -> Callable[[], object]:
    def run() -> torch.Tensor:
        with (
            torch.no_grad(),
            torch.autocast(img.device.type, dtype=dtype, enabled=dtype != torch.float32),
        ):
            return encode_decode(model, img)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", nargs="+", default=["mit_b0", "mit_b5"])
    parser.add_argument(
        "--size", nargs="+", type=_size, default=[(512, 1024), (1024, 2048)], help="WxH"
    )
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument(
        "--backend", nargs="+", choices=("torch", "onnx"), default=["torch", "onnx"]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=tuple(_DTYPES),
        default=None,
        help="PyTorch autocast dtypes (default: fp32 on CPU, bf16 on GPU)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row (default 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="CPU threads of PyTorch and onnxruntime (default: PyTorch's)",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    precisions = args.precision or (["bf16"] if device.type == "cuda" else ["fp32"])
    print(f"device {device}, {args.threads} CPU threads, {args.repeats} timed calls per row")
    print("| model | size (WxH) | batch | backend | img/s | s/batch |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variant:
            model = build_segmentor(variant).eval()
            onnx_path = Path(tmp) / f"{variant}.onnx"
            session = None
            if "onnx" in args.backend:
                export_onnx(model, onnx_path)
                try:
                    session = OnnxSegmentor(onnx_path, device=device.type, threads=args.threads)
                except UserError as err:  # e.g. an onnxruntime build without the CUDA provider
                    print(f"onnxruntime skipped: {err}")
            model.to(device)
            for height, width in args.size:
                for batch in args.batch:
                    img = torch.randn(batch, 3, height, width)
                    rows: list[tuple[str, Callable[[], object]]] = []
                    if "torch" in args.backend:
                        rows += [
                            (f"PyTorch {p}", _torch_fn(model, img.to(device), _DTYPES[p]))
                            for p in precisions
                        ]
                    if session is not None:
                        array = img.numpy()
                        rows.append(("onnxruntime fp32", lambda a=array, s=session: s.run(a)))
                    for name, fn in rows:
                        rate = _rate(fn, batch, args.repeats, device)
                        print(
                            f"| {variant} | {width}x{height} | {batch} | {name} ({device.type}) "
                            f"| {rate:.2f} | {batch / rate:.2f} |",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
