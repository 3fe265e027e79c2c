"""The Lightning callback's arguments, validated once, and the checks of the Trainer when ``fit`` starts.

``EMAMetricsCallback`` owns a :class:`CallbackOptions` (as Lightning's Trainer owns its connectors): the validated
arguments, the key of its checkpoint entry and the zero-code metrics' factory. Nothing here imports Lightning; the
checks take the Lightning package (``lightning.pytorch`` or ``pytorch_lightning``) as an argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from ema_metrics.ema import EMAMetric

__all__ = ["CallbackOptions", "check_flavour", "check_strategy"]

_FORMAT = 2
_SYNC_POLICIES = ("step", "logged")


class CallbackOptions:
    """The arguments of ``EMAMetricsCallback`` (documented there), checked when it is constructed."""

    def __init__(
        self,
        *,
        metrics: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        keys: Mapping[str, str] | None = None,
        weight_key: str | None = None,
        alpha: float | None = None,
        half_life: float | None = None,
        span: float | None = None,
        com: float | None = None,
        adjust: bool = True,
        weight_by_batch_size: bool = True,
        reset_on_epoch: bool = False,
        prog_bar: bool = True,
        sync: str = "step",
        rank_spread: bool = False,
    ) -> None:
        self.metric_names = None if metrics is None else _names("metrics", metrics)
        self.exclude = _names("exclude", exclude)
        self.keys = _keys(keys)
        for name, flag in (
            ("adjust", adjust),
            ("weight_by_batch_size", weight_by_batch_size),
            ("reset_on_epoch", reset_on_epoch),
            ("prog_bar", prog_bar),
            ("rank_spread", rank_spread),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"Expected argument `{name}` to be a bool, but got {flag!r}")
        if weight_key is not None and not isinstance(weight_key, str):
            raise TypeError(f"Expected argument `weight_key` to be a string or None, but got {weight_key!r}")
        if weight_key == "":
            raise ValueError(f"Expected argument `weight_key` to be a non-empty string, but got {weight_key!r}")
        if weight_key is not None and not self.keys:
            raise ValueError(f"Argument `weight_key`={weight_key!r} weights the zero-code metrics; pass `keys` too")
        if not isinstance(sync, str) or sync not in _SYNC_POLICIES:
            raise ValueError(f"Expected argument `sync` to be one of {list(_SYNC_POLICIES)}, but got {sync!r}")
        self._zero_code_args: dict[str, Any] = {
            "alpha": alpha,
            "half_life": half_life,
            "span": span,
            "com": com,
            "adjust": adjust,
        }
        if self.keys:
            self.new_own_metric()  # validates the parametrisation
        elif any(v is not None for v in (alpha, half_life, span, com)):
            raise ValueError(
                "Arguments `alpha`, `half_life`, `span` and `com` configure zero-code mode; pass `keys` too"
            )
        self.weight_key = weight_key
        self.weight_by_batch_size = weight_by_batch_size
        self.reset_on_epoch = reset_on_epoch
        self.prog_bar = prog_bar
        self.sync = sync
        self.rank_spread = rank_spread
        args = {k: v for k, v in self._zero_code_args.items() if v is not None} if self.keys else {}
        #: The key of the callback's entry in a checkpoint (built once: Lightning reads it at every hook call).
        self.state_key = (
            f"EMAMetricsCallback{{metrics={self.metric_names}, exclude={self.exclude},"
            f" keys={sorted(self.keys.items())}, weight_key={self.weight_key}, {args}}}"
        )

    def state_dict(self) -> dict[str, Any]:
        """Options and format; the per-rank metric states are added by ``on_save_checkpoint``."""
        return {"format": _FORMAT, "keys": dict(self.keys), "reset_on_epoch": self.reset_on_epoch}

    def new_own_metric(self) -> EMAMetric:
        """A new zero-code metric, configured by the parametrisation arguments."""
        args = self._zero_code_args
        return EMAMetric(
            args["alpha"], half_life=args["half_life"], span=args["span"], com=args["com"], adjust=args["adjust"]
        )


# ---------------------------------------------------------------------------------------------- checks when fit starts
def check_flavour(callback: object, trainer: Any, pl: ModuleType) -> None:
    """Refuse a Trainer of the other Lightning package: it runs a foreign callback without complaint, wrongly."""
    if isinstance(trainer, pl.Trainer):
        return
    packages = {"lightning.pytorch": "ema_metrics.lightning", "pytorch_lightning": "ema_metrics.pytorch_lightning"}
    hint = ""
    for cls in type(trainer).__mro__:
        package = next((p for p in packages if f"{cls.__module__}.".startswith(f"{p}.")), None)
        if package is not None:
            hint = f" This Trainer comes from `{package}`: use `{packages[package]}.EMAMetricsCallback`."
            break
    raise TypeError(
        f"{type(callback).__module__}.{type(callback).__name__} is the callback for `{pl.__name__}`, but the"
        f" Trainer is a {type(trainer).__module__}.{type(trainer).__qualname__}.{hint}"
    )


def check_strategy(trainer: Any, pl: ModuleType) -> None:
    """Refuse a strategy whose collectives do not go through ``torch.distributed``."""
    strategies = pl.strategies
    supported = (strategies.SingleDeviceStrategy, strategies.DDPStrategy, strategies.FSDPStrategy)
    unsupported = tuple(
        getattr(strategies, n)
        for n in ("XLAStrategy", "DeepSpeedStrategy", "XLAFSDPStrategy")
        if hasattr(strategies, n)
    )
    strategy = trainer.strategy
    if not isinstance(strategy, supported) or isinstance(strategy, unsupported):
        raise ValueError(
            f"EMAMetricsCallback supports single-device, DDP (ddp, ddp_spawn, ddp_fork, ddp_notebook) and FSDP"
            f" strategies, whose collectives go through torch.distributed; got {type(strategy).__name__}"
        )


def _names(arg: str, names: Any) -> list[str]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f"Expected argument `{arg}` to be a sequence of strings, but got {names!r}")
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"Expected argument `{arg}` to be a sequence of strings, but got {names!r}")
    if not all(names):
        raise ValueError(f"Expected argument `{arg}` to hold non-empty strings, but got {list(names)!r}")
    return list(names)


def _keys(keys: Any) -> dict[str, str]:
    if keys is None:
        return {}
    if not isinstance(keys, Mapping):
        raise TypeError(f"Expected argument `keys` to be a mapping of output keys to log names, but got {keys!r}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
        raise TypeError(f"Expected argument `keys` to map strings to strings, but got {keys!r}")
    if not all(k and v for k, v in keys.items()):
        raise ValueError(f"Expected argument `keys` to map non-empty strings to non-empty strings, but got {keys!r}")
    if len(set(keys.values())) != len(keys):
        raise ValueError(f"Expected argument `keys` to log each entry under its own name, but got {dict(keys)!r}")
    return dict(keys)
