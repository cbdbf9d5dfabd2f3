"""Data parallelism across processes: the process group torchrun describes, each rank's share of a batch, means over
the ranks, and the torchrun command line that ``qtool train --nproc N`` runs.

torchrun (``python -m torch.distributed.run``) starts N copies of a command with ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. :func:`join` turns them into a process group
— gloo on the CPU, NCCL on CUDA with one GPU per process (``cuda:LOCAL_RANK``) — and :class:`Ranks` is what the recipe
needs of it. Without that environment (or with ``WORLD_SIZE=1``) the run is one process, :data:`SINGLE`, and no group
is made: the single-process path is unchanged.

The batch: ``--batch-size B`` stays the global micro-batch. Every rank draws the same row order from the same seed
and takes a contiguous slice of B/N rows of each global batch (rank r: rows r·B/N .. (r+1)·B/N - 1): disjoint, together
exactly the single-process batch. Every row has ``seq_len`` tokens, so the mean of the ranks' mean losses is the
single-process mean loss, and FSDP's gradient reduction (the mean over ranks) gives its gradient.

Importing this module imports no torch (the CLI launches processes before anything heavy is loaded).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

# torchrun's variables (torch/distributed/run.py); WORLD_SIZE > 1 means "this process is one of several"
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of one data-parallel run (``world_size`` 1: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # "gloo" (CPU) or "nccl" (CUDA); "" for a single process

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes the adapter."""
        return self.rank == 0

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch whose rows divide evenly among the ranks."""
        n, rest = divmod(len(batch), self.world_size)
        assert rest == 0, (len(batch), self.world_size)  # settings.problems refuses such a --batch-size
        return batch[self.rank * n:(self.rank + 1) * n]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of a scalar each rank computed (a sum then a division: the same on every backend).
        A collective: every rank must call it, in the same order."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        total = value.detach().float().reshape(1).clone()
        dist.all_reduce(total)
        return (total / self.world_size).reshape(())

    def batch_mean(self, fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        """``fn`` (a mean over rows, e.g. the loss) of a whole batch, computed as the mean over the ranks of ``fn``
        of each rank's rows; a batch that does not divide evenly (the last held-out batch) is run whole on every
        rank. Every rank must call it with the same batch (FSDP all-gathers inside ``fn``)."""
        if self.world_size == 1 or len(batch) % self.world_size:
            return fn(batch)
        return self.mean(fn(self.rows(batch)))

    def gather(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (small picklable objects: reports)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


SINGLE = Ranks()


def torchrun_world_size(environ=None) -> int:
    """``WORLD_SIZE`` from torchrun's environment; 1 when not under torchrun."""
    environ = os.environ if environ is None else environ
    return int(environ.get("WORLD_SIZE", "1"))


def is_main_process(environ=None) -> bool:
    """Rank 0 by torchrun's ``RANK`` (True when not under torchrun): the process that checks and writes ``--out``
    (the others would race it, e.g. all restoring a folder a killed run left)."""
    environ = os.environ if environ is None else environ
    return int(environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def join(device: torch.device):
    """``(ranks, device)`` for this process: under torchrun with ``WORLD_SIZE > 1`` a process group is made from its
    environment (gloo for the CPU; NCCL for CUDA, this process on ``cuda:LOCAL_RANK``) and destroyed on exit (unless
    the caller had made one already); otherwise :data:`SINGLE` and ``device`` as given."""
    world = torchrun_world_size()
    if world == 1:
        yield SINGLE, device
        return
    import torch
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    made = not dist.is_initialized()
    if made:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), local, dist.get_backend()), device
    finally:
        if made:
            dist.destroy_process_group()


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """The command line that runs ``qtool ARGS`` in ``nproc`` processes on this machine. ``--standalone``: torchrun
    makes its own rendezvous on a free local port (several runs on one machine do not collide)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "qtool", *args]


def launch(nproc: int, args: list[str]) -> int:
    """Run ``qtool ARGS`` under torchrun in ``nproc`` processes; returns torchrun's exit status. Each process gets
    an equal share of the CPU's threads unless ``OMP_NUM_THREADS`` is set (torchrun would otherwise set 1, with a
    warning)."""
    import subprocess

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(torchrun_command(nproc, args), env=env).returncode
