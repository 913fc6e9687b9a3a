"""The step's speed settings keep its arithmetic: no host reads, low-precision copies, compile."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.profiler import profile

from dida.adapt.daformer import DAFormer
from dida.adapt.dida import DIDA
from dida.config import ExperimentConfig
from dida.engine.optim import build_optimizer
from dida.engine.speed import (
    LossWindow,
    StepBackward,
    compiled_graphs,
    glibc,
    prepare_method,
    reuse_freed_memory,
    share_compiled_graphs,
    window_mean,
)
from dida.engine.train import cpu_has_fast_bf16
from dida.eval.inference import CPU_HOST_READ
from dida.models import MiT, segmentor_from_config
from dida.models.layers import is_dilated_depthwise

# Profiled bf16 steps on a CPU without native bf16: PyTorch's fallback runs the depthwise convs
# group by group, so a profile holds ~10^5 events, whose parsing took 20-30 s a test (AMD EPYC,
# AVX2). There such cases run with --runslow (as CI runs the tests); elsewhere always.
BF16_SLOW = [] if cpu_has_fast_bf16() else [pytest.mark.slow]

# operators that wait for the device on CUDA
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::equal"}


def _method(  # noqa: ANN202
    name: str,
    dtype: torch.dtype = torch.float32,
    compile_mode: str = "false",
    checkpoint_encoder: bool = False,
    mic: bool = False,
    engine_backward: bool = False,
):
    """A mit_tiny method with the reference preset (input-resolution L_in, FD on) and its step
    (with MIC's masked-image pass when `mic`; autograd's backward, or the engine's
    `StepBackward` when `engine_backward`)."""
    cfg = ExperimentConfig()
    cfg.method.mic.enabled, cfg.method.mic.block_size = mic, 8
    cfg.model.variant, cfg.model.embed_dim, cfg.model.dilations = "mit_tiny", 16, [1, 2]
    cfg.model.checkpoint_encoder = checkpoint_encoder
    cfg.method.bank.size = 12
    cfg.method.teacher.ignore_top, cfg.method.teacher.ignore_bottom = 2, 4
    torch.manual_seed(0)
    student = segmentor_from_config(cfg.model)
    kwargs = dict(num_classes=19, imnet_encoder=copy.deepcopy(student.encoder),
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    if name == "dida":
        method = DIDA(student, cfg.method, embed_dim=16, **kwargs)
        method.bank.init_random_(torch.Generator().manual_seed(0))
    else:
        method = DAFormer(student, cfg.method, **kwargs)
    method.train()
    prepare_method(method, compile_mode, dtype)
    optimizer = build_optimizer(student, cfg.optim)
    backward = StepBackward(student.parameters()) if engine_backward else torch.Tensor.backward
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 19, (2, 4, 4), generator=g).repeat_interleave(12, 1)
    batch = {"src_img": torch.randn(2, 3, 48, 48, generator=g),
             "src_label": label.repeat_interleave(12, 2),
             "tgt_img": torch.randn(2, 3, 48, 48, generator=g)}  # fmt: skip

    def step(i: int) -> dict:
        optimizer.zero_grad(set_to_none=True)
        method.update_teacher(i)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = method.forward_backward(batch, i, backward, False)
        optimizer.step()
        return out.losses

    return method, step


def _assert_same_steps(method, step, reference, ref_step, steps: int = 3) -> list[dict]:  # noqa: ANN001
    """Both methods' steps give the same losses and updated student weights, bit for bit, with
    the same global RNG (dropout, drop-path); returns each step's losses."""
    losses = []
    for i in range(steps):
        torch.manual_seed(i)
        got = step(i)
        torch.manual_seed(i)
        want = ref_step(i)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        for (n, a), b in zip(method.student.named_parameters(), reference.student.parameters(),
                             strict=True):  # fmt: skip
            assert torch.equal(a, b), n
        losses.append(got)
    return losses


def _callers(evt) -> list[str]:  # noqa: ANN001
    names = []
    while evt is not None:
        names.append(evt.name)
        evt = evt.cpu_parent
    return names


@pytest.mark.parametrize("name", ["daformer", "dida"])
def test_a_step_reads_nothing_back_from_the_device(name: str) -> None:
    """No `.item()`, `bool(tensor)`, nonzero or unique in a steady-state step (they would each
    wait for the GPU); the metrics come back as device tensors."""
    _, step = _method(name)
    step(0)
    step(1)
    with profile() as prof:
        losses = step(3)  # not a bank update iteration (those run every update_interval)
    syncs = [
        " < ".join(_callers(e)) for e in prof.events() if e.name in SYNC_OPS
        # AdamW's step counters are host tensors on CUDA too; _assert_async is async there;
        # `cpu_any` reads CPU tensors only (refused on a GPU)
        and not any(c.startswith(("Optimizer.step", "aten::_assert_async", CPU_HOST_READ))
                    for c in _callers(e))  # fmt: skip
    ]
    assert syncs == []
    assert all(torch.is_tensor(v) or isinstance(v, float) for v in losses.values())
    assert "instance.loss_in" in losses or name == "daformer"


def test_loss_window_reads_every_step_once() -> None:
    window = LossWindow()
    window.add(3, {"a": torch.tensor(1.0), "b": 2.0})
    window.add(4, {"a": torch.tensor(3.0), "c": torch.tensor(float("nan"))})
    steps = window.read()
    assert [it for it, _ in steps] == [3, 4] and len(window) == 0
    assert steps[0][1] == {"a": 1.0, "b": 2.0} and math.isnan(steps[1][1]["c"])
    mean = window_mean(steps)
    assert mean["a"] == 2.0 and mean["b"] == 2.0
    assert window.read() == []


def test_low_precision_copies_give_the_same_outputs_and_follow_the_ema() -> None:
    """Under bf16 autocast the teacher's bf16 copy and the cast ImageNet encoder compute what
    autocast's own casts compute; the copy follows every EMA update and checkpoint load."""
    method, step = _method("daformer", torch.bfloat16)
    step(0)
    step(1)
    (lp,) = method.low_precision_copies()
    img = torch.randn(2, 3, 48, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = method.teacher(img)
        slow = method.teacher.model(img)  # fp32 weights, cast by autocast
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)
    assert lp.module.encoder.block1[0].attn.q.weight.dtype == torch.bfloat16
    assert method.imnet.block1[0].attn.q.weight.dtype == torch.bfloat16
    state = copy.deepcopy(method.teacher.state_dict())
    with torch.no_grad():
        for p in method.teacher.model.parameters():
            p.add_(1.0)
    method.teacher.load_state_dict(state)
    torch.testing.assert_close(lp.module.head.conv_seg.weight,
                               method.teacher.model.head.conv_seg.weight.bfloat16())  # fmt: skip


@pytest.mark.parametrize(
    ("name", "checkpointed"),
    [pytest.param(*case, marks=BF16_SLOW) for case in [("daformer", False), ("dida", False),
                                                        ("dida", True)]],
)  # fmt: skip
def test_the_student_cast_in_one_copy_changes_no_bit(name: str, checkpointed: bool) -> None:
    """Under bf16 autocast the student's weights cast by one multi-tensor copy per forward give
    autocast's own losses, gradients and updated weights, bit for bit (also with the encoder's
    activation checkpointing, whose recomputation runs outside the cast), with no per-weight
    cast left in the step."""
    method, step = _method(name, torch.bfloat16, checkpoint_encoder=checkpointed)
    reference, ref_step = _method(name, torch.bfloat16, checkpoint_encoder=checkpointed)
    assert method.student.encoder.grad_checkpointing == checkpointed
    assert method._student_cast is not None
    reference._student_cast = None  # autocast casts each weight itself
    _assert_same_steps(method, step, reference, ref_step)
    weights = sum(len(list(m.parameters(recurse=False))) for m in method.student.modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))  # fmt: skip
    counts = []
    for run in (step, ref_step):
        with profile() as prof:
            run(3)
        counts.append((
            sum(e.name == "aten::_to_copy"  # forward casts
                and not any(c.startswith("autograd::engine") for c in _callers(e))
                for e in prof.events()),
            sum(e.name == "aten::_foreach_copy_" for e in prof.events()),
        ))  # fmt: skip
    (casts, copies), (ref_casts, _) = counts
    # autocast casts each weight once per step (its cache), ours none but the dilated
    # depthwise convs', which keep fp32 weights on the CPU; both cast images and blur kernels
    kept = sum(is_dilated_depthwise(m) for m in method.student.modules())
    assert ref_casts - casts >= weights - kept > 40
    assert copies >= 4  # one copy forward and one backward per student forward


@pytest.mark.parametrize(
    ("name", "dtype", "mic", "checkpointed"),
    [("daformer", torch.float32, False, False),
     pytest.param("dida", torch.bfloat16, False, False, marks=BF16_SLOW),
     ("dida", torch.float32, True, False),
     pytest.param("dida", torch.bfloat16, False, True, marks=BF16_SLOW)],
)  # fmt: skip
def test_later_backward_passes_add_their_gradients_in_one_go(
    name: str, dtype: torch.dtype, mic: bool, checkpointed: bool
) -> None:
    """The engine's backward gives autograd's losses and updated weights bit for bit over
    steps of two (three with MIC) backward passes, also with the encoder's activation
    checkpointing, without a per-parameter gradient add."""
    method, step = _method(name, dtype, checkpoint_encoder=checkpointed, mic=mic,
                           engine_backward=True)
    reference, ref_step = _method(name, dtype, checkpoint_encoder=checkpointed, mic=mic)
    for got in _assert_same_steps(method, step, reference, ref_step):
        assert ("masked.loss_seg" in got) == mic
    params = len(list(method.student.parameters()))
    counts = []
    for run in (step, ref_step):
        with profile() as prof:
            run(3)
        events = prof.events()
        nodes = sum(e.name == "torch::autograd::AccumulateGrad" for e in events)
        adds = sum(e.name == "aten::add_" and "torch::autograd::AccumulateGrad" in _callers(e)
                   for e in events)  # fmt: skip
        counts.append((nodes, adds))
    (nodes, adds), (ref_nodes, ref_adds) = counts
    # autograd runs an accumulation node per parameter and pass, which adds to `.grad` from the
    # second pass on; the engine runs them in the first pass only (they store the gradients)
    assert 40 < nodes <= params and ref_nodes >= nodes + params * (2 if mic else 1)
    assert adds == 0 and ref_adds > 40  # torch 2.3's profiler ties only some adds to their node


def test_the_host_generator_of_a_gpu_generator_is_checkpointed() -> None:
    """With a GPU generator the augmentation decisions come from a separate CPU generator, whose
    state the training state carries (on the CPU both are one generator, saved by the engine)."""
    method, _ = _method("dida")
    assert method.host_generator is method.generator
    assert "host_rng" not in method.training_state().get("method", {})
    method.host_generator = torch.Generator().manual_seed(5)  # as built for a CUDA generator
    torch.rand(3, generator=method.host_generator)
    state = method.training_state()
    assert set(state["method"]) == {"host_rng", "bank"}
    expected = torch.rand(4, generator=method.host_generator)
    method.host_generator.manual_seed(0)
    method.load_training_state(state)
    assert torch.equal(torch.rand(4, generator=method.host_generator), expected)


def test_compiled_blocks_of_different_drop_rates_share_their_graphs() -> None:
    """A compiled MiT block's graph depends on its stage's shapes, not on its drop-path rate: in
    training (masks drawn by the encoder) and in eval mode (the teacher, the ImageNet encoder)
    alike. Before, an eval block read its rate and compiled a graph of its own: 52 for MiT-B5.
    Dynamo's `eager` backend makes the same graphs and guards as Inductor, without code."""
    if not share_compiled_graphs():
        pytest.skip(f"torch {torch.__version__} compiles a graph per module instance")
    torch._dynamo.reset()
    model = MiT(embed_dims=[8, 16, 32, 64], num_heads=[1, 1, 2, 2], depths=[1, 3, 1, 1],
                sr_ratios=[8, 4, 2, 1], drop_path_rate=0.5)  # fmt: skip
    blocks = [b for s in range(1, 5) for b in getattr(model, f"block{s}")]
    assert len({b.drop_path.drop_prob for b in blocks}) == 6  # every block its own rate
    for block in blocks:
        block.compile(backend="eager", dynamic=False)
    img = torch.randn(2, 3, 64, 64)
    start = compiled_graphs()
    with torch.no_grad():
        model.eval()(img)
    assert compiled_graphs() - start == 4  # one per stage
    model.train()(img).pop().sum().backward()
    assert compiled_graphs() - start == 8
    with torch.no_grad():
        model.eval()(img)
    model.train()(img)
    assert compiled_graphs() - start == 8
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_stop_recompiling() -> None:
    """`train.compile=blocks` (minutes on a CPU): the compiled student computes what the eager one
    computes, and after the first iterations no step compiles anything new."""
    method, step = _method("dida", compile_mode="blocks")
    assert method.compile_instance_loss  # L_in's chunks are compiled too
    eager = copy.deepcopy(method.student)  # deepcopy drops the compiled wrappers
    for m in eager.modules():
        m._compiled_call_impl = None
    for i in range(3):
        step(i)
    graphs = compiled_graphs()
    assert 0 < graphs <= 40
    step(3)
    step(4)
    assert compiled_graphs() == graphs
    eager.load_state_dict(method.student.state_dict())
    img = torch.randn(2, 3, 48, 48)
    method.student.eval()
    eager.eval()
    with torch.no_grad():
        for a, b in zip(method.student(img), eager(img), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# a step's pattern: a tensor of a few MB allocated, written and freed again and again; prints the
# minor page faults of the last iterations
_ALLOCATIONS = textwrap.dedent("""
    import ctypes, resource, sys, torch
    from dida.engine import speed
    if sys.argv[1] == "reuse":
        assert speed.reuse_freed_memory()
    else:  # every 24 MiB tensor mapped afresh, as glibc's defaults may map it (see the test)
        assert ctypes.CDLL(None).mallopt(speed._M_MMAP_THRESHOLD, 1 << 20)
    for i in range(8):
        if i == 4:
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(6 << 20)  # 24 MiB of fp32
        del x
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
""")


@pytest.mark.skipif(not glibc(), reason="glibc's malloc settings")
def test_freed_memory_serves_the_next_step_without_page_faults() -> None:
    """With glibc's defaults, a tensor allocated again after being freed may get fresh pages,
    which the kernel faults in (6,144 per iteration here with torch 2.13; 1,536-6,144 with torch
    2.3.1, by what the process freed before: too unsteady for a control, so the control maps
    every such tensor); after `reuse_freed_memory` it reuses the freed ones."""
    faults = {}
    for mode in ("mapped", "reuse"):
        done = subprocess.run([sys.executable, "-c", _ALLOCATIONS, mode], capture_output=True,
                              text=True, check=True)  # fmt: skip
        faults[mode] = int(done.stdout.split()[-1]) / 4  # per iteration
    pages = 24 << 8  # 4 KiB pages of one iteration's tensor
    assert faults["mapped"] > pages / 2, faults  # fresh pages every time: counted
    assert faults["reuse"] < pages / 50, faults
    assert reuse_freed_memory()  # and again: the settings can be applied twice
