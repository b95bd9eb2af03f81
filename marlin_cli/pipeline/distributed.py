"""Several processes (one per GPU, started by ``torchrun``) quantizing one model together.

The calibration batches are dealt out round robin (batch j to rank j mod W), so each process runs the
forward passes of 1/W of the tokens; each linear group's Hessian is summed over the ranks with one
all-reduce; each linear is solved by one rank (linears dealt out round robin within the layer) and its codes
and scales are broadcast to the others, which rebuild the same quantized weights from them. Only rank 0
writes the checkpoint. With W = 1 (or no ``torch.distributed`` process group) every call here is a no-op.

Exactness: the Hessian of W ranks is a sum in another order than one process's running sum, so codes can
differ from a one-process run by float rounding (a code flips where a weight sits within ~1e-6 of a rounding
boundary). With two batches and two ranks the sums are the same two float32 terms (addition commutes), and
the codes are bit for bit the same (tests/test_distributed.py).

    torchrun --nproc-per-node 8 $(which marlin) quantize MODEL --out OUT --device cuda
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the quantizing processes."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the checkpoint."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether this rank handles item ``index`` of a round-robin deal."""
        return index % self.size == self.rank

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        """Rank ``src``'s ``tensor`` into everyone's ``tensor`` (same shape and dtype), in place."""
        if self.size > 1:
            dist.broadcast(tensor, src=src)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.size > 1:
            dist.barrier()

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        """A picklable object from rank ``src``."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def current_world() -> World:
    """The world of an initialised default process group, else a world of one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env(device: str) -> tuple[World, str]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group (NCCL on CUDA, gloo on the CPU) and pick
    this rank's GPU (``cuda:LOCAL_RANK``). Returns (world, device). Without torchrun: (World(), device)."""
    if dist.is_available() and dist.is_initialized():
        world = current_world()
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        world = current_world()
    else:
        return World(), device
    if device.startswith("cuda") and world.size > 1:
        local = int(os.environ.get("LOCAL_RANK", world.rank))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return world, device
