"""torchrun environment detection and the few collective helpers the engine needs."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not is_active():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def is_active() -> bool:
    """Whether a process group is up (torchrun launch)."""
    return dist.is_available() and dist.is_initialized()


def get_rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_active() else (0, 1)


def barrier() -> None:
    if is_active():
        dist.barrier()


def broadcast_buffers_(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's buffers (BatchNorm running statistics) equal to rank `src`'s.

    DDP broadcasts buffers at the start of each forward, but the forward itself then updates them
    from each rank's own batch: call this before anything reads them (teacher EMA, evaluation,
    checkpoints) so that every rank holds the same model.
    """
    if not is_active():
        return
    for tensor in module.buffers():
        dist.broadcast(tensor.data, src)


def cleanup() -> None:
    """Tear the process group down: a barrier, then (gloo) a pause that lets gloo's worker
    threads free the last collectives' work before the group is destroyed.

    torch 2.3 can deadlock in a bare `destroy_process_group`: a worker thread frees a finished
    collective (a barrier frees the works it waited for) whose tensors Python has dropped, which
    needs the GIL, while the destructor holds the GIL and waits for the worker's lock. A test's
    rank hung so in 5 of 15 runs; the pause gives the worker the GIL for 0.2 s.
    """
    if is_active():
        dist.barrier()
        if dist.get_backend() == "gloo":
            time.sleep(0.2)  # sleeping releases the GIL
        dist.destroy_process_group()
