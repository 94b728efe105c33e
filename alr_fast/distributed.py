"""torch.distributed for torchrun: NCCL on GPUs, gloo on CPUs; no home-made process management.

``init_distributed`` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK). Without
them everything runs as a single process and every helper here is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> DistEnv:
    """Join the process group torchrun describes in the environment, or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(rank, world, local)


def shard_range(n: int, env: DistEnv) -> tuple[int, int]:
    """Contiguous shard [start, stop) of n items for this rank; concatenating shards in rank
    order restores the original order (which keeps ranking ties identical to one process)."""
    return n * env.rank // env.world_size, n * (env.rank + 1) // env.world_size


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG
        t /= env.world_size
    return t


def gather_rows(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Concatenate each rank's [n_r, ...] tensor in rank order (sizes may differ)."""
    if not env.enabled:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(env.world_size)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def gather_numpy(a: np.ndarray, env: DistEnv, device: torch.device) -> np.ndarray:
    return gather_rows(torch.as_tensor(a, device=device), env).cpu().numpy()


def gather_objects(obj, env: DistEnv) -> list:
    if not env.enabled:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
