"""One process or many (torchrun): rank helpers, samplers and exact distributed counting.

Training uses ``DistributedSampler`` also in a single process (num_replicas=1), so one
process and N processes draw the same permutation each epoch: N processes with a per-rank
batch of B/N see exactly the samples one process sees with batch B.
Evaluation shards indices rank::world without padding, so every sample counts once.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import List, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_kind: str) -> bool:
    """Join the process group torchrun describes in the environment; True when this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


@contextmanager
def process_group(device_kind: str):
    """The torchrun process group for one run, destroyed at its end if the run created it
    (a gloo group left alive at interpreter exit can abort the process)."""
    created = init_from_env(device_kind)
    try:
        yield
    finally:
        if created:
            cleanup()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def train_sampler(dataset, seed: int) -> DistributedSampler:
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed,
                              drop_last=False)


class ShardSampler(Sampler):
    """Indices rank, rank + world, ...: disjoint shards that together cover every index once."""

    def __init__(self, length: int):
        self.indices: List[int] = list(range(rank(), length, world_size()))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def all_sum(values: Sequence[float], device) -> List[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
