"""Logic of the Lightning callback, shared by the ``lightning.pytorch`` and ``pytorch_lightning`` flavours.

Nothing here imports Lightning: the concrete classes in :mod:`ema_metrics.lightning` and
:mod:`ema_metrics.pytorch_lightning` mix this into their package's ``Callback`` and set ``_pl`` to that package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ema_metrics._base import DecayedSumMetric, _distributed_ready, _gather, synced_values
from ema_metrics.ema import EMAMetric

_FORMAT = 1


class _EMACallbackLogic:
    """One exact smoothed point per optimizer step, whatever the accumulation and the number of processes.

    The callback drives every EMA metric (:class:`~ema_metrics.EMAMetric`, :class:`~ema_metrics.EMAWrapper`)
    found in the ``LightningModule``, nested submodules included:

    1. **One tick per optimizer step.** All the micro-batch updates of one optimizer step (on every rank) pool into
       one tick, so the smoothing is measured in optimizer steps whatever ``accumulate_grad_batches`` and the world
       size are. With manual optimization a tick closes at the end of every training batch in which at least one
       optimizer stepped (so a GAN step with two optimizers is one tick, and hand-written accumulation over ``k``
       batches is one tick per ``k`` batches).
    2. **Sync only when logged, once.** On the steps Lightning logs (``log_every_n_steps``), the callback syncs all
       the EMA metrics of the module together with **one** collective, before Lightning reads the logged value, and
       writes the synced value into each metric's ``forward`` result. Other steps issue no collective, so the
       progress bar shows the rank-local value between logged steps. Log the metric object,
       ``self.log(name, self.train_loss)``: a tensor (such as the value ``forward`` returned) is copied by Lightning
       when it is logged, before the sync, so it would stay rank-local.
    3. **Continuous across epochs.** Lightning calls ``reset()`` on logged metrics at every epoch end; the callback
       restores the EMA state at the start of the next epoch (and at the end of fit). ``reset_on_epoch=True``
       restarts every EMA at the start of each epoch instead (after fit the metrics hold the last epoch's EMA).
    4. **Exact resume.** ``on_save_checkpoint`` gathers every rank's state (one collective) into the callback's
       checkpoint entry. On resume each rank gets its own state back (bit-exact), or, on a different number of
       processes, rank 0 takes the pooled state and the others start from zero, which continues the same curve.
    5. **Zero-code mode.** ``keys={"loss": "train_loss_ema"}`` smooths entries of the ``training_step`` output and
       logs them under the given names, with no change to the module. The same guarantees hold.

    Without the callback, an :class:`~ema_metrics.EMAMetric` still logs a correct value (synced at ``compute``,
    or in ``forward`` with ``sync_on_forward=True``), but it ticks once per *micro-batch*, it restarts each epoch,
    and on a DDP resume every rank starts from rank 0's state.

    Args:
        metrics: attribute paths (as in ``named_modules``, e.g. ``"train_loss"`` or ``"head.acc"``) of the EMA
            metrics to drive; default: every EMA metric in the module. Metrics updated outside training (for
            example in ``validation_step``) should be left out with ``exclude``: a driven metric ticks once per
            optimizer step.
        exclude: attribute paths to leave alone.
        keys: zero-code mode: ``{output_key: log_name}`` for entries of the ``training_step`` output to smooth.
            ``"loss"`` is un-normalised from Lightning's division by ``accumulate_grad_batches``.
        alpha: smoothing of the zero-code metrics (exactly one of ``alpha``, ``half_life``, ``span``, ``com``
            when ``keys`` is given).
        half_life: see ``alpha``.
        span: see ``alpha``.
        com: see ``alpha``.
        adjust: ``adjust`` of the zero-code metrics.
        weight_by_batch_size: weight each zero-code micro-batch by its batch size (Lightning's
            ``extract_batch_size``); otherwise every micro-batch has weight 1.
        reset_on_epoch: restart every EMA at the start of each training epoch.
        prog_bar: show the zero-code values in the progress bar.

    Raises:
        ValueError: If ``keys`` is given without a valid parametrisation, or a parametrisation without ``keys``.
            When ``fit`` starts: if the strategy is not supported, ``metrics`` names something that is not an EMA
            metric of the module, or there is nothing to smooth.
        TypeError: If names are not strings. When ``fit`` starts: if the Trainer is one of the other Lightning
            package (``lightning.pytorch`` versus ``pytorch_lightning``).

    """

    _pl: ModuleType

    def __init__(
        self,
        *,
        metrics: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        keys: Mapping[str, str] | None = None,
        alpha: float | None = None,
        half_life: float | None = None,
        span: float | None = None,
        com: float | None = None,
        adjust: bool = True,
        weight_by_batch_size: bool = True,
        reset_on_epoch: bool = False,
        prog_bar: bool = True,
    ) -> None:
        self.metric_names = None if metrics is None else _names("metrics", metrics)
        self.exclude = _names("exclude", exclude)
        self.keys = dict(keys or {})
        for k, v in self.keys.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"Expected argument `keys` to map strings to strings, but got {self.keys!r}")
        self._zero_code_args: dict[str, Any] = {
            "alpha": alpha,
            "half_life": half_life,
            "span": span,
            "com": com,
            "adjust": adjust,
        }
        if self.keys:
            EMAMetric(alpha, half_life=half_life, span=span, com=com, adjust=adjust)  # validates the parametrisation
        elif any(v is not None for v in (alpha, half_life, span, com)):
            raise ValueError(
                "Arguments `alpha`, `half_life`, `span` and `com` configure zero-code mode; pass `keys` too"
            )
        self.weight_by_batch_size = weight_by_batch_size
        self.reset_on_epoch = reset_on_epoch
        self.prog_bar = prog_bar
        self._driven: dict[str, DecayedSumMetric] = {}
        self._own: dict[str, EMAMetric] = {}
        self._tick_open = False
        self._stepped = False
        self._snapshot: dict[str, tuple[dict[str, Any], dict[str, Any], bool]] | None = None
        self._pending_restore: dict[str, Any] | None = None

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        """Key of this callback's entry in a checkpoint, so several instances can coexist."""
        return f"EMACallback{{metrics={self.metric_names}, exclude={self.exclude}, keys={sorted(self.keys.items())}}}"

    def state_dict(self) -> dict[str, Any]:
        """Options and format; the per-rank metric states are added by :meth:`on_save_checkpoint`."""
        return {"format": _FORMAT, "keys": dict(self.keys), "reset_on_epoch": self.reset_on_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved per-rank states; they are applied to the metrics when training starts."""
        self._pending_restore = state_dict.get("ranks")

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Find the EMA metrics of the module, create the zero-code ones, and check the strategy."""
        if stage != "fit":
            return
        self._check_flavour(trainer)
        self._check_strategy(trainer)
        # Nothing carries over from an earlier fit with this instance: its end-of-epoch snapshot would be restored
        # into this fit's metrics at the first epoch start. A checkpoint to resume from is loaded after `setup`.
        self._snapshot = None
        self._pending_restore = None
        self._tick_open = False
        self._stepped = False
        found = {name: m for name, m in pl_module.named_modules() if isinstance(m, DecayedSumMetric)}
        if self.metric_names is not None:
            missing = [n for n in self.metric_names if n not in found]
            if missing:
                raise ValueError(
                    f"EMACallback: argument `metrics` names {missing}, which are not EMA metrics of"
                    f" {type(pl_module).__name__}; found {sorted(found)}"
                )
            found = {n: found[n] for n in self.metric_names}
        self._driven = {n: m for n, m in found.items() if n not in self.exclude}
        self._own = {key: self._new_own_metric() for key in self.keys}
        if not self._driven and not self._own:
            raise ValueError(
                f"EMACallback found no EMAMetric or EMAWrapper in {type(pl_module).__name__} (after `metrics`/"
                "`exclude`) and has no `keys` to smooth. Add an EMA metric to the module, or pass e.g."
                " keys={'loss': 'train_loss_ema'}, half_life=50."
            )
        self._install_sync(trainer)

    def _install_sync(self, trainer: Any) -> None:
        """Sync right before Lightning writes the step's metrics to the loggers, and only then.

        Lightning decides to log a step in ``update_train_step_metrics``, after every ``on_train_batch_end`` hook;
        a later hook (the module's own, or the ``max_time`` timer) may still set ``should_stop``, which makes
        Lightning log. So the sync runs inside that call, with Lightning's own predicate, and not in a hook.
        """
        connector = trainer._logger_connector
        original = connector.update_train_step_metrics

        def update_train_step_metrics() -> None:
            if _lightning_logs_now(trainer, trainer.lightning_module.automatic_optimization):
                self._sync_into_forward_cache()
            original()

        connector.update_train_step_metrics = update_train_step_metrics
        self._installed_on = connector

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Remove the sync hook installed by :meth:`setup`."""
        connector = self.__dict__.pop("_installed_on", None)
        if connector is not None:
            connector.__dict__.pop("update_train_step_metrics", None)

    def _new_own_metric(self) -> EMAMetric:
        args = self._zero_code_args
        return EMAMetric(
            args["alpha"], half_life=args["half_life"], span=args["span"], com=args["com"], adjust=args["adjust"]
        )

    def _check_flavour(self, trainer: Any) -> None:
        """Lightning runs a callback of the other package without complaint; its checks would then mislead."""
        if isinstance(trainer, self._pl.Trainer):
            return
        packages = {"lightning.pytorch": "ema_metrics.lightning", "pytorch_lightning": "ema_metrics.pytorch_lightning"}
        hint = ""
        for cls in type(trainer).__mro__:
            package = next((p for p in packages if f"{cls.__module__}.".startswith(f"{p}.")), None)
            if package is not None:
                hint = f" This Trainer comes from `{package}`: use `{packages[package]}.EMACallback`."
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
                f"EMACallback supports single-device, DDP (ddp, ddp_spawn, ddp_fork, ddp_notebook) and FSDP"
                f" strategies, whose collectives go through torch.distributed; got {type(strategy).__name__}"
            )

    def _all(self) -> list[DecayedSumMetric]:
        return [*self._driven.values(), *self._own.values()]

    # ------------------------------------------------------------------ training hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Move the zero-code metrics to the module's device and apply a checkpoint's per-rank states."""
        for m in self._own.values():
            m.to(pl_module.device)
        self._tick_open = False
        if self._pending_restore is not None:
            self._restore_ranks(self._pending_restore, trainer)
            self._pending_restore = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Undo Lightning's end-of-epoch ``reset()`` (or restart, with ``reset_on_epoch=True``)."""
        if self.reset_on_epoch:
            for m in self._all():
                m.reset()
        else:
            self._restore_snapshot()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Open a tick at the first micro-batch of an optimizer step."""
        if not self._tick_open:
            for m in self._all():
                m.begin_tick()
            self._tick_open = True
            self._stepped = False

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Remember that an optimizer stepped during this batch."""
        self._stepped = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Feed and log the zero-code metrics, and close the tick after an optimizer step.

        The sync itself runs later, when Lightning writes the step's metrics (see :meth:`_install_sync`).
        """
        automatic = pl_module.automatic_optimization
        if self._own:
            self._update_own(trainer, outputs, batch, automatic)
        step_done = not trainer.fit_loop._should_accumulate() if automatic else self._stepped
        if step_done and self._tick_open:
            for m in self._all():
                m.end_tick()
            self._tick_open = False
        if self._own:
            self._log_own(pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Keep a copy of the EMA states: Lightning resets logged metrics right after this hook.

        With manual optimization a tick can still be open here (its optimizer step closes in the next epoch):
        whether it already decayed is kept too, since ``reset()`` clears that flag.
        """
        self._snapshot = {
            name: (m._copy_state_dict(), m.get_extra_state(), m._tick_decayed) for name, m in self._named_all()
        }

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Restore the states after the last epoch's reset, so ``compute()`` after ``fit`` still works.

        With ``reset_on_epoch=True`` too: the EMAs restart at the *start* of each epoch, so after ``fit`` they hold
        the last epoch's average (not the empty state of Lightning's reset).
        """
        self._restore_snapshot()  # first: the snapshot may hold a tick still open at the last epoch's end
        if self._tick_open:
            for m in self._all():
                m.end_tick()
            self._tick_open = False

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Store every rank's state in this callback's checkpoint entry (one collective on every rank)."""
        named = self._named_all()
        if not named:
            return
        packed = torch.cat([m._pack() for _, m in named])
        gathered = _gather(packed, None, None) if _distributed_ready() else packed.unsqueeze(0)
        per_metric: dict[str, Tensor] = {}
        offset = 0
        for name, m in named:
            size = m._packed_size()
            per_metric[name] = gathered[:, offset : offset + size].detach().cpu().clone()
            offset += size
        entry = checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, self.state_dict())
        entry["ranks"] = {
            "world_size": int(gathered.shape[0]),
            "metrics": per_metric,
            # With manual optimization a checkpoint can fall inside an optimizer step (for example at the end of an
            # epoch, when the user's accumulation goes on into the next one): the resumed run continues that tick.
            "tick_open": self._tick_open,
            "stepped": self._stepped,
            "tick_decayed": {name: bool(m._tick_decayed) for name, m in named},
        }

    def _restore_ranks(self, saved: dict[str, Any], trainer: Any) -> None:
        world = dist.get_world_size() if _distributed_ready() else 1
        rank = dist.get_rank() if _distributed_ready() else 0
        for name, m in self._named_all():
            rows = saved["metrics"].get(name)
            if rows is None:
                continue
            if int(saved["world_size"]) == world:
                m._load_packed(rows[rank])
            else:
                pooled = rows.sum(dim=0)
                pooled[m._ticks_index()] = rows[0, m._ticks_index()]
                m._load_packed(pooled if rank == 0 else _zero_but_ticks(pooled, m._ticks_index()))
        if saved.get("tick_open", False):
            for name, m in self._named_all():
                if not m.in_tick:
                    m.begin_tick()
                m._tick_decayed = bool(saved["tick_decayed"].get(name, False))
            self._tick_open = True
            self._stepped = bool(saved.get("stepped", False))

    # ------------------------------------------------------------------ helpers
    def _named_all(self) -> list[tuple[str, DecayedSumMetric]]:
        return [*self._driven.items(), *((f"keys/{k}", m) for k, m in self._own.items())]

    def _restore_snapshot(self) -> None:
        if self._snapshot is None:
            return
        for name, m in self._named_all():
            saved = self._snapshot.get(name)
            if saved is None:
                continue
            states, extra, tick_decayed = saved
            for attr, value in states.items():
                setattr(m, attr, value.clone() if isinstance(value, Tensor) else value)
            m.set_extra_state(extra)
            m._tick_decayed = tick_decayed and m.in_tick  # an open tick must not decay a second time
            m._computed = None

    def _sync_into_forward_cache(self) -> None:
        """Sync every EMA metric with one collective; put the values where Lightning will read them."""
        metrics = self._all()
        for m, value in zip(metrics, synced_values(metrics), strict=True):
            cache = m._forward_cache
            if isinstance(cache, Tensor) and cache.shape == value.shape and cache.dtype == value.dtype:
                # Lightning holds this very tensor since `self.log(name, metric)`: update it in place.
                cache.copy_(value)
            else:
                m.__dict__["_forward_cache"] = value

    def _update_own(self, trainer: Any, outputs: Any, batch: Any, automatic: bool) -> None:
        if not isinstance(outputs, Mapping):
            outputs = {"loss": outputs}
        weight = self._batch_weight(batch)
        for key, m in self._own.items():
            if key not in outputs:
                raise KeyError(
                    f"EMACallback: key {key!r} of argument `keys` is not in the training_step output; available:"
                    f" {sorted(outputs)}"
                )
            value = outputs[key]
            if automatic and key == "loss" and isinstance(value, Tensor):
                value = value * trainer.accumulate_grad_batches  # Lightning divided it for the backward pass
            m(value, weight=weight)  # forward: its result is what Lightning logs, synced in place on logged steps

    def _batch_weight(self, batch: Any) -> float:
        if not self.weight_by_batch_size:
            return 1.0
        extract: Callable[[Any], int] = self._pl.utilities.data.extract_batch_size
        try:
            return float(extract(batch))
        except Exception as err:
            raise ValueError(
                "EMACallback could not infer the batch size to weight the zero-code metrics; pass"
                " weight_by_batch_size=False"
            ) from err

    def _log_own(self, pl_module: Any) -> None:
        # Logged as Metric objects: Lightning then reads their forward result when it logs (a logged tensor would
        # be copied at `log` time, before the sync).
        for key, m in self._own.items():
            pl_module.log(
                self.keys[key],
                m,
                on_step=True,
                on_epoch=False,
                prog_bar=self.prog_bar,
                metric_attribute=f"EMACallback.keys.{key}",
            )


def _lightning_logs_now(trainer: Any, automatic: bool) -> bool:
    """The predicate of Lightning's ``update_train_step_metrics``: will this batch's step metrics be logged?"""
    if automatic and trainer.fit_loop._should_accumulate():
        return False
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)


def _zero_but_ticks(row: Tensor, ticks_index: int) -> Tensor:
    out = torch.zeros_like(row)
    out[ticks_index] = row[ticks_index]
    return out


def _names(arg: str, names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"Expected argument `{arg}` to be a sequence of strings, but got {names!r}")
    return list(names)
