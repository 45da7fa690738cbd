from __future__ import annotations

import pytest

from asyncdb.bench import sizes
from asyncdb.bench.downpour import Settings
from asyncdb.bench.sizes import adagrad_lr, mlp_sizes, run_hogwild
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


def test_adagrad_rate_shrinks_with_width_above_the_tuned_one():
    base = Settings(adagrad_lr=0.004)
    assert adagrad_lr(500, base, tuned_width=1000) == 0.004
    assert adagrad_lr(1000, base, tuned_width=1000) == 0.004
    assert adagrad_lr(4000, base, tuned_width=1000) == pytest.approx(0.001)


@pytest.mark.slow
async def test_a_size_that_diverges_is_recorded_and_the_next_size_still_runs():
    base = Settings(batch_size=64, adagrad_lr=1e39)  # beyond float32: every update overflows
    result = await sizes.run(base, sizes=((32, 64), (40, 64)), rounds=1)
    assert [row["hidden"] for row in result["sizes"]] == [32, 40]
    for row in result["sizes"]:
        assert row["diverged"] is True
        assert "diverged" in row["diverged_reason"]
        assert "scaling" not in row and row["baseline_examples_per_s"] > 0
    assert result["targets_met"] == {"scaling_at_least_1_6": False,
                                     "downpour_at_least_hogwild": False}
    assert result["hogwild_examples_per_s"] > 0  # the smallest size's Hogwild! still ran
