"""Many processes: what `torchrun` started, seen from one of them.

    world = join_world(device)    rank, size and device of this process (rank 0 of 1 without torchrun);
                                  under torchrun it joins the process group: gloo on CPU, nccl on CUDA,
                                  each process on the GPU of its LOCAL_RANK
    on_rank0(world, fn)           fn() on rank 0, its result or its refusal passed to every rank
    gather(world, obj)            every rank's obj, in rank order, on rank 0 (None elsewhere)
    leave_world(world)            leave the process group at the end

`altdiff-min train` and `altdiff-min generate` use it; torchrun's multi-node arguments need nothing more.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import AltDiffError


@dataclass(frozen=True)
class World:
    """This process's place among the processes torchrun started (rank 0 of 1 without torchrun)."""
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device))


def join_world(device: str | torch.device) -> World:
    """Under torchrun (WORLD_SIZE > 1): join the process group, gloo on CPU and nccl on CUDA, each
    process on the GPU of its LOCAL_RANK. torchrun's multi-node arguments need nothing more here."""
    device, size = torch.device(device), int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def on_rank0(world: World, fn: Callable):
    """fn() on rank 0; its result, or the AltDiffError it raised, reaches every rank, so a refusal on
    rank 0 stops every process instead of leaving the others waiting."""
    result, error = None, None
    if world.rank == 0:
        try:
            result = fn()
        except AltDiffError as e:
            error = e
    if world.size > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def gather(world: World, obj) -> list | None:
    """Every rank's `obj` (picklable), as a list in rank order, on rank 0; None on the others."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size if world.rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def leave_world(world: World) -> None:
    """Tear the process group down (call it in a `finally`). On the way out of a run that went well,
    every process first waits for the others: without that, under load, the second of two gloo
    processes sometimes aborted at exit ("terminate called without an active exception") after a
    finished sweep (3 of 14 runs on a busy 2-core CPU; 0 of 16 with the wait). Not after an error:
    the others may never get here, and torchrun stops them once this process exits."""
    if world.size > 1 and dist.is_initialized():
        if sys.exc_info()[0] is None:  # in a finally: no exception on its way out
            dist.barrier()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait until every process gets here."""
    if world.size > 1:
        dist.barrier()
