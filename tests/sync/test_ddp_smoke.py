from __future__ import annotations

import pytest
import torch

from ema_metrics import EMAMetric
from tests.ddp_utils import run_ddp


def _worker(rank: int, world_size: int) -> float:
    m = EMAMetric(alpha=0.5)
    m.update(torch.tensor(float(rank)))
    return float(m.compute())


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_run_ddp_pools_ranks(start_method: str) -> None:
    # two ranks observe 0 and 1 with equal weight: the pooled average is 0.5 on every rank, whether the workers are
    # forked (the default, fast) or spawned as fresh interpreters (the worker and its metric travel by pickle)
    assert run_ddp(_worker, 2, start_method=start_method) == [0.5, 0.5]
