"""Seconds per iteration, peak memory, and with --profile the step's dispatch profile.

Runs the real method module (`dida.adapt`) with the engine's optimizer, precision and compile
settings on random tensors of the given crop, so it measures the step itself, not data loading.
Every case runs in a fresh subprocess (its own peak memory) with an empty compile cache of its own
(torch's on-disk Inductor/Triton cache would otherwise hand one case's compiled blocks to the next).
Every list option multiplies the cases. Examples:

    python benchmarks/train_step.py --method daformer dida --variant mit_b0 --crop 512 --batch 2
    python benchmarks/train_step.py --profile --variant mit_b5 --method dida --repeats 1
    python benchmarks/train_step.py --device cuda --variant mit_b5 --profile \
        --method daformer dida --precision bf16 fp32 --feat-dist on off
    python benchmarks/train_step.py --device cuda --variant mit_b5 --profile --table

Columns:
  s/it          median over --repeats timed steps (after --warmup steps, which include compiling)
  peak MB       CUDA `max_memory_allocated`; on the CPU the process's peak resident set (VmHWM)
  --profile adds one profiled step (torch.profiler) after the timed ones:
  dispatches    ATen operators that do work (leaf operators; views, allocations and memsets
                excluded; an operator whose operators below only allocate counts once): on
                CUDA each is one kernel launch or more, so the CPU count is the launch count a
                GPU run would have, without a GPU; in brackets those of `optimizer.step()` (a
                for-loop AdamW, the CPU default, dispatches ~10 per parameter; foreach/fused few;
                DIDA's instance loss runs in a GPU's chunks here, not a CPU's cache-sized ones,
                and attention takes SDPA's backward, not the CPU's explicit one of small maps)
  memsets       zero_/fill_ (a memset or a tiny kernel on CUDA), apart from the dispatches
  launches      CUDA only: kernel launches (cudaLaunchKernel and friends) of the step
  syncs         host synchronisations: CUDA `torch.cuda.set_sync_debug_mode` warnings; on the CPU
                the operators that would synchronise on a GPU (.item(), bool(), nonzero, unique;
                not the AdamW step counters or `torch._assert_async`, which do not on CUDA,
                nor the CPU-only shortcuts' reads of `dida.eval.inference.cpu_any`)
  GPU busy      kernel time of the profiled step / s/it
  compile s     wall time of the warm-up steps (compilation included) minus warm-up x s/it: a
                cold compile, as a user's first run; --warm-cache: with torch's shared on-disk
                cache, as later runs on the same machine
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

from _memory import peak_mb

# operators that only create views or allocate: no kernel on any device
VIEW_OPS = {
    "aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::_reshape_alias",
    "aten::reshape", "aten::transpose", "aten::permute", "aten::expand", "aten::expand_as",
    "aten::squeeze", "aten::unsqueeze", "aten::slice", "aten::select", "aten::t",
    "aten::alias", "aten::detach", "aten::detach_", "aten::unbind", "aten::split",
    "aten::split_with_sizes", "aten::chunk", "aten::narrow", "aten::empty", "aten::empty_like",
    "aten::empty_strided", "aten::resize_", "aten::lift_fresh", "aten::set_",
    "aten::result_type", "aten::contiguous", "aten::to", "aten::view_as", "aten::flatten",
    "aten::unflatten", "aten::diagonal", "aten::numpy_T", "aten::movedim", "aten::swapaxes",
    "aten::type_as", "aten::_has_compatible_shallow_copy_type", "aten::is_same_size",
    "aten::_shape_as_tensor", "aten::size", "aten::stride", "aten::item", "aten::is_nonzero",
    "aten::requires_grad_", "aten::retain_grad", "aten::output_nr", "aten::_version",
    "aten::align_as", "aten::broadcast_tensors", "aten::expand_copy", "aten::unfold",
    "aten::_nested_tensor_from_mask_left_aligned", "aten::lift", "aten::conj",
    "aten::resolve_conj", "aten::resolve_neg", "aten::_neg_view", "aten::_conj",
    "aten::dropout", "aten::feature_dropout", "aten::real", "aten::imag", "aten::_fw_primal",
    "aten::_make_dual", "aten::as_strided_", "aten::new_empty", "aten::new_empty_strided",
}  # fmt: skip
# an allocation and a memset: the memset below is counted as one
FILLED_ALLOCATIONS = {
    "aten::zeros", "aten::zeros_like", "aten::new_zeros", "aten::ones", "aten::ones_like",
    "aten::new_ones", "aten::full", "aten::full_like", "aten::new_full",
}  # fmt: skip
# zero_/fill_ are memsets (cudaMemsetAsync or a tiny kernel); they are counted apart below
MEMSET_OPS = {"aten::zero_", "aten::fill_"}
# operators that are no work of their own (memsets are counted apart)
NO_WORK_OPS = VIEW_OPS | FILLED_ALLOCATIONS | MEMSET_OPS
# scopes whose reads are no syncs: `_assert_async` reads its flag on the CPU (asynchronous on
# CUDA); `cpu_any` reads CPU tensors only, for shortcuts that a GPU run does not take
NO_SYNC_SCOPES = ("aten::_assert_async", "dida.cpu_host_read")
# operators that make the host wait for the device on CUDA
SYNC_OPS = {
    "aten::_local_scalar_dense", "aten::nonzero", "aten::_unique", "aten::_unique2",
    "aten::unique_dim", "aten::unique_consecutive", "aten::equal",
}  # fmt: skip
# multi-tensor operators (the EMA update, fused AdamW): the CPU runs them tensor by tensor, CUDA
# launches one kernel per ~110 tensors (multi_tensor_apply), which is what is counted
MULTI_TENSOR_OPS = ("aten::_foreach_", "aten::_fused_")
# with torch.compile on the CPU, `torch._inductor.config.cpp.enable_kernel_profile` names each
# generated kernel in the profile
INDUCTOR_KERNEL_PREFIXES = ("cpp_fused_", "graph_")
LAUNCH_EVENTS = {
    "cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
    "cudaGraphLaunch", "cudaLaunchCooperativeKernel",
}  # fmt: skip


def _config(case: argparse.Namespace):  # noqa: ANN202
    from dida.config import ExperimentConfig

    cfg = ExperimentConfig()  # the defaults are the DIDA reference preset (experiments 7 and 8)
    cfg.model.variant, cfg.model.pretrained = case.variant, None
    cfg.method.name = case.method
    cfg.method.instance.resolution = case.resolution
    cfg.method.feat_dist.enabled = case.feat_dist == "on"
    cfg.data.batch_size = case.batch
    cfg.data.crop_size = [case.crop, case.crop]
    cfg.train.precision = case.precision
    cfg.train.compile = case.compile
    cfg.train.compile_mode = case.compile_mode
    if case.device == "cpu" and case.method == "dida" and case.resolution == "input":
        # a GPU's chunks of the instance loss (a CPU's are cache-sized, many more), so that the
        # CPU's dispatch count is a GPU's launch count
        try:
            from dida.adapt.instance import chunk_rows
        except ImportError:  # an older tree: one plan for every device
            return cfg
        row_bytes = case.batch * cfg.method.bank.size * case.crop * 4  # one fp32 row of [B, K, W]
        cfg.method.instance.chunk_size = chunk_rows(
            case.crop, row_bytes, 0, cfg.method.instance.chunk_memory_mb << 20
        )
    return cfg


def _build(case: argparse.Namespace, device):  # noqa: ANN001, ANN202
    """The method, optimizer and one-step function the engine would build for `case`."""
    import copy

    import torch

    from dida.engine import build
    from dida.engine.optim import build_optimizer
    from dida.engine.train import resolve_precision

    cfg = _config(case)
    try:
        dtype = resolve_precision(cfg.train.precision, device, training=True)
    except TypeError:  # an older tree
        dtype = resolve_precision(cfg.train.precision, device)
    method = build.build_method(cfg, None, device)
    if cfg.method.feat_dist.enabled and method.imnet is None:  # no pretrained weights offline
        method.imnet = copy.deepcopy(method.student.encoder).requires_grad_(False).eval()
    if cfg.method.name == "dida":  # full, and like a real run's bank of class means of post-ReLU
        # embeddings: non-negative (Gaussian entries give negative similarities, so a NaN L_in
        # whose log and masked fills take slow paths on a CPU)
        method.bank.init_random_(torch.Generator().manual_seed(0))
        method.bank.feats.abs_()
    try:
        from dida.engine.speed import prepare_method
    except ImportError:  # an older tree (the "before" numbers): no speed settings
        prepare_method = None
        if case.compile not in ("false", False):
            method.set_student_forward(torch.compile(method.student))
    if prepare_method is not None:
        prepare_method(method, cfg.train.compile, dtype, mode=case.compile_mode)
    optimizer = build_optimizer(method.student, cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    try:  # the engine's backward (later passes accumulate with one multi-tensor add)
        from dida.engine.speed import StepBackward

        backward = StepBackward(method.student.parameters(), scaler.scale)
    except ImportError:  # an older tree: autograd's per-parameter accumulation
        def backward(loss):  # noqa: ANN001, ANN202
            return scaler.scale(loss).backward()

    def step(batch: dict, i: int) -> object:
        optimizer.zero_grad(set_to_none=True)
        method.update_teacher(i)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = method.forward_backward(batch, i, backward, False)
        scaler.step(optimizer)
        scaler.update()
        return out

    return cfg, step


def _batch(cfg, device):  # noqa: ANN001, ANN202
    import torch

    b, (h, w), c = cfg.data.batch_size, cfg.data.crop_size, cfg.model.num_classes
    gen = torch.Generator().manual_seed(1)
    cell = 32  # label blocks of 32x32 pixels, so that ClassMix and the bank see class regions
    label = torch.randint(0, c, (b, -(-h // cell), -(-w // cell)), generator=gen)
    label = label.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :h, :w]
    return {
        "src_img": torch.randn(b, 3, h, w, generator=gen).to(device),
        "src_label": label.contiguous().to(device),
        "tgt_img": torch.randn(b, 3, h, w, generator=gen).to(device),
    }


def _profile(step, batch: dict, i: int, device) -> dict:  # noqa: ANN001
    """Dispatches, launches, memsets, syncs and kernel time of one step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import dida.models.mit

    # a GPU runs SDPA's own attention backward: count that, not the CPU's explicit one (an older
    # tree has no such switch and ignores it)
    dida.models.mit.CPU_ATTENTION_BACKWARD_MAX = 0
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        step(batch, i)
        if device.type == "cuda":
            torch.cuda.synchronize()
    dispatches = memsets = syncs = optimizer = 0
    for evt in prof.events():
        name = evt.name
        in_optimizer = _under(evt, "Optimizer.step")
        if name.startswith(INDUCTOR_KERNEL_PREFIXES):  # a compiled region's generated kernel
            dispatches += 1
            optimizer += in_optimizer
            continue
        if not name.startswith("aten::") or _under(evt.cpu_parent, MULTI_TENSOR_OPS):
            continue
        syncs += name in SYNC_OPS and not in_optimizer and not _under(evt, NO_SYNC_SCOPES)
        if name.startswith(MULTI_TENSOR_OPS):  # one launch per ~100 tensors on CUDA
            n = max(1, math.ceil(sum(c.name.startswith("aten::") for c in evt.cpu_children) / 110))
        elif name in MEMSET_OPS:
            memsets += 1
            continue
        elif name in NO_WORK_OPS or _does_work_below(evt):
            continue  # no work, or a composite counted through its leaves
        else:
            n = 1
        dispatches += n
        optimizer += n * in_optimizer
    out = {"dispatches": dispatches, "memsets": memsets, "syncs": syncs,
           "optimizer_dispatches": optimizer}  # fmt: skip
    if device.type == "cuda":
        from torch.autograd import DeviceType

        out["launches"] = sum(e.count for e in prof.key_averages() if e.key in LAUNCH_EVENTS)
        # device-side events (kernels, memcpy, memset) of the step, one stream: their sum is the
        # time the GPU was busy
        device_us = [e.time_range.elapsed_us() for e in prof.events()
                     if e.device_type == DeviceType.CUDA]  # fmt: skip
        out["kernel_s"] = sum(device_us) / 1e6
        out["syncs"] = _cuda_syncs(step, batch, i + 1)
    return out


def _does_work_below(evt) -> bool:  # noqa: ANN001
    """Whether an ATen operator below `evt` does work (not a view, allocation or memset)."""
    for child in evt.cpu_children:
        name = child.name
        if name.startswith("aten::") and (
            name not in NO_WORK_OPS or _does_work_below(child)
        ):
            return True
    return False


def _under(evt, prefixes: str | tuple[str, ...]) -> bool:  # noqa: ANN001
    """Whether `evt` or one of its callers is named `prefixes...`: `Optimizer.step` (the for-loop
    AdamW reads its step counters with `.item()`, host tensors on CUDA too) or
    `aten::_assert_async` (reads its flag on the CPU, asynchronous on CUDA) are no syncs."""
    while evt is not None:
        if evt.name.startswith(prefixes):
            return True
        evt = evt.cpu_parent
    return False


def _cuda_syncs(step, batch: dict, i: int) -> int:  # noqa: ANN001
    """Synchronising CUDA calls of one step, as `torch.cuda.set_sync_debug_mode` reports them."""
    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch, i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


def _recompiles() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def run_case(case: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    device = torch.device(case.device)
    if case.threads:
        torch.set_num_threads(case.threads)
    if device.type == "cpu":  # as the engine does
        try:
            from dida.engine.speed import reuse_freed_memory
        except ImportError:  # an older tree
            pass
        else:
            reuse_freed_memory()
    if case.profile and case.compile != "false" and device.type == "cpu":
        import torch._inductor.config

        torch._inductor.config.cpp.enable_kernel_profile = True  # kernels named in the profile
    cfg, step = _build(case, device)
    batch = _batch(cfg, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for i in range(case.warmup):
        step(batch, i)
    sync()
    warmup_s = time.perf_counter() - t0
    graphs = _recompiles()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    first = case.warmup
    for i in range(first, first + case.repeats):
        t0 = time.perf_counter()
        out = step(batch, i)
        sync()
        times.append(time.perf_counter() - t0)
    losses = getattr(out, "losses", {}) if case.repeats else {}
    bad = [k for k, v in losses.items() if torch.is_tensor(v) and not torch.isfinite(v).all()]
    if bad:  # a step with a NaN loss would time other code paths than training does
        raise SystemExit(f"{case.method}: the timed step's {', '.join(bad)} not finite")
    s_per_it = statistics.median(times)
    peak = peak_mb(device)
    result = {"s_per_it": s_per_it, "peak_mb": peak,
              "compile_s": max(warmup_s - case.warmup * s_per_it, 0.0) if case.compile != "false"
              else None, "recompiles": _recompiles() - graphs}  # fmt: skip
    if case.profile:
        result |= _profile(step, batch, first + case.repeats, device)
        if "kernel_s" in result:
            result["busy"] = result["kernel_s"] / s_per_it
    return result


CASE_KEYS = ("precision", "compile", "method", "feat_dist", "resolution")
# --table: the cases of the speed table in README ("Memory and speed"), for MiT-B5 on a GPU:
# (method, instance-loss resolution, feature distance, precision, compile)
TABLE = [
    ("daformer", "feature", "off", "bf16", "false"),
    ("daformer", "feature", "off", "fp32", "false"),
    ("daformer", "feature", "on", "bf16", "false"),
    ("dida", "feature", "off", "bf16", "false"),
    ("dida", "feature", "on", "bf16", "false"),
    ("dida", "input", "off", "bf16", "false"),
    ("dida", "input", "on", "bf16", "false"),  # the DIDA reference preset
    ("dida", "input", "on", "fp32", "false"),
    ("daformer", "feature", "on", "bf16", "blocks"),
    ("dida", "input", "on", "bf16", "blocks"),
]


def _cases(args: argparse.Namespace) -> list[dict]:
    if args.table:
        rows = [dict(zip(("method", "resolution", "feat_dist", "precision", "compile"), row,
                         strict=True)) for row in TABLE]  # fmt: skip
        return [r for r in rows if args.table_compile in ("all", r["compile"])]
    cases = []
    for precision, compile_, method, fd in itertools.product(
        args.precision, args.compile, args.method, args.feat_dist
    ):
        for resolution in args.resolution if method == "dida" else ["feature"]:
            cases.append({"precision": precision, "compile": compile_, "method": method,
                          "feat_dist": fd, "resolution": resolution})  # fmt: skip
    return cases


def _fmt(value: object, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )  # fmt: skip
    parser.add_argument("--method", nargs="+", default=["daformer", "dida"],
                        choices=["source_only", "daformer", "dida"])  # fmt: skip
    parser.add_argument("--variant", default="mit_b0")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32"],
                        choices=["auto", "fp32", "bf16", "fp16"])  # fmt: skip
    parser.add_argument(
        "--resolution", nargs="+", default=["input"], choices=["feature", "input"],
        help="DIDA instance-loss resolution (input: the reference preset)",
    )  # fmt: skip
    parser.add_argument("--feat-dist", nargs="+", default=["off"], choices=["on", "off"],
                        help="the ImageNet feature distance (a frozen second encoder)")  # fmt: skip
    parser.add_argument("--compile", nargs="+", default=["false"],
                        choices=["false", "blocks", "full"], help="train.compile")  # fmt: skip
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune",
                                 "max-autotune-no-cudagraphs"],
                        help="train.compile_mode (reduce-overhead: CUDA graphs)")  # fmt: skip
    parser.add_argument("--table", action="store_true",
                        help="the README's speed table (10 cases) instead of the lists above")
    parser.add_argument("--table-compile", default="all", choices=["all", "false", "blocks"],
                        help="with --table: only its rows with this train.compile (default all; "
                        "the eager rows take seconds each, the compiled ones minutes)")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="also count dispatches, launches and syncs of one step")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warm-cache", action="store_true",
                        help="compile with torch's shared on-disk cache (default: an empty cache "
                        "per case, so that `compile s` is a cold compile)")  # fmt: skip
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # one measurement, in this (fresh) process
        case = argparse.Namespace(**{**vars(args), **json.loads(args.case)})
        print(json.dumps(run_case(case)))
        return
    # a time limit's SIGTERM (gpu_check.sh) unwinds as an exit: the running case is killed and
    # its compile cache removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    rows = []
    for case in _cases(args):
        with tempfile.TemporaryDirectory(prefix="dida-compile-cache-") as cache:
            env = None if args.warm_cache else os.environ | {  # None: this process's
                "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton"),
            }  # fmt: skip
            out = subprocess.run(
                [sys.executable, __file__, "--case", json.dumps(case), *sys.argv[1:]],
                capture_output=True, text=True, env=env,
            )
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            raise SystemExit(f"case {case} failed")
        rows.append((case, json.loads(out.stdout.strip().splitlines()[-1])))
        print(f"done: {case} -> {rows[-1][1]}", file=sys.stderr, flush=True)
    cuda = args.device.startswith("cuda")
    mem = "peak CUDA MB" if cuda else "peak RSS MB"
    print(f"\n{args.variant}, crop {args.crop}, batch {args.batch}, {args.device}"
          f"{f', {args.threads} threads' if args.threads else ''}"
          f"{f', compile mode {args.compile_mode}' if args.compile_mode != 'default' else ''}")
    head = ["method", "L_in resolution", "FD", "precision", "compile", "s/it", mem, "compile s"]
    if args.profile:
        head += ["dispatches (optimizer)", "memsets"]
        head += (["launches", "GPU busy"] if cuda else []) + ["syncs"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for case, r in rows:
        res = case["resolution"] if case["method"] == "dida" else "–"
        cells = [case["method"], res, case["feat_dist"], case["precision"], case["compile"],
                 f"{r['s_per_it']:.3f}", f"{r['peak_mb']:.0f}", _fmt(r.get("compile_s"), ".0f")]
        if args.profile:
            opt = r.get("optimizer_dispatches", "?")
            cells += [f"{r['dispatches']} ({opt})", str(r["memsets"])]
            if cuda:
                cells += [str(r.get("launches")), _fmt(r.get("busy"), ".0%")]
            cells.append(str(r["syncs"]))
        print("| " + " | ".join(cells) + " |")  # fmt: skip
    recompiled = [(c, r["recompiles"]) for c, r in rows if r.get("recompiles")]
    for case, n in recompiled:
        print(f"warning: {n} graph(s) compiled during the timed steps of {case}")


if __name__ == "__main__":
    main()
