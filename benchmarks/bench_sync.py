"""Time and peak extra memory of one sync against a bare ``all_reduce`` of the same bytes, and against a gather.

**Per-step syncs** (the first table): four ``EMAMetric`` pooled by one sync, the common case of a logging step. In the
same gloo processes, interleaved call by call so that the noise of the machine falls on all three alike:

- ``sync``: ``_sync.pool`` as shipped: one ``all_reduce`` of ``INLINE`` float64 values (checks and states);
- ``bare``: ``torch.distributed.all_reduce`` of ``INLINE`` float64 values, nothing else (the floor);
- ``gather``: the gather protocol (what every sync used before: one ``all_gather`` of ``INLINE`` values per
  rank, checked and summed on the host), which per-rank values still take;
- ``minimal``: the least Python any such sync does, written out by hand for these four metrics: their tick counts
  through one host buffer, ``torch.cat`` of them with the scales, the states and zeros up to ``INLINE`` values, the
  ``all_reduce``, one read-back and views of the pooled states; no checks, no layout, no objects. ``minimal/bare`` is
  the floor that Python on this machine puts on top of the collective, whatever the sync checks.

Each round starts fresh processes; the table gives the median over rounds of each rank's median time (the slowest
rank) and of the ratios.

**Large states** (the second table): ``EMAWrapper(MulticlassConfusionMatrix(num_classes=c))`` holds ``S = c * c``
float64 values. Each case runs in fresh gloo processes (CPU), fed the same data on every rank, and measures on every
rank:

- ``gather``: the states travel inside the collective (``INLINE`` set large enough) of the gather protocol: one
  ``all_gather`` of ``world_size * S`` values;
- ``reduce``: the checks' ``all_reduce`` carries no state, the states are summed by a second ``all_reduce``;
- ``bare``: ``torch.distributed.all_reduce`` of ``S`` float64 values, nothing else (the floor);
- ``default``: whichever path ``INLINE`` picks (the shipped threshold).

Time is the median over repeats of the slowest rank (a barrier before each). Peak extra memory is the rise of the
process's peak resident memory (``ru_maxrss``) during the first sync over its resident memory just before it, so it
includes gloo's own buffers; it is only meaningful from about 1 MB on (page and allocator granularity).

**The whole step** (the third table): one training step of a large state, as a run with ``EMAWrapper`` makes it:
a tick of ``EMAWrapper(MulticlassConfusionMatrix(num_classes=1000, validate_args=False))`` (``S = 1e6`` float64
values, 8 MB) and a synced ``compute``. In the same gloo processes, interleaved call by call (a barrier before each),
on the same pre-generated batches of 64 labels:

- ``ema``: ``update(preds, target)`` then ``compute()``, synced as it is by default under a process group (checked:
  the value is the sum over the ranks of their local states);
- ``bare``: the cheapest step any design that pools every step can make: ``state.mul_(0.9)``, ``add_`` of the
  batch's ``torch.bincount`` into the float64 state, and ``torch.distributed.all_reduce`` of a fresh copy of it;
- ``plain``: ``MulticlassConfusionMatrix(1000)`` itself, ``update`` then its synced ``compute`` (for reference).

Each round starts fresh processes; the table gives, per number of processes, the median over rounds of the slowest
rank's median time, and ``ema/bare`` with its range over the rounds.

Run:
    python benchmarks/bench_sync.py            # all three tables at 2 and 4 processes (about 6 minutes on 2 cores)
    python benchmarks/bench_sync.py --quick    # 2 processes, fewer sizes, rounds and repeats
    python benchmarks/bench_sync.py --small    # only the per-step table
    python benchmarks/bench_sync.py --step     # only the whole-step table (about 1.5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import array
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.classification import MulticlassConfusionMatrix

from ema_metrics import EMAMetric, EMAWrapper, _sync
from ema_metrics._sync import collectives

PATHS = ("gather", "reduce", "bare", "default")
SMALL_PATHS = ("sync", "bare", "gather", "minimal")
STEP_PATHS = ("ema", "bare", "plain")
STEP_CLASSES = 1000
STEP_BATCH = 64


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank: int, world: int, port: int, classes: int, path: str, repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    metric = EMAWrapper(MulticlassConfusionMatrix(num_classes=classes, validate_args=False), alpha=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        metric.update(torch.randint(0, classes, (64,), generator=g), torch.randint(0, classes, (64,), generator=g))
    size = classes * classes
    if path == "gather":
        collectives.INLINE = size + 64
    elif path == "reduce":
        collectives.INLINE = 64
    flat = torch.zeros(size, dtype=torch.float64)

    def once() -> None:
        if path == "bare":
            dist.all_reduce(flat)
        else:  # the sync itself: pooled states (the value is then one compute on them)
            _sync.pool([metric], with_ranks=path == "gather")

    dist.barrier()
    before = _rss_bytes()
    once()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak": max(peak, 0), "time": statistics.median(times)}))
    dist.barrier()
    dist.destroy_process_group()


def _small_worker(rank: int, world: int, port: int, repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    metrics = [EMAMetric(alpha=0.1) for _ in range(4)]
    for i, m in enumerate(metrics):
        m.update(float(rank + i), weight=1.0 + rank)
    flat = torch.zeros(collectives.INLINE, dtype=torch.float64)
    # what `minimal` reads: the states are not replaced while the metrics are not updated
    layout = [m.sync_state() for m in metrics]
    scales = [s.scale for s in layout]
    states = [t.reshape(-1) for s in layout for t in s.states.values()]
    numels = [t.numel() for t in states]
    tail = torch.zeros(collectives.INLINE - len(metrics) * 2 - sum(numels), dtype=torch.float64)

    def minimal() -> list[torch.Tensor]:
        host = torch.frombuffer(array.array("d", [m.ticks for m in metrics]), dtype=torch.float64)
        vector = torch.cat([host, torch.stack(scales), *states, tail])
        dist.all_reduce(vector)
        vector[: len(metrics) * 2 + sum(numels)].tolist()
        return list(vector[len(metrics) * 2 :].split_with_sizes([*numels, tail.numel()]))

    calls = {
        "sync": lambda: _sync.pool(metrics),
        "bare": lambda: dist.all_reduce(flat),
        "gather": lambda: _sync.pool(metrics, with_ranks=True),
        "minimal": minimal,
    }
    times: dict[str, list[float]] = {p: [] for p in SMALL_PATHS}
    for i in range(repeats + 10):  # the first 10 warm up
        for path in SMALL_PATHS:
            dist.barrier()
            start = time.perf_counter()
            calls[path]()
            if i >= 10:
                times[path].append(time.perf_counter() - start)
    Path(out, f"rank{rank}.json").write_text(json.dumps({p: statistics.median(t) for p, t in times.items()}))
    dist.barrier()
    dist.destroy_process_group()


def _step_worker(rank: int, world: int, port: int, repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    c = STEP_CLASSES
    g = torch.Generator().manual_seed(rank)
    batches = [
        (torch.randint(0, c, (STEP_BATCH,), generator=g), torch.randint(0, c, (STEP_BATCH,), generator=g))
        for _ in range(8)
    ]
    ema = EMAWrapper(MulticlassConfusionMatrix(num_classes=c, validate_args=False), alpha=0.1)
    plain = MulticlassConfusionMatrix(num_classes=c, validate_args=False)
    state = torch.zeros(c * c, dtype=torch.float64)

    def ema_step(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ema.update(preds, target)
        return ema.compute()

    def bare_step(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        state.mul_(0.9)
        state.add_(torch.bincount(target * c + preds, minlength=c * c))
        pooled = state.clone()
        dist.all_reduce(pooled)
        return pooled

    def plain_step(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        plain.update(preds, target)
        return plain.compute()

    calls = {"ema": ema_step, "bare": bare_step, "plain": plain_step}
    # every value pools: it is the sum over the ranks of the local states (and differs from this rank's own)
    local = {"ema": lambda: ema.decayed_confmat, "bare": lambda: state, "plain": lambda: plain.confmat}
    for path, call in calls.items():
        value = call(*batches[0]).reshape(-1).to(torch.float64)
        mine = local[path]().reshape(-1).to(torch.float64)
        summed = mine.clone()
        dist.all_reduce(summed)
        assert torch.allclose(value, summed, rtol=1e-12, atol=0), f"{path}: the value is not the pooled state"
        assert world == 1 or not torch.equal(value, mine), f"{path}: the value is this rank's own state"
    times: dict[str, list[float]] = {p: [] for p in STEP_PATHS}
    for i in range(repeats + 3):  # the first 3 warm up
        preds, target = batches[i % len(batches)]
        for path in STEP_PATHS:
            dist.barrier()
            start = time.perf_counter()
            calls[path](preds, target)
            if i >= 3:
                times[path].append(time.perf_counter() - start)
    Path(out, f"rank{rank}.json").write_text(json.dumps({p: statistics.median(t) for p, t in times.items()}))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_interleaved(worker: Any, paths: tuple[str, ...], world: int, repeats: int) -> dict[str, float]:
    """Each path's median time on the slowest rank, from one run of ``worker`` on ``world`` fresh gloo processes."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(world, _free_port(), repeats, out), nprocs=world, join=True)
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    return {p: max(r[p] for r in ranks) for p in paths}


def rounds_of(
    worker: Any, paths: tuple[str, ...], world: int, rounds: int, repeats: int
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """``rounds`` runs of :func:`run_interleaved`, and each path's median over them."""
    res = [run_interleaved(worker, paths, world, repeats) for _ in range(rounds)]
    return res, {p: statistics.median(r[p] for r in res) for p in paths}


def print_header(title: str, header: str) -> None:
    print(title)
    print(header)
    print("-" * len(header))


def small_table(worlds: tuple[int, ...], rounds: int, repeats: int) -> None:
    header = (
        f"{'procs':>5} | {'sync us':>8} {'bare us':>8} {'gather us':>9} {'minimal us':>10} | {'sync/bare':>9}"
        f" {'range':>11} | {'minimal/bare':>12} {'range':>11} | {'sync/gather':>11} {'range':>11}"
    )
    title = f"Per-step sync of 4 EMAMetric ({rounds} rounds of {repeats} interleaved calls; medians over rounds)"
    print_header(title, header)
    for world in worlds:
        res, med = rounds_of(_small_worker, SMALL_PATHS, world, rounds, repeats)
        to_bare = [r["sync"] / r["bare"] for r in res]
        floor = [r["minimal"] / r["bare"] for r in res]
        to_gather = [r["sync"] / r["gather"] for r in res]
        print(
            f"{world:5d} | {1e6 * med['sync']:8.1f} {1e6 * med['bare']:8.1f} {1e6 * med['gather']:9.1f}"
            f" {1e6 * med['minimal']:10.1f} | {_ratios(to_bare, 9)} | {_ratios(floor, 12)} | {_ratios(to_gather, 11)}",
            flush=True,
        )
    kib = collectives.INLINE * 8 // 1024
    print(
        "`minimal` packs, reduces, reads and splits the same bytes by hand, without any check: the floor of this"
        " machine's\nPython on top of `bare`.\n"
        f"Target: sync/bare <= 1.2. Bytes per rank per sync: the all_reduce of {kib} KiB at any"
        f" number of ranks;\nthe gather receives world_size * {kib} KiB (8 MiB at 1,024 ranks,"
        " 128 MiB at 16,384).\n"
    )


def _ratios(values: list[float], width: int) -> str:
    """The median of ``values`` (in ``width`` characters) and their range."""
    return f"{statistics.median(values):{width}.2f} {min(values):5.2f}-{max(values):<5.2f}"


def step_table(worlds: tuple[int, ...], rounds: int, repeats: int) -> None:
    header = (
        f"{'procs':>5} | {'ema ms':>7} {'bare ms':>7} {'plain ms':>8} | {'ema/bare':>8} {'range':>11}"
        f" | {'plain/bare':>10}"
    )
    size = STEP_CLASSES * STEP_CLASSES
    title = (
        f"Whole step: EMAWrapper(MulticlassConfusionMatrix({STEP_CLASSES})) update + synced compute, S = {size}"
        f" float64 ({size * 8 / 2**20:.1f} MiB),\nbatches of {STEP_BATCH} labels ({rounds} rounds of {repeats}"
        " interleaved calls; medians over rounds of the slowest rank)"
    )
    print_header(title, header)
    for world in worlds:
        res, med = rounds_of(_step_worker, STEP_PATHS, world, rounds, repeats)
        to_bare = [r["ema"] / r["bare"] for r in res]
        plain_bare = [r["plain"] / r["bare"] for r in res]
        print(
            f"{world:5d} | {1e3 * med['ema']:7.2f} {1e3 * med['bare']:7.2f} {1e3 * med['plain']:8.2f}"
            f" | {_ratios(to_bare, 8)} | {statistics.median(plain_bare):10.2f}",
            flush=True,
        )
    print(
        "Target: ema/bare <= 2. `bare` decays the state (mul_), adds the batch's bincount and all-reduces a fresh copy"
        " of it:\nthe floor of any design that pools the state every step.\n"
    )


def run_case(world: int, classes: int, path: str, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), classes, path, repeats, out), nprocs=world, join=True)
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    return {"time": max(r["time"] for r in ranks), "peak": max(r["peak"] for r in ranks)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--large", action="store_true", help="only S from 1e4 on")
    parser.add_argument("--small", action="store_true", help="only the per-step table")
    parser.add_argument("--step", action="store_true", help="only the whole-step table")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of the per-step and whole-step tables (default 5, 3; quick 2)"
    )
    args = parser.parse_args(argv)
    worlds = (2,) if args.quick else (2, 4)
    classes = (2, 8, 32, 100, 316, 1000) if not args.quick else (2, 32, 316)
    if args.large:
        classes = tuple(c for c in classes if c >= 100)
    repeats = 5 if args.quick else 15
    print(
        f"torch {torch.__version__}, gloo on CPU ({os.cpu_count()} CPUs), threshold INLINE = {collectives.INLINE}"
        f" float64 values per rank in the first collective\n"
    )
    step_args = (worlds, args.rounds or (2 if args.quick else 3), 10 if args.quick else 20)
    if args.step:
        step_table(*step_args)
        return 0
    if not args.large:
        small_table(worlds, args.rounds or (2 if args.quick else 5), 100 if args.quick else 300)
    if args.small:
        return 0
    header = (
        f"{'procs':>5} {'S':>9} {'MB':>7} | {'gather ms':>9} {'reduce ms':>9} {'bare ms':>8} {'default ms':>10}"
        f" | {'reduce/bare':>11} | {'peak MB: gather':>15} {'reduce':>7} {'bare':>6} | {'reduce peak / S':>15}"
    )
    print(header)
    print("-" * len(header))
    for world in worlds:
        for c in classes:
            size = c * c
            res = {p: run_case(world, c, p, repeats) for p in PATHS}
            mb = size * 8 / 2**20
            print(
                f"{world:5d} {size:9d} {mb:7.2f} | {1e3 * res['gather']['time']:9.3f}"
                f" {1e3 * res['reduce']['time']:9.3f} {1e3 * res['bare']['time']:8.3f}"
                f" {1e3 * res['default']['time']:10.3f}"
                f" | {res['reduce']['time'] / res['bare']['time']:11.2f}"
                f" | {res['gather']['peak'] / 2**20:15.2f} {res['reduce']['peak'] / 2**20:7.2f}"
                f" {res['bare']['peak'] / 2**20:6.2f} | {res['reduce']['peak'] / (size * 8):15.2f}",
                flush=True,
            )
    print(
        "\nTargets: at 4 processes and large S, `reduce` within 1.5x of `bare`, and its peak extra memory within 2x"
        " of S.\nCost per sync: `gather` moves and holds world_size * S values on every rank (64 ranks x 8 MB = 512"
        " MB,\n1024 ranks = 8 GB); `reduce` holds about 2 * S (a ring all_reduce moves about 2 * S per rank) plus the"
        f" checks'\nall_reduce of {collectives.INLINE} * 8 bytes ({collectives.INLINE * 8 // 1024} KiB), whatever"
        " the number of ranks.\n"
    )
    if not args.large:
        step_table(*step_args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
