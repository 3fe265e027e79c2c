"""The GPU check: the hot path and the syncs on one CUDA device and a one-process NCCL group, in one command.

Run: ``make gpu-check`` (``python benchmarks/gpu_check.py --out gpu_check.json``); about a minute on one GPU. It
prints a short JSON summary and exits non-zero if a check failed:

- ``hot_path``: every call form of ``update``/``forward``/ticks (Python numbers that change at every call, CPU 0-d
  tensors, device tensors, ``EMAWrapper``, after ``reset()``/``load_state_dict()``/``.to()``) under
  ``torch.cuda.set_sync_debug_mode("error")``, which turns every hidden synchronization into an exception, and under
  the profiler, which counts the copies between host and device (expected: none, except the first update's).
- ``sync``: a one-process NCCL group with the collectives forced (``ema_metrics._sync.collectives.FORCE_COLLECTIVES``;
  one rank otherwise pools locally): ``synced_values`` of k metrics, ``compute()``, ``merge_state``, a metric left on
  the CPU; the profiler's count of host-device copies per sync (expected: at most one each way, whatever k).
- ``cuda_graph``: capturing ``update`` in a CUDA graph raises a clear error (the tick count is a Python number).
- ``timing``: microseconds per call of ``EMAMetric`` and ``MeanMetric`` in the same run.
- ``lightning``: a real Lightning fit on the device (bf16-mixed on CUDA, ``accumulate_grad_batches=2``) with an
  ``EMAMetric`` logged by the module and the zero-code key, read back from the CSV log against a float64 oracle over the
  per-sample losses recorded on the device.
- ``transformers``: a real Hugging Face ``Trainer`` run on the device (bf16 on CUDA) with ``EMALossCallback``, its
  ``loss_ema`` against a float64 oracle over per-token losses recomputed from the logits; then the same run with
  ``torch_compile=True``: no frame compiled after the first steps, and the eager values to float32 rounding.

``--device cpu`` runs the same script on the CPU with a gloo group (no sync debug mode, no graph): the test suite
runs it that way so that the script stays in step with the code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile
from torchmetrics.aggregation import MeanMetric
from torchmetrics.regression import MeanSquaredError

from ema_metrics import EMAMetric, EMAWrapper, _sync, synced_values

HALF_LIFE = 3.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _sync_debug(on: bool) -> Any:
    if on:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if on:
            torch.cuda.set_sync_debug_mode(0)


def _copies(device: torch.device, fn: Callable[[], Any]) -> dict[str, int]:
    """Host-to-device and device-to-host copies that ``fn`` makes, counted by the profiler."""
    if device.type != "cuda":
        fn()
        return {"HtoD": 0, "DtoH": 0}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    return {
        "HtoD": sum("Memcpy HtoD" in n for n in names),
        "DtoH": sum("Memcpy DtoH" in n for n in names),
    }


def check_hot_path(device: torch.device) -> dict[str, Any]:
    """Every call form under the sync debug mode, and the profiler's count of copies."""
    cuda = device.type == "cuda"
    x = torch.tensor(0.5, device=device)
    xs = torch.rand(64, device=device)
    w = torch.tensor(3.0, device=device)
    cpu_scalar = torch.tensor(7)
    metric = EMAMetric(alpha=0.1).to(device)
    first = _copies(device, lambda: metric(x))  # the constants are made on the device by fill kernels
    wrapper = EMAWrapper(MeanSquaredError(), alpha=0.1).to(device)
    fresh = iter(range(10**6))  # weights never seen before, at every run of a form
    saved = EMAMetric(alpha=0.1).state_dict()
    nothing: Callable[[], Any] = lambda: None  # noqa: E731
    forms: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {  # name: (set-up, measured call)
        "forward(python float)": (nothing, lambda: metric(0.25)),
        "update(python int)": (nothing, lambda: metric.update(3)),
        "forward(device 0-d)": (nothing, lambda: metric(x)),
        "forward(device vector, python weight)": (nothing, lambda: metric(xs, weight=2.0)),
        "forward(new python weight at every call)": (
            nothing,
            lambda: [metric(x, weight=1.0 + next(fresh)) for _ in range(80)],
        ),
        "forward(python value, python weight < 1)": (nothing, lambda: metric(0.25, weight=0.5)),
        "forward(device value, device weight)": (nothing, lambda: metric(x, weight=w)),
        "forward(device value, CPU 0-d weight)": (nothing, lambda: metric(x, weight=cpu_scalar)),
        "forward(CPU 0-d value)": (nothing, lambda: metric(cpu_scalar)),
        "tick of 4 micro-batches": (nothing, lambda: _tick(metric, x)),
        "300 empty ticks (renormalizations)": (nothing, lambda: [_tick(metric, None) for _ in range(300)]),
        "first update after reset()": (metric.reset, lambda: metric(x, weight=2.0)),
        "first update after load_state_dict()": (lambda: metric.load_state_dict(saved), lambda: metric(x)),
        "first update after .to(cpu).to(device)": (lambda: metric.to("cpu").to(device), lambda: metric(0.5)),
        "EMAWrapper(MeanSquaredError).update": (nothing, lambda: wrapper.update(xs, xs * 0.5)),
        "EMAWrapper forward": (nothing, lambda: wrapper(xs, xs * 0.5)),
    }
    out: dict[str, Any] = {"first_update_copies": first, "forms": {}}
    for name, (setup, call) in forms.items():
        setup()
        try:
            with _sync_debug(cuda):
                copies = _copies(device, call)
            out["forms"][name] = {"ok": True, **copies}
        except Exception as err:  # a hidden synchronization under sync_debug_mode("error")
            out["forms"][name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
    out["ok"] = all(f["ok"] and f["HtoD"] == 0 and f["DtoH"] == 0 for f in out["forms"].values())
    return out


def _tick(metric: EMAMetric, x: torch.Tensor | None) -> None:
    with metric.tick():
        for _ in range(4 if x is not None else 0):
            metric.update(x, weight=8)


def check_sync(device: torch.device) -> dict[str, Any]:
    """A one-process group with the collectives forced: values and copies per sync."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    _sync.collectives.FORCE_COLLECTIVES = True
    out: dict[str, Any] = {"backend": backend}
    try:
        for k in (1, 3, 8):
            metrics = [EMAMetric(alpha=0.2).to(device) for _ in range(k)]
            for i, m in enumerate(metrics):
                m(torch.tensor(float(i), device=device), weight=2.0)
            local = [float(m._value_from_states(m.sync_state().states)) for m in metrics]
            synced_values(metrics)  # warm
            values: list[torch.Tensor] = []
            copies = _copies(device, lambda ms=metrics, vs=values: vs.extend(synced_values(ms)))
            out[f"synced_values k={k}"] = {"copies": copies, "equal_local": [float(v) for v in values] == local}
        metric = EMAMetric(alpha=0.2).to(device)
        metric(1.5)
        out["compute"] = {"copies": _copies(device, metric.compute), "value": float(metric.compute())}
        other = EMAMetric(alpha=0.2).to(device)
        other(2.5)
        out["merge_state"] = {"copies": _copies(device, lambda: metric.merge_state(other))}
        on_cpu = EMAMetric(alpha=0.2)  # left on the CPU: pooled through a buffer on the group's device
        on_cpu(4.0)
        out["cpu metric"] = {"value": float(synced_values([on_cpu])[0])}
        ok = all(v.get("equal_local", True) for v in out.values() if isinstance(v, dict))
        ok = ok and all(
            v["copies"]["HtoD"] <= 1 and v["copies"]["DtoH"] <= 1
            for v in out.values()
            if isinstance(v, dict) and "copies" in v
        )
        out["ok"] = ok and out["cpu metric"]["value"] == 4.0
    finally:
        _sync.collectives.FORCE_COLLECTIVES = False
        dist.destroy_process_group()
    return out


def check_cuda_graph(device: torch.device) -> dict[str, Any]:
    """Capturing ``update`` in a CUDA graph must raise a clear error, and leave the metric as it was."""
    if device.type != "cuda":
        return {"skipped": "CUDA graphs need a CUDA device", "ok": True}
    metric = EMAMetric(alpha=0.2).to(device)
    x = torch.tensor(1.0, device=device)
    metric(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    error = ""
    try:
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            metric.update(x)
    except RuntimeError as err:
        error = str(err)
    torch.cuda.synchronize()
    refused = "cannot be captured in a CUDA graph" in error
    return {"refused": refused, "error": error[:200], "ticks_after": metric.ticks, "ok": refused and metric.ticks == 1}


def timing(device: torch.device, calls: int) -> dict[str, Any]:
    """Microseconds per call, measured with the device synchronized around the loop."""
    x = torch.tensor(0.5, device=device)

    def per_call(fn: Callable[[], Any]) -> float:
        for _ in range(50):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls * 1e6

    ema, mean = EMAMetric(alpha=0.1).to(device), MeanMetric().to(device)
    out = {
        "EMAMetric.update(device 0-d)": per_call(lambda: ema.update(x)),
        "EMAMetric.forward(device 0-d)": per_call(lambda: ema(x)),
        "EMAMetric.forward(python float, weight 32)": per_call(lambda: ema(0.5, weight=32)),
        "MeanMetric.update(device 0-d)": per_call(lambda: mean.update(x)),
        "MeanMetric.forward(device 0-d)": per_call(lambda: mean(x)),
    }
    out["forward / MeanMetric.forward"] = out["EMAMetric.forward(device 0-d)"] / out["MeanMetric.forward(device 0-d)"]
    return {k: round(v, 3) for k, v in out.items()}


def _ema_curve(sums: list[float], counts: list[float]) -> list[float]:
    """Float64 debiased weighted EMA after each step, from its closed form."""
    beta = 0.5 ** (1.0 / HALF_LIFE)
    return [
        sum(beta ** (t - i) * sums[i] for i in range(t + 1)) / sum(beta ** (t - i) * counts[i] for i in range(t + 1))
        for t in range(len(sums))
    ]


def _close(a: list[float], b: list[float], rel: float) -> bool:
    return len(a) == len(b) > 0 and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b, strict=True))


def check_lightning(device: torch.device, steps: int = 8) -> dict[str, Any]:
    """A Lightning fit on the device: the logged EMA (module metric and zero-code key) against a float64 oracle."""
    import tempfile

    import lightning.pytorch as pl
    from tests.lightning_helpers import IndexedData, loader, read_csv_metric

    from ema_metrics.lightning import EMAMetricsCallback

    cuda = device.type == "cuda"
    recorded: list[tuple[int, torch.Tensor]] = []  # (optimizer step, per-sample losses), kept on the device

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(4, 1)
            self.train_loss = EMAMetric(half_life=HALF_LIFE)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y, _ = batch
            per_sample = (self.layer(x).squeeze(-1) - y) ** 2
            loss = per_sample.mean()
            self.train_loss(loss, weight=len(y))
            self.log("train_loss", self.train_loss, on_step=True, on_epoch=False)
            recorded.append((self.trainer.fit_loop.epoch_loop._batches_that_stepped, per_sample.detach().double()))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self) -> Any:
            return loader(IndexedData(steps * 2 * 4), 4)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            default_root_dir=tmp,
            accelerator="gpu" if cuda else "cpu",
            devices=1,
            precision="bf16-mixed" if cuda else "32-true",
            max_epochs=1,
            accumulate_grad_batches=2,
            log_every_n_steps=1,
            logger=pl.loggers.CSVLogger(tmp, name="csv"),
            callbacks=[EMAMetricsCallback(keys={"loss": "loss_ema"}, half_life=HALF_LIFE)],
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Regression())
        module_curve = read_csv_metric(tmp, "train_loss")
        key_curve = read_csv_metric(tmp, "loss_ema")
    sums, counts = [0.0] * steps, [0.0] * steps
    for step, losses in recorded:
        sums[step] += float(losses.sum())
        counts[step] += losses.numel()
    oracle = _ema_curve(sums, counts)
    out = {
        "precision": trainer.precision,
        "module metric": [round(v, 6) for _, v in module_curve],
        "oracle": [round(v, 6) for v in oracle],
        "module metric matches": _close([v for _, v in module_curve], oracle, 1e-5),
        "zero-code key matches": _close([v for _, v in key_curve], oracle, 1e-5),
        "steps": [s for s, _ in module_curve],
    }
    out["ok"] = out["module metric matches"] and out["zero-code key matches"] and out["steps"] == list(range(steps))
    return out


def _hf_run(device: torch.device, compile_: bool, steps: int) -> tuple[list[float], list[float], list[int]]:
    """One tiny GPT-2 Trainer run: (logged loss_ema, float64 oracle, dynamo frames after each step)."""
    import tempfile

    import torch._dynamo as dynamo
    from tests.hf_worker import SEQ, VOCAB, make_data, make_recorder
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from ema_metrics.transformers import EMALossCallback

    class Frames(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.frames: list[int] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.frames.append(int(dynamo.utils.counters["frames"]["total"]))

    dynamo.reset()
    cuda = device.type == "cuda"
    records: dict[str, Any] = {"tokens": {}}
    callback, frames = EMALossCallback(half_life=HALF_LIFE), Frames()
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0
    )
    config.update({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})  # compiled dropout draws other numbers
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=steps,
            logging_steps=1,
            report_to=[],
            use_cpu=not cuda,
            bf16=cuda,
            save_strategy="no",
            disable_tqdm=True,
            torch_compile=compile_,
        )
        trainer = Trainer(
            model=GPT2LMHeadModel(config),
            args=args,
            train_dataset=make_data(4 * steps, seed=1),
            # the recorder reads its own float64 losses back: only in the eager run, where it compiles nothing
            callbacks=[callback, frames] + ([] if compile_ else [make_recorder(None, records)]),
        )
        trainer.train()
    logged = [h["loss_ema"] for h in trainer.state.log_history if "loss_ema" in h]
    if compile_:
        return logged, [], frames.frames
    rows = [records["tokens"][str(s)] for s in range(steps)]
    oracle = _ema_curve([sum(t for t, _ in r) for r in rows], [float(sum(n for _, n in r)) for r in rows])
    return logged, oracle, frames.frames


def check_transformers(device: torch.device, steps: int = 8) -> dict[str, Any]:
    """A Trainer run on the device against a float64 oracle; the compiled run recompiles nothing after its start."""
    eager, oracle, _ = _hf_run(device, compile_=False, steps=steps)
    out: dict[str, Any] = {
        "loss_ema": [round(v, 6) for v in eager],
        "oracle": [round(v, 6) for v in oracle],
        "matches oracle": _close(eager, oracle, 1e-4),  # bf16 autocast logits, each side summed in its own order
    }
    compiled, _, frames = _hf_run(device, compile_=True, steps=steps)
    out["compiled frames per step"] = frames
    out["compiled frames flat"] = len(frames) == steps and frames[-1] == frames[1]
    out["compiled matches eager"] = _close(compiled, eager, 1e-3 if device.type == "cuda" else 1e-5)
    out["ok"] = out["matches oracle"] and out["compiled frames flat"] and out["compiled matches eager"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of the script)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per timing")
    parser.add_argument("--out", default=None, help="also write the JSON summary to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA device"}))
        return 2
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    for name, check in (
        ("hot_path", check_hot_path),
        ("sync", check_sync),
        ("cuda_graph", check_cuda_graph),
        ("timing", lambda d: timing(d, args.calls)),
        ("lightning", check_lightning),
        ("transformers", check_transformers),
    ):
        try:
            with contextlib.redirect_stdout(sys.stderr):  # what the trainers print: stdout is the summary alone
                summary[name] = check(device)
        except Exception:
            summary[name] = {"ok": False, "error": traceback.format_exc()[-2000:]}
    summary["ok"] = all(v.get("ok", True) for v in summary.values() if isinstance(v, dict))
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
