"""torch.distributed and xfuser set-up of one rank of a denoiser's sequence-parallel group.

Runs inside a worker actor that Ray gave one device: on a GPU host each worker sees exactly its own
GPU (`CUDA_VISIBLE_DEVICES`), so the local device is always index 0; on CPU the group talks gloo.
Family-agnostic: the family's `Denoising` receives the resulting `ParallelContext`.
"""

from __future__ import annotations

import socket
from datetime import timedelta

from deployments.families.base import ParallelContext


def rendezvous_address(host: str) -> str:
    """A `tcp://` address on this node for rank 0's store (a port free right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    return f"tcp://{host}:{port}"


def set_default_timeout(timeout: timedelta) -> None:
    """xfuser and yunchang create their groups with no timeout, i.e. torch's default (30 min for
    gloo, 10 min for NCCL): make the default ours before any group exists. A timeout bounds a
    collective that waits on a peer; a group with no work pending never times out."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def init_rank(
    *,
    rank: int,
    world_size: int,
    init_method: str,
    ulysses_degree: int,
    ring_degree: int,
    device: str,
    cfg_degree: int = 1,
    timeout_s: float,
    model_path: str,
) -> ParallelContext:
    """Join the group (blocks until every rank has joined) and set xfuser up for it."""
    import torch
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    set_default_timeout(timeout)
    if device == "cuda":
        backend = "nccl"
        torch.cuda.set_device(0)
    else:
        from deployments import xfuser_compat

        backend = "gloo"
        xfuser_compat.install()
    dist.init_process_group(
        backend, init_method=init_method, world_size=world_size, rank=rank, timeout=timeout
    )
    from xfuser import xFuserArgs
    from xfuser.core.distributed import init_distributed_environment

    # local_rank=0: with a tcp:// address xfuser would take the global rank as the device index.
    init_distributed_environment(rank=rank, world_size=world_size, local_rank=0, backend=backend)
    engine_config, _ = xFuserArgs(
        model=model_path,
        ulysses_degree=ulysses_degree,
        ring_degree=ring_degree,
        use_cfg_parallel=cfg_degree == 2,
    ).create_config()
    return ParallelContext(
        ulysses_degree=ulysses_degree,
        engine_config=engine_config,
        ring_degree=ring_degree,
        cfg_degree=cfg_degree,
    )

