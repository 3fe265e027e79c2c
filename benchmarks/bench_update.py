"""Per-call overhead of ``EMAMetric.update`` / ``forward`` against torchmetrics and a bare in-place ``lerp_``.

Run: ``python benchmarks/bench_update.py`` (``--quick`` for fewer repeats). Single thread, CPU, a 0-d float32 input;
each figure is the minimum over the repeats of the mean time per call, in microseconds. On a machine shared with
other work, ``--process-time`` measures this process's CPU time instead of wall time, which other processes disturb
far less.
"""

from __future__ import annotations

import argparse
import platform
import time
import timeit
import warnings
from typing import Any, Callable

import torch
import torchmetrics
from torchmetrics.aggregation import MeanMetric, RunningMean

import ema_metrics
from ema_metrics import EMAMetric

TIMER: Callable[[], float] = time.perf_counter


def time_call(fn: Callable[[], Any], number: int, repeat: int) -> float:
    """Microseconds per call: the minimum over ``repeat`` runs of ``number`` calls."""
    for _ in range(min(number, 1000)):  # warm up caches and lazily built constants
        fn()
    return min(timeit.repeat(fn, number=number, repeat=repeat, timer=TIMER)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats (a rough figure)")
    parser.add_argument("--process-time", action="store_true", help="time this process's CPU time, not wall time")
    args = parser.parse_args()
    global TIMER
    if args.process_time:
        TIMER = time.process_time
    number, repeat = (2_000, 3) if args.quick else (20_000, 7)
    slow_number = max(number // 10, 200)  # torchmetrics' forward is one to two orders of magnitude slower

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # RunningMean/MeanMetric warnings are not what is measured
    x = torch.tensor(1.5, dtype=torch.float32)
    vec = torch.randn(256, dtype=torch.float32)

    ema_upd, ema_fwd = EMAMetric(alpha=0.1), EMAMetric(alpha=0.1)
    mean_upd, mean_fwd = MeanMetric(), MeanMetric()
    running = RunningMean(window=100)
    state = torch.zeros(4, dtype=torch.float64)
    target = torch.tensor([1.5, 1.0, 1.0, 0.0], dtype=torch.float64)

    rows: dict[str, float] = {
        "EMAMetric.update": time_call(lambda: ema_upd.update(x), number, repeat),
        "EMAMetric.__call__ (forward)": time_call(lambda: ema_fwd(x), number, repeat),
        "MeanMetric.update": time_call(lambda: mean_upd.update(x), number, repeat),
        "MeanMetric.__call__ (forward)": time_call(lambda: mean_fwd(x), slow_number, repeat),
        "RunningMean(window=100).__call__": time_call(lambda: running(x), slow_number, repeat),
        "bare lerp_ on a float64[4] state": time_call(lambda: state.lerp_(target, 0.1), number, repeat),
    }
    vec_rows: dict[str, float] = {
        "EMAMetric.update": time_call(lambda: ema_upd.update(vec), number, repeat),
        "EMAMetric.__call__ (forward)": time_call(lambda: ema_fwd(vec), number, repeat),
        "MeanMetric.update": time_call(lambda: mean_upd.update(vec), number, repeat),
        "MeanMetric.__call__ (forward)": time_call(lambda: mean_fwd(vec), slow_number, repeat),
    }

    print(
        f"torch {torch.__version__}, torchmetrics {torchmetrics.__version__}, ema_metrics {ema_metrics.__version__},"
        f" python {platform.python_version()}, {platform.machine()}, 1 thread,"
        f" {'quick' if args.quick else 'full'} run ({repeat} repeats),"
        f" {'process' if args.process_time else 'wall'} time"
    )
    print()
    print(f"{'call':<36} {'0-d float32 (us)':>17} {'256 x float32 (us)':>19}")
    for name, us in rows.items():
        vec_us = vec_rows.get(name)
        vec_text = f"{vec_us:19.2f}" if vec_us is not None else f"{'-':>19}"
        print(f"{name:<36} {us:17.2f} {vec_text}")

    fwd = rows["EMAMetric.__call__ (forward)"]
    checks = [
        ("forward / MeanMetric.forward", fwd / rows["MeanMetric.__call__ (forward)"], 0.15),
        ("forward / bare lerp_", fwd / rows["bare lerp_ on a float64[4] state"], 6.0),
        ("update / MeanMetric.update", rows["EMAMetric.update"] / rows["MeanMetric.update"], 0.5),
    ]
    print()
    print(f"{'ratio (0-d input)':<36} {'value':>8} {'target':>8}  verdict")
    for name, ratio, target_ratio in checks:
        verdict = "PASS" if ratio <= target_ratio else "MISS"
        print(f"{name:<36} {ratio:8.3f} {'<= ' + format(target_ratio, 'g'):>8}  {verdict}")
    print()
    print("256-element float32 vector input:")
    vec_fwd_ratio = vec_rows["EMAMetric.__call__ (forward)"] / vec_rows["MeanMetric.__call__ (forward)"]
    vec_upd_ratio = vec_rows["EMAMetric.update"] / vec_rows["MeanMetric.update"]
    print(f"{'forward / MeanMetric.forward':<36} {vec_fwd_ratio:8.3f}")
    print(f"{'update / MeanMetric.update':<36} {vec_upd_ratio:8.3f}")


if __name__ == "__main__":
    main()
