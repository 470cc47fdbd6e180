"""Class sharding over processes with ``torch.distributed`` (started by ``torchrun``).

Each rank owns a contiguous block of classes: their synthetic images, optimiser state and real
batches. Every rank replays the same seeded random draws (network init, real indices, DSA
parameters) for *all* classes, so the networks agree without communication and the result is
the same for any world size. Communication is only logging scalars, gathering the synthetic set
for checkpoints, outputs and evaluation, and the evaluation accuracies.

Collectives on CPU tensors go through gloo (a gloo side group when the default group is NCCL).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..devices import env_world_size
from ..errors import UserError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    _cpu_group: object = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist
            dist.barrier(group=self._cpu_group)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a small tensor over ranks (through the CPU group; returns a CPU tensor)."""
        if not self.distributed:
            return t
        import torch.distributed as dist
        c = t.detach().to("cpu", torch.float64).clone()
        dist.all_reduce(c, group=self._cpu_group)
        return c

    def max_int(self, v: int) -> int:
        if not self.distributed:
            return int(v)
        import torch.distributed as dist
        c = torch.tensor([int(v)], dtype=torch.int64)
        dist.all_reduce(c, op=dist.ReduceOp.MAX, group=self._cpu_group)
        return int(c.item())

    def gather_rows(self, local: torch.Tensor, counts: List[int], *, to_all: bool) -> Optional[torch.Tensor]:
        """Concatenate each rank's rows (rank order) on rank 0 (``to_all``: on every rank).

        ``counts[r]``: rows of rank r. Blocks are padded to the largest one, as gloo's gather
        needs equal shapes. Non-receiving ranks get ``None``.
        """
        local = local.detach().to("cpu").contiguous()
        if not self.distributed:
            return local
        import torch.distributed as dist
        m = max(counts)
        pad = torch.zeros((m,) + tuple(local.shape[1:]), dtype=local.dtype)
        pad[:local.shape[0]] = local
        if to_all:
            parts = [torch.empty_like(pad) for _ in range(self.size)]
            dist.all_gather(parts, pad, group=self._cpu_group)
        else:
            parts = [torch.empty_like(pad) for _ in range(self.size)] if self.is_main else None
            dist.gather(pad, parts, dst=0, group=self._cpu_group)
            if not self.is_main:
                return None
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    def gather_objects(self, obj) -> List:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist
        out: List = [None] * self.size
        dist.all_gather_object(out, obj, group=self._cpu_group)
        return out

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                # every rank is done with every collective before any tears its group down
                # (a rank that leaves early can abort a peer still inside gloo)
                dist.barrier(group=self._cpu_group)
                dist.destroy_process_group()
            self.owns_group = False


def class_block(num_classes: int, rank: int, size: int) -> Tuple[int, int]:
    """Classes ``[lo, hi)`` of ``rank``: contiguous, sizes differing by at most one."""
    return num_classes * rank // size, num_classes * (rank + 1) // size


def init_world(device: str, timeout_s: float = 1800.0) -> World:
    """The world of this process: a single process unless started by ``torchrun``
    (``WORLD_SIZE`` > 1), in which case the process group is created here (gloo on CPU, NCCL
    on CUDA, with a gloo side group for CPU collectives)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():  # the caller set it up (tests, notebooks)
        backend = dist.get_backend()
        cpu = None if backend == "gloo" else dist.new_group(backend="gloo")
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                     backend, cpu, owns_group=False)
    size = env_world_size()
    if size <= 1:
        return World()
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
    # torch._dynamo imported *after* the group exists (torch.optim imports it on first use) keeps
    # a reference to the group that destroy_process_group() does not drop: gloo's worker threads
    # then outlive close() and are torn down during interpreter exit, which intermittently aborts
    # the process ("terminate called without an active exception") after a finished run.
    # Imported first, it takes no such reference (tests/distill/test_scale.py checks the threads end).
    from torch import _dynamo  # noqa: F401
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    cpu = None if backend == "gloo" else dist.new_group(backend="gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, backend, cpu, owns_group=True)
