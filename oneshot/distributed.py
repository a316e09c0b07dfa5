"""torch.distributed: ``torchrun --nproc-per-node N -m oneshot prune ...`` (issue 6).

Every rank builds (or streams) the model and tokenizes the same calibration, then keeps its own
contiguous slice of the windows. Per decoder layer each rank forwards its windows; the statistics
(Hessians, input norms and sums, token counts) are summed across ranks; the linears of the layer
are solved on different ranks in parallel (round robin) and broadcast from their owner, so every
rank holds the same pruned layer; each rank propagates its windows through it. Output errors are
measured on the same first calibration tokens as one process would and summed. Rank 0 alone
writes the output and the report. NCCL on GPUs (each rank on ``cuda:LOCAL_RANK``), gloo on CPU.
"""

from __future__ import annotations

import os

import torch

from .errors import OneshotError


class Group:
    """The process group of a torchrun launch (rank, world size) and the collectives the engine uses."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(t)

    def broadcast(self, t: torch.Tensor, src: int) -> None:
        import torch.distributed as dist

        dist.broadcast(t, src)

    def broadcast_object(self, obj, src: int):
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def windows(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice [start, stop) of ``n`` calibration windows."""
        start = n * self.rank // self.world
        return start, n * (self.rank + 1) // self.world


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str) -> tuple[Group | None, str]:
    """Join the torchrun group when launched by torchrun; returns (group or None, device name)."""
    if not launched():
        return None, device_name
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Group(rank, world), device_name


def check(cfg, group: Group | None) -> None:
    """What a distributed run cannot do yet, refused up front."""
    if group is None:
        return
    if cfg.nsamples < group.world:
        raise OneshotError(f"--nsamples {cfg.nsamples}: fewer calibration windows than the {group.world} ranks")
    if cfg.update != "none" or cfg.allocation != "uniform":
        raise OneshotError("--update and --allocation owl are not supported with torchrun yet; run one process")
    if cfg.resume:
        raise OneshotError("--resume is not supported with torchrun yet (each rank holds its own activations)")
    if cfg.calib == "self":
        raise OneshotError("--calib self is not supported with torchrun; give a calibration text")
    if cfg.moe_calibrate == "routed":
        raise OneshotError("--moe-calibrate routed is not supported with torchrun yet (which experts fall back "
                           "to every token would differ by rank); use --moe-calibrate all")


def teardown(group: Group | None) -> None:
    if group is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
