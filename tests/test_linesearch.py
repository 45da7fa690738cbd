from __future__ import annotations

import math

import pytest

from asyncdb.linesearch import StrongWolfe


def line(f, df):
    calls = []

    async def phi(a):
        calls.append(("f", a))
        return f(a)

    async def dphi(a):
        assert calls[-1] == ("f", a)  # the slope is asked right after the loss, same point
        calls.append(("g", a))
        return df(a)

    return phi, dphi, calls


def check_wolfe(step, f, df, c1=1e-4, c2=0.9):
    assert step.ok, step.reason
    assert step.f <= f(0) + c1 * step.alpha * df(0)
    assert abs(df(step.alpha)) <= c2 * abs(df(0))
    assert step.f == f(step.alpha) and step.slope == df(step.alpha)


@pytest.mark.parametrize(("alpha", "c2"), [(1.0, 0.9), (100.0, 0.9), (1e-3, 0.9), (1.0, 0.1)])
async def test_quadratic_steps_satisfy_strong_wolfe(alpha, c2):
    f = lambda a: (a - 3.0) ** 2  # noqa: E731
    df = lambda a: 2 * (a - 3.0)  # noqa: E731
    phi, dphi, calls = line(f, df)
    step = await StrongWolfe(phi, dphi, c2=c2).search(f(0), df(0), alpha)
    check_wolfe(step, f, df, c2=c2)
    assert step.losses == sum(1 for c in calls if c[0] == "f")
    assert step.gradients == sum(1 for c in calls if c[0] == "g") <= step.losses


async def test_a_nonconvex_line_and_a_tight_curvature_condition():
    f = lambda a: -math.sin(a) + 0.05 * a * a  # noqa: E731
    df = lambda a: -math.cos(a) + 0.1 * a  # noqa: E731
    phi, dphi, _ = line(f, df)
    step = await StrongWolfe(phi, dphi, c2=0.1).search(f(0), df(0), 5.0)
    check_wolfe(step, f, df, c2=0.1)


async def test_failures_are_reported():
    phi, dphi, _ = line(lambda a: a, lambda a: 1.0)
    step = await StrongWolfe(phi, dphi).search(0.0, 1.0)
    assert not step.ok and "descent" in step.reason
    # a slope that lies: the loss only rises, so no step is ever accepted
    phi, dphi, _ = line(lambda a: a * a + 1e-3 if a > 0 else 0.0, lambda a: -1.0)
    step = await StrongWolfe(phi, dphi, max_evaluations=8).search(0.0, -1.0)
    assert not step.ok and step.losses <= 8 and step.alpha == 0.0
    nan_phi, nan_dphi, _ = line(lambda a: math.nan if a > 0.5 else (a - 0.4) ** 2,
                                lambda a: 2 * (a - 0.4))
    step = await StrongWolfe(nan_phi, nan_dphi).search(0.16, -0.8, 1.0)
    assert step.ok and step.alpha <= 0.5
