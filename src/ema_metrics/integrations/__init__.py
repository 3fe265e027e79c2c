"""One subpackage per framework: its callback, its checkpoint logic and the framework privates it relies on.

Every private of a framework that its callback uses sits in that subpackage's ``internals`` module. Import the
callbacks from their public faces: :mod:`ema_metrics.lightning`, :mod:`ema_metrics.pytorch_lightning` and
:mod:`ema_metrics.transformers`.
"""
