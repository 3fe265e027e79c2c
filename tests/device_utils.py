"""A stand-in accelerator for tests without a GPU, and a recorder of what would stall or fail on one.

torch's ``meta`` device stands in for CUDA: like a CUDA kernel, a meta kernel refuses a CPU tensor with dims and
accepts a CPU 0-d tensor, and it holds no data, so a read-back cannot hide. :class:`DeviceRecorder` records, while
active:

- **read-backs**: ``_local_scalar_dense``, ``is_nonzero``, ``equal`` on a device tensor (what ``.item()``,
  ``bool(t)``, ``if t``, ``float(t)``, ``.tolist()`` dispatch to), and, at the Python level, ``Tensor.item``,
  ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``__index__`` on any tensor that is not a CPU tensor made
  from host data in the same call (on a CPU run these stand for the read-backs a GPU run would make);
- **host copies**: ``_to_copy``/``copy_`` between the CPU and a device, and tensor factories fed host data
  (``torch.tensor``, ``as_tensor``, ``asarray``) with a device, or on a CPU run any such factory (each is a copy of host
  data to the device on a GPU);
- **mixed**: a device op given a CPU tensor with dims, or a CPU 0-d tensor as ``addcmul``'s ``self`` or ``tensor1``
  (meta accepts it, CUDA refuses it: "CPU Scalar support for tensor1 argument is not supported").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
_COPIES = {aten._to_copy.default, aten.copy_.default}
_PY_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__"}
_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray}


@dataclass
class Record:
    """What a :class:`DeviceRecorder` saw."""

    reads: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)
    mixed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reads or self.copies or self.mixed)

    def summary(self) -> dict[str, list[str]]:
        return {"reads": self.reads, "copies": self.copies, "mixed": self.mixed}


def _is_device(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


def _is_cpu(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu"


class _Dispatch(TorchDispatchMode):
    def __init__(self, record: Record) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        name = str(func.overloadpacket.__name__)
        if func in _READS and any(_is_device(t) for t in tensors):
            self.record.reads.append(name)
        if func in _COPIES:
            out_device = kwargs.get("device")
            src = args[1] if func is aten.copy_.default else args[0]
            dst_device = args[0].device if func is aten.copy_.default else (out_device or src.device)
            if torch.device(dst_device).type != src.device.type:
                self.record.copies.append(f"{name} {src.device.type}->{torch.device(dst_device).type}")
        elif any(_is_device(t) for t in tensors):
            cpu_with_dims = [t for t in tensors if _is_cpu(t) and t.dim() > 0]
            if cpu_with_dims:
                self.record.mixed.append(f"{name}: a CPU tensor with dims")
            addcmul = func in (aten.addcmul.default, aten.addcmul.out, aten.addcmul_.default)
            if addcmul and any(_is_cpu(t) and t.dim() == 0 for t in args[:2]):
                self.record.mixed.append(f"{name}: a CPU 0-d tensor as self or tensor1")
        return func(*args, **kwargs)


class _Functions(TorchFunctionMode):
    def __init__(self, record: Record, cpu_run: bool) -> None:
        super().__init__()
        self.record = record
        self.cpu_run = cpu_run

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _FACTORIES and args and not isinstance(args[0], torch.Tensor):
            device = kwargs.get("device")
            if self.cpu_run or (device is not None and torch.device(device).type != "cpu"):
                self.record.copies.append(f"{func.__name__}(host data, device={device})")
        name = getattr(func, "__name__", "")
        if name in _PY_READS and args and isinstance(args[0], torch.Tensor):
            t = args[0]
            if _is_device(t) or (self.cpu_run and t.dim() >= 0):
                self.record.reads.append(f"Tensor.{name}")
        return func(*args, **kwargs)


@contextmanager
def recording(cpu_run: bool = False) -> Iterator[Record]:
    """Record read-backs, host copies and mixed-device ops made inside the block.

    Args:
        cpu_run: count, on CPU tensors, what would be a read-back or a copy of host data on a GPU (for syncs measured
            with gloo on the CPU).

    """
    record = Record()
    with _Functions(record, cpu_run), _Dispatch(record):
        yield record
