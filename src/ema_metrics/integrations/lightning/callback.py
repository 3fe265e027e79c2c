"""The Lightning callback, shared by the ``lightning.pytorch`` and ``pytorch_lightning`` flavours.

Nothing here imports Lightning: :mod:`ema_metrics.lightning` and :mod:`ema_metrics.pytorch_lightning` subclass
:class:`EMAMetricsCallbackBase` together with their package's ``Callback`` and name that package in the class
attribute ``_pl``. The callback owns what it delegates, as Lightning's Trainer owns its connectors: its validated
arguments (:class:`~ema_metrics.integrations.lightning.options.CallbackOptions`) and, during a fit, the zero-code
observer (:class:`~ema_metrics.integrations.lightning.zero_code.ZeroCode`). Checkpoint entries, per-rank rows and
epoch snapshots are :mod:`ema_metrics.integrations.lightning.checkpoint`; every Lightning private used is in
:mod:`ema_metrics.integrations.lightning.internals`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, ClassVar

from ema_metrics._base import DecayedSumMetric
from ema_metrics._functions import synced_values, synced_values_by_rank
from ema_metrics.ema import EMAMetric
from ema_metrics.integrations.lightning import checkpoint as ckpt
from ema_metrics.integrations.lightning import internals
from ema_metrics.integrations.lightning.options import CallbackOptions, check_flavour, check_strategy
from ema_metrics.integrations.lightning.zero_code import ZeroCode, wrap_training_step

__all__ = ["EMAMetricsCallbackBase"]


class EMAMetricsCallbackBase:
    """Every value the Trainer acts on is the exact EMA of all ranks, ticking once per optimizer step.

    The callback drives every EMA metric (:class:`~ema_metrics.EMAMetric`, :class:`~ema_metrics.EMAWrapper`) of the
    ``LightningModule``, nested ones and ones created in ``setup()`` or ``configure_model()`` included:

    1. **One tick per optimizer step.** All the micro-batch updates of one optimizer step, on every rank, pool into
       one tick, so the smoothing is measured in optimizer steps whatever ``accumulate_grad_batches`` and the world
       size are. A tick closes at the end of each training batch in which an optimizer stepped (so with manual
       optimization a GAN step with two optimizers is one tick, and hand-written accumulation over ``k`` batches is
       one tick per ``k`` batches).
    2. **Pooled before anyone reads it.** At the end of every optimizer step (``sync="step"``, the default) the
       callback syncs all the EMA metrics together with **one** collective and writes the pooled value where
       Lightning reads a logged metric. It is the first callback to run ``on_train_batch_end`` (it moves itself to
       the front of ``trainer.callbacks``), so ``ModelCheckpoint``, ``EarlyStopping``, ``ReduceLROnPlateau`` with a
       ``monitor``, the progress bar, ``callback_metrics``, the loggers, other callbacks and the module's own
       ``on_train_batch_end`` all see the same exact number on every rank. No collective runs on accumulating
       micro-batches. ``sync="logged"`` syncs only on the steps Lightning logs (``log_every_n_steps``): fewest
       collectives, and then everything that reads the metric on the other steps (monitors, the progress bar) sees
       each rank's own EMA, which differs between ranks. Override :meth:`should_sync` for another policy. Log the
       metric object, ``self.log(name, self.train_loss)``: a logged tensor is copied by Lightning at ``log`` time.
    3. **Continuous across epochs.** Lightning resets logged metrics after every training epoch; the callback puts
       the EMA back at the next epoch start. ``reset_on_epoch=True`` restarts every EMA at each epoch start instead.
    4. **Checkpoints and after fit.** ``on_save_checkpoint`` stores every rank's state in the callback's entry (exact
       per-rank resume with ``ckpt_path=`` on the same number of processes; on another number, rank 0 takes the
       pooled state), and writes the pooled state into the module's ``state_dict``, so that
       ``load_from_checkpoint`` on one process computes the pooled value and a new fit from it, on any number of
       processes, continues the pooled curve. After ``fit`` every rank's metric holds the pooled state, so
       ``compute()`` gives the pooled value everywhere, also in the main process of ``ddp_spawn``.
    5. **Zero-code mode.** ``keys={"loss": "train_loss_ema"}`` smooths entries of the ``training_step`` output,
       exactly as returned (before Lightning divides the loss by ``accumulate_grad_batches``), and logs them under
       the given names. Each micro-batch is weighted by its batch size, or by the output entry ``weight_key`` (for
       example a token count). A batch whose ``training_step`` returns ``None`` is no observation.

    Several instances may share a Trainer if they drive disjoint metrics (for example one for the module's metrics
    and one with ``metrics=[]`` and ``keys=...``); they still sync with one collective per step.

    Without the callback, an :class:`~ema_metrics.EMAMetric` still logs a correct value (synced at ``compute``, or
    in ``forward`` with ``sync_on_forward=True``), but it ticks once per *micro-batch* and restarts each epoch; a
    checkpoint then holds rank 0's own state, which every rank loads on resume (so each rank starts from rank 0's
    partial sums). A checkpoint written *with* the callback and resumed without it continues the pooled curve.

    Args:
        metrics: attribute paths (as in ``named_modules``, e.g. ``"train_loss"`` or ``"head.acc"``) of the EMA
            metrics to drive; default: every EMA metric of the module; ``[]`` drives none (zero-code only). Leave
            metrics updated outside training (for example in ``validation_step``) out with ``exclude``.
        exclude: attribute paths to leave alone.
        keys: zero-code mode: ``{output_key: log_name}`` for entries of the ``training_step`` output to smooth.
        weight_key: zero-code mode: an output entry holding each micro-batch's weight (number or tensor).
        alpha: smoothing of the zero-code metrics (exactly one of ``alpha``, ``half_life``, ``span``, ``com``
            when ``keys`` is given).
        half_life: see ``alpha``.
        span: see ``alpha``.
        com: see ``alpha``.
        adjust: ``adjust`` of the zero-code metrics.
        weight_by_batch_size: without ``weight_key``, weight each zero-code micro-batch by its batch size
            (Lightning's ``extract_batch_size``); otherwise every micro-batch has weight 1.
        reset_on_epoch: restart every EMA at the start of each training epoch.
        prog_bar: show the zero-code values in the progress bar.
        sync: ``"step"`` (pool every optimizer step) or ``"logged"`` (only the steps Lightning logs).
        rank_spread: also log ``<name>/rank_min`` and ``<name>/rank_max``, the smallest and largest of the ranks'
            own EMAs, at every sync (still one collective: with a spread the sync gathers every rank's sums instead
            of summing them, so its bytes grow with the number of ranks). ``<name>`` is
            the metric's attribute path, or the log name of a zero-code metric; only scalar metrics whose states
            travel in the sync's first collective (every ``EMAMetric``) have a spread.

    Raises:
        TypeError: If an argument has the wrong type (names must be strings, flags must be ``bool``). When ``fit``
            starts: if the Trainer comes from the other Lightning package.
        ValueError: If an argument has a wrong value, ``keys`` is given without a parametrisation or the reverse.
            When ``fit`` starts: if the strategy is not supported, ``metrics`` names something that is not an EMA
            metric, there is nothing to smooth, or two instances drive the same metric or log the same name.
        RuntimeError: When ``fit`` starts, if the installed Lightning lacks an internal the callback uses.

    """

    #: The Lightning package of the flavour (``lightning.pytorch`` or ``pytorch_lightning``), set by each subclass.
    _pl: ClassVar[ModuleType]

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
        self._options = CallbackOptions(
            metrics=metrics,
            exclude=exclude,
            keys=keys,
            weight_key=weight_key,
            alpha=alpha,
            half_life=half_life,
            span=span,
            com=com,
            adjust=adjust,
            weight_by_batch_size=weight_by_batch_size,
            reset_on_epoch=reset_on_epoch,
            prog_bar=prog_bar,
            sync=sync,
            rank_spread=rank_spread,
        )
        self._reset_fit_state()

    # ------------------------------------------------------------------ options (read-only)
    @property
    def metric_names(self) -> list[str] | None:
        """The attribute paths of the metrics to drive (``None``: every EMA metric of the module)."""
        return self._options.metric_names

    @property
    def exclude(self) -> list[str]:
        """The attribute paths left alone."""
        return self._options.exclude

    @property
    def keys(self) -> dict[str, str]:
        """Zero-code mode: ``{output_key: log_name}``."""
        return self._options.keys

    @property
    def weight_key(self) -> str | None:
        """Zero-code mode: the output entry holding each micro-batch's weight."""
        return self._options.weight_key

    @property
    def weight_by_batch_size(self) -> bool:
        """Zero-code mode without ``weight_key``: weight each micro-batch by its batch size."""
        return self._options.weight_by_batch_size

    @property
    def reset_on_epoch(self) -> bool:
        """Whether every EMA restarts at the start of each training epoch."""
        return self._options.reset_on_epoch

    @property
    def prog_bar(self) -> bool:
        """Whether the zero-code values show in the progress bar."""
        return self._options.prog_bar

    @property
    def sync(self) -> str:
        """The sync policy: ``"step"`` or ``"logged"``."""
        return self._options.sync

    @property
    def rank_spread(self) -> bool:
        """Whether ``<name>/rank_min`` and ``<name>/rank_max`` are logged at every sync."""
        return self._options.rank_spread

    @property
    def state_key(self) -> str:
        """Key of this callback's entry in a checkpoint, so several instances can coexist."""
        return self._options.state_key

    def state_dict(self) -> dict[str, Any]:
        """Options and format; the per-rank metric states are added by ``on_save_checkpoint``."""
        return self._options.state_dict()

    # ------------------------------------------------------------------ sync policy
    def should_sync(self, trainer: Any, step_done: bool) -> bool:
        """Whether to pool every rank's EMA at the end of this training batch (the sync policy).

        A batch that Lightning logs is always synced before it is logged, whatever this returns.

        Args:
            trainer: the Trainer.
            step_done: whether an optimizer stepped in this batch (a tick just closed).

        """
        return step_done and self.sync == "step"

    # ------------------------------------------------------------------ fit state
    def _reset_fit_state(self) -> None:
        self._driven: dict[str, DecayedSumMetric] = {}
        self._own: dict[str, EMAMetric] = {}
        self._group: list[EMAMetricsCallbackBase] = [self]
        self._tick_open = False
        self._stepped = False
        self._step_done = False
        self._synced = False
        self._snapshot: dict[str, tuple[Any, bool]] | None = None  # taken at an epoch end, until the next start
        self._pending_restore: Any = None
        self._undo: list[Any] = []

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check the Trainer, and move this callback to the front of ``trainer.callbacks``."""
        if stage != "fit":
            return
        check_flavour(self, trainer, self._pl)
        check_strategy(trainer, self._pl)
        internals.check(trainer, self._pl)
        self._reset_fit_state()
        # First at every hook, so that other callbacks (ModelCheckpoint, EarlyStopping, ...) read pooled values. The
        # list is being iterated: moving this entry to the front leaves the entries after it where they were.
        callbacks = trainer.callbacks
        callbacks.remove(self)
        callbacks.insert(0, self)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Find the module's EMA metrics (also those created in ``setup`` or ``configure_model``)."""
        found = {name: m for name, m in pl_module.named_modules() if isinstance(m, DecayedSumMetric)}
        if self.metric_names is not None:
            missing = [n for n in self.metric_names if n not in found]
            if missing:
                raise ValueError(
                    f"EMAMetricsCallback: argument `metrics` names {missing}, which are not EMA metrics of"
                    f" {type(pl_module).__name__}; found {sorted(found)}"
                )
            found = {n: found[n] for n in self.metric_names}
        self._driven = {n: m for n, m in found.items() if n not in self.exclude}
        self._own = {key: self._options.new_own_metric().to(pl_module.device) for key in self.keys}
        if not self._driven and not self._own:
            raise ValueError(
                f"EMAMetricsCallback found no EMAMetric or EMAWrapper in {type(pl_module).__name__} (after"
                " `metrics`/`exclude`) and has no `keys` to smooth. Add an EMA metric to the module, or pass e.g."
                " keys={'loss': 'train_loss_ema'}, half_life=50."
            )
        earlier = [cb for cb in trainer.callbacks if isinstance(cb, EMAMetricsCallbackBase) and cb._driven_or_own]
        self._check_disjoint([cb for cb in earlier if cb is not self])
        if self._own:
            observer = ZeroCode(self._own, self._options, self._pl)
            self._undo.append(wrap_training_step(pl_module, observer.observe))

    @property
    def _driven_or_own(self) -> bool:
        return bool(self.__dict__.get("_driven") or self.__dict__.get("_own"))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Apply a checkpoint's per-rank states; the first instance drives the ticks and syncs of all instances."""
        self._group = [cb for cb in trainer.callbacks if isinstance(cb, EMAMetricsCallbackBase) and cb._driven_or_own]
        if self._pending_restore is not None:
            tick = ckpt.restore(self._pending_restore, self._named_all(), self.state_key)
            self._pending_restore = None
            if tick is not None:
                self._tick_open, self._stepped = True, tick
        if self._group[0] is self:
            self._undo.append(internals.run_before_step_logging(trainer, lambda: self._late_sync(trainer)))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Remove what :meth:`on_fit_start` and :meth:`on_train_start` installed."""
        for undo in reversed(self.__dict__.get("_undo", [])):
            undo()
        self._undo = []

    # ------------------------------------------------------------------ training hooks
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Undo Lightning's end-of-epoch ``reset()`` (or restart, with ``reset_on_epoch=True``)."""
        if self.reset_on_epoch:
            self._snapshot = None
            for m in self._all():
                m.reset()
        else:
            self._restore_snapshot()
            self._snapshot = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Open a tick at the first micro-batch of an optimizer step (first instance, for all instances)."""
        if self._group[0] is not self:
            return
        self._synced = False
        metrics = self._group_metrics()
        if not self._tick_open:
            for m in metrics:
                m.begin_tick()
            self._tick_open, self._stepped = True, False
        for m in metrics:
            if not internals.has_logged_value(m):  # an update()-fed metric, or one just reset: give Lightning a tensor
                internals.write_logged_value(m, ckpt.local_value(m))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Remember that an optimizer stepped during this batch."""
        self._stepped = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Close the tick after an optimizer step and pool the values before any other hook reads them."""
        if self._group[0] is not self:
            return
        step_done = self._step_done = self._stepped
        if step_done and self._tick_open:
            for m in self._group_metrics():
                m.end_tick()
            self._tick_open = self._stepped = False
        wanted = any(cb.should_sync(trainer, step_done) for cb in self._group)
        if wanted or internals.logs_this_batch(trainer, step_done, pl_module.automatic_optimization):
            self._sync(pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Keep a copy of the EMA states: Lightning resets logged metrics right after this hook."""
        self._snapshot = {name: ckpt.snapshot(m) for name, m in self._named_all()}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Leave every rank's metrics holding the pooled state (one collective for all instances)."""
        if self._group[0] is not self:
            return
        for cb in self._group:
            cb._restore_snapshot()
            cb._snapshot = None
        if self._tick_open:
            for m in self._group_metrics():
                m.end_tick()
            self._tick_open = False
        ckpt.pool_into_every_rank(self._group_metrics())

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Store every rank's state in this callback's entry, and the pooled state in the module's state dict."""
        self._restore_snapshot()  # between an epoch end and the next start Lightning may have reset the metrics
        leader = self._group[0]
        entry = checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, self.state_dict())
        ckpt.save(
            entry,
            checkpoint.get("state_dict"),
            self._named_all(),
            driven=set(self._driven),
            tick_open=leader._tick_open,
            stepped=leader._stepped,
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved per-rank states; they are applied to the metrics when training starts."""
        self._pending_restore = state_dict.get("ranks")

    # ------------------------------------------------------------------ helpers
    def _all(self) -> list[DecayedSumMetric]:
        return [*self._driven.values(), *self._own.values()]

    def _named_all(self) -> list[tuple[str, DecayedSumMetric]]:
        return [*self._driven.items(), *((f"keys/{k}", m) for k, m in self._own.items())]

    def _group_metrics(self) -> list[DecayedSumMetric]:
        return [m for cb in self._group for m in cb._all()]

    def _restore_snapshot(self) -> None:
        if self._snapshot is not None:
            for name, m in self._named_all():
                if name in self._snapshot:
                    ckpt.restore_snapshot(m, self._snapshot[name])

    def _sync(self, pl_module: Any = None) -> None:
        """Pool every EMA metric of every instance with one collective; put the values where Lightning reads them.

        With ``rank_spread`` (and a module to log with), the same collective gives each rank's own value.
        """
        metrics = self._group_metrics()
        if pl_module is not None and any(cb.rank_spread for cb in self._group):
            spreads = synced_values_by_rank(metrics)
            values = [s.pooled for s in spreads]
            by_metric = {id(m): s for m, s in zip(metrics, spreads, strict=True)}
            for cb in self._group:
                if cb.rank_spread:
                    cb._log_spread(pl_module, by_metric)
        else:
            values = synced_values(metrics)
        for m, value in zip(metrics, values, strict=True):
            internals.write_logged_value(m, value)
        self._synced = True

    def _log_spread(self, pl_module: Any, by_metric: dict[int, Any]) -> None:
        named = [*self._driven.items(), *((self.keys[k], m) for k, m in self._own.items())]
        for name, m in named:
            spread = by_metric[id(m)]
            if spread.pooled.numel() == 1:
                for suffix, value in (("rank_min", spread.min), ("rank_max", spread.max)):
                    pl_module.log(f"{name}/{suffix}", value.reshape(()), on_step=True, on_epoch=False)

    def _check_disjoint(self, others: Sequence[EMAMetricsCallbackBase]) -> None:
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

    def _late_sync(self, trainer: Any) -> None:
        """A later hook made Lightning log a batch the callback did not sync: sync now, before it is logged."""
        if not self._synced and internals.logs_this_batch(
            trainer, self._step_done, trainer.lightning_module.automatic_optimization
        ):
            self._sync()
