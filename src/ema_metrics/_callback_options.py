"""The Lightning callback's arguments: validation, sync policy, identity in checkpoints, checks when ``fit`` starts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from ema_metrics._base import DecayedSumMetric
from ema_metrics.ema import EMAMetric

_FORMAT = 2
_SYNC_POLICIES = ("step", "logged")


class CallbackOptions:
    """Arguments of ``EMAMetricsCallback`` (documented there), checked when it is constructed, and the sync policy."""

    _pl: ModuleType
    _driven: dict[str, DecayedSumMetric]
    _own: dict[str, EMAMetric]

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
        if weight_key is not None and (not isinstance(weight_key, str) or not weight_key):
            raise TypeError(f"Expected argument `weight_key` to be a non-empty string or None, but got {weight_key!r}")
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
            self._new_own_metric()  # validates the parametrisation
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
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        """Forget everything of an earlier fit (implemented by the callback)."""

    # ------------------------------------------------------------------ sync policy
    def should_sync(self, trainer: Any, step_done: bool) -> bool:
        """Whether to pool every rank's EMA at the end of this training batch (the sync policy).

        A batch that Lightning logs is always synced before it is logged, whatever this returns.

        Args:
            trainer: the Trainer.
            step_done: whether an optimizer stepped in this batch (a tick just closed).

        """
        return step_done and self.sync == "step"

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        """Key of this callback's entry in a checkpoint, so several instances can coexist.

        Built once from the arguments: Lightning reads it at every hook call of every callback.
        """
        key: str | None = self.__dict__.get("_state_key")
        if key is None:
            args = {k: v for k, v in self._zero_code_args.items() if v is not None} if self.keys else {}
            key = self.__dict__["_state_key"] = (
                f"EMAMetricsCallback{{metrics={self.metric_names}, exclude={self.exclude},"
                f" keys={sorted(self.keys.items())}, weight_key={self.weight_key}, {args}}}"
            )
        return key

    def state_dict(self) -> dict[str, Any]:
        """Options and format; the per-rank metric states are added by ``on_save_checkpoint``."""
        return {"format": _FORMAT, "keys": dict(self.keys), "reset_on_epoch": self.reset_on_epoch}

    def _new_own_metric(self) -> EMAMetric:
        args = self._zero_code_args
        return EMAMetric(
            args["alpha"], half_life=args["half_life"], span=args["span"], com=args["com"], adjust=args["adjust"]
        )

    # ------------------------------------------------------------------ checks when fit starts
    def _check_flavour(self, trainer: Any) -> None:
        """Lightning runs a callback of the other package without complaint; its checks would then mislead."""
        if isinstance(trainer, self._pl.Trainer):
            return
        packages = {"lightning.pytorch": "ema_metrics.lightning", "pytorch_lightning": "ema_metrics.pytorch_lightning"}
        hint = ""
        for cls in type(trainer).__mro__:
            package = next((p for p in packages if f"{cls.__module__}.".startswith(f"{p}.")), None)
            if package is not None:
                hint = f" This Trainer comes from `{package}`: use `{packages[package]}.EMAMetricsCallback`."
                break
        raise TypeError(
            f"{type(self).__module__}.{type(self).__name__} is the callback for `{self._pl.__name__}`, but the"
            f" Trainer is a {type(trainer).__module__}.{type(trainer).__qualname__}.{hint}"
        )

    def _check_strategy(self, trainer: Any) -> None:
        strategies = self._pl.strategies
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

    def _check_disjoint(self, others: Sequence[CallbackOptions]) -> None:
        """Two instances must not drive the same metric, nor log two zero-code metrics under the same name."""
        mine = {id(m): n for n, m in self._driven.items()}
        for other in others:
            shared = sorted(mine[id(m)] for m in other._driven.values() if id(m) in mine)
            if shared:
                raise ValueError(
                    f"Two EMAMetricsCallback instances both drive {shared}; a metric must tick once per step. Split"
                    f" them: pass metrics=[...] to one and exclude=[...] to the other, or metrics=[] to an instance"
                    " that only smooths `keys`."
                )
            names = sorted(set(self.keys.values()) & set(other.keys.values()))
            if names:
                raise ValueError(
                    f"Two EMAMetricsCallback instances both log {names}; give their `keys` different log names."
                )


def _names(arg: str, names: Any) -> list[str]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f"Expected argument `{arg}` to be a sequence of strings, but got {names!r}")
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"Expected argument `{arg}` to be a sequence of non-empty strings, but got {names!r}")
    return list(names)


def _keys(keys: Any) -> dict[str, str]:
    if keys is None:
        return {}
    if not isinstance(keys, Mapping):
        raise TypeError(f"Expected argument `keys` to be a mapping of output keys to log names, but got {keys!r}")
    for k, v in keys.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k or not v:
            raise TypeError(f"Expected argument `keys` to map non-empty strings to non-empty strings, but got {keys!r}")
    if len(set(keys.values())) != len(keys):
        raise ValueError(f"Expected argument `keys` to log each entry under its own name, but got {dict(keys)!r}")
    return dict(keys)
