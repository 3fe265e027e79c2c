"""Run a function on several CPU processes joined by a gloo process group, and collect what each returns."""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

#: The one-buffer all-gather of every EMA sync (`all_gather_single` in the torch releases that renamed
#: `all_gather_into_tensor`).
FLAT_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


def require_gloo() -> None:
    """Skip, with the reason, where multi-process tests cannot run (never fall back to one process)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...], queue: Any) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, "ok", result))
    except BaseException:  # report every failure to the parent, with its traceback
        queue.put((rank, "error", traceback.format_exc()))


def run_ddp(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, start_method: str = "fork"
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes; return the results by rank.

    The processes are forked by default: they start in milliseconds with everything the test process imported,
    where a spawned one spends seconds importing torch and torchmetrics again (most of a multi-process test's time
    on a 2-core machine). ``start_method="spawn"`` starts fresh interpreters; ``fn`` must then be a module-level
    function (it is pickled). The result must be picklable (tensors are fine).
    """
    require_gloo()
    ctx = mp.get_context(start_method)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("a DDP worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
