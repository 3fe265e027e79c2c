"""The performance shortcuts of the EMA metrics, in one place, each with the figure that justifies it.

``forward`` runs on every training micro-batch, so the per-call overhead of ``torch.nn.Module`` and torchmetrics
matters as much as the arithmetic (``benchmarks/bench_update.py``: ``EMAMetric.forward`` takes about 9 us, of which
``nn.Module.__call__`` would add about as much again, and torchmetrics' generic ``forward`` about 10 times more).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.nn.modules import module as _nn_module
from torchmetrics import Metric

__all__ = ["FastCalls", "compiling", "run_eagerly"]

#: Whether dynamo is tracing (``torch.compiler.is_compiling``, torch >= 2.3; ``torch._dynamo.is_compiling`` before).
compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
_eager: Callable[..., Any] | None = None


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def run_eagerly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` outside any graph ``torch.compile`` is tracing: a deliberate graph break.

    The metrics' calls keep Python counters (ticks, update counts) and caches keyed by Python numbers; traced, they
    would be guarded on and recompiled at every new value. Run eagerly, they cost one graph break per call and no
    recompilation. ``torch.compiler.disable`` imports dynamo (about as long as importing torch), so the disabled
    function is made at the first compiled call, not at import; an eager call checks ``compiling()`` only (0.2 us,
    against 1.2 us for a disabled function).
    """
    global _eager
    if _eager is None:
        _eager = torch.compiler.disable(_call)  # type: ignore[no-untyped-call]
    return _eager(fn, *args, **kwargs)


class FastCalls(Metric):
    """``__call__``, ``.to()`` and the update wrapper of torchmetrics, without their overhead where it is not needed."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call :meth:`forward`, skipping ``nn.Module``'s hook machinery when no hook is registered.

        The generic ``nn.Module.__call__`` costs about as much as the whole update. With any hook, or a compiled
        module, the generic path runs. Inside a function that ``torch.compile`` traces, the call runs eagerly (see
        :func:`run_eagerly`).
        """
        if compiling():
            return run_eagerly(self.__call__, *args, **kwargs)
        if (
            self._forward_hooks
            or self._forward_pre_hooks
            or self._backward_hooks
            or self._backward_pre_hooks
            or self._compiled_call_impl is not None
            or _nn_module._global_forward_hooks
            or _nn_module._global_forward_pre_hooks
            or _nn_module._global_backward_hooks
            or _nn_module._global_backward_pre_hooks
        ):
            return super().__call__(*args, **kwargs)
        return self.forward(*args, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """Move the metric (see :meth:`torch.nn.Module.to`); a move to its own device with no dtype is free.

        Lightning calls ``metric.to(device)`` on every ``self.log(name, metric)``, that is on every micro-batch; the
        generic move rebuilds every state and the hot-path constants (tens of microseconds).
        """
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None and device is not None and device == self.device:
            return self
        return super().to(*args, **kwargs)

    def _wrap_update(self, update: Callable[..., Any]) -> Callable[..., Any]:
        """Count updates and clear the cached value; no grad context, since every input is detached."""

        @functools.wraps(update)
        def wrapped_func(*args: Any, **kwargs: Any) -> None:
            if compiling():
                return run_eagerly(wrapped_func, *args, **kwargs)  # type: ignore[no-any-return]
            try:
                update(*args, **kwargs)
            except RuntimeError as err:
                raise self._clear_device_error(err) from err
            d = self.__dict__
            d["_computed"] = None
            d["_update_count"] += 1

        return wrapped_func

    def _clear_device_error(self, err: RuntimeError) -> RuntimeError:
        """A device mismatch raised by an update, reworded to say what to do (the state is unchanged)."""
        text = str(err)
        ours = text.startswith("Expected argument")  # already names the argument and both devices
        if ours or ("Expected all tensors to be on" not in text and "device" not in text):
            return err
        return RuntimeError(
            f"{type(self).__name__}: the input is on another device than the metric ({self.device}). Move the"
            f" metric with `.to(device)`, or pass the input on {self.device}. The state is unchanged. ({err})"
        )
