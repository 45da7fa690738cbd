from __future__ import annotations

import pytest

from asyncdb.bench.downpour import Settings
from asyncdb.bench.sizes import mlp_sizes, run_hogwild
from asyncdb.data import SharedArrays
from asyncdb.datasets import teacher


@pytest.mark.slow
def test_two_hogwild_processes_train_one_shared_vector():
    s = Settings(examples=6400, sizes=mlp_sizes(32), batch_size=64)
    data = teacher(s.examples, s.features, s.sizes[-1], seed=s.seed)
    arrays = {"x": data.x_train, "y": data.y_train, "x_test": data.x_test,
              "y_test": data.y_test}
    with SharedArrays(arrays) as shared:
        untrained = run_hogwild(shared.spec, Settings(**{**s.__dict__, "baseline_lr": 0.0}))
        trained = run_hogwild(shared.spec, s)
    assert trained["examples_per_s"] > 0
    # lr 0 leaves the initial parameters: the workers' updates are what teaches it
    assert trained["test_accuracy"] > untrained["test_accuracy"] + 0.2
