"""A line search satisfying the strong Wolfe conditions (Nocedal & Wright, Numerical
Optimization, 2nd ed., algorithms 3.5 and 3.6), on an objective that is costly to
evaluate: `phi(alpha)` is the loss alone, `dphi(alpha)` the directional derivative,
asked for only at points that already satisfy sufficient decrease, and always right
after `phi` at the same point (Sandblaster computes it with a gradient pass at the
trial point the loss pass just used).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Phi = Callable[[float], Awaitable[float]]


@dataclass
class Step:
    """The outcome: `ok` with the accepted step `alpha`, its loss `f` and slope `slope`;
    otherwise `reason` says why no step satisfied the conditions."""

    ok: bool
    alpha: float
    f: float
    slope: float
    losses: int
    gradients: int
    reason: str = ""


class StrongWolfe:
    """Find alpha with f(alpha) <= f0 + c1 alpha g0 and |g(alpha)| <= c2 |g0|."""

    def __init__(self, phi: Phi, dphi: Phi, c1: float = 1e-4, c2: float = 0.9,
                 max_evaluations: int = 20) -> None:
        self.phi, self.dphi = phi, dphi
        self.c1, self.c2 = c1, c2
        self.max_evaluations = max_evaluations
        self.losses = 0
        self.gradients = 0

    async def _f(self, alpha: float) -> float:
        self.losses += 1
        return await self.phi(alpha)

    async def _g(self, alpha: float) -> float:
        self.gradients += 1
        return await self.dphi(alpha)

    def _step(self, ok: bool, alpha: float, f: float, g: float, reason: str = "") -> Step:
        return Step(ok, alpha, f, g, self.losses, self.gradients, reason)

    async def search(self, f0: float, g0: float, alpha: float = 1.0) -> Step:
        if not g0 < 0:
            return self._step(False, 0.0, f0, g0, f"not a descent direction (slope {g0:.3g})")
        prev, f_prev, g_prev = 0.0, f0, g0
        while self.losses < self.max_evaluations:
            f = await self._f(alpha)
            if not math.isfinite(f) or f > f0 + self.c1 * alpha * g0 \
                    or (prev > 0 and f >= f_prev):
                return await self._zoom(f0, g0, prev, f_prev, g_prev, alpha, f, None)
            g = await self._g(alpha)
            if abs(g) <= -self.c2 * g0:
                return self._step(True, alpha, f, g)
            if g >= 0:
                return await self._zoom(f0, g0, alpha, f, g, prev, f_prev, g_prev)
            prev, f_prev, g_prev = alpha, f, g
            alpha *= 2.0  # still descending steeply: extrapolate
        return self._step(False, prev, f_prev, g_prev, "no step found within the evaluations")

    async def _zoom(self, f0: float, g0: float, lo: float, f_lo: float, g_lo: float,
                    hi: float, f_hi: float, g_hi: float | None) -> Step:
        """Shrink [lo, hi] (either order) around a point satisfying both conditions;
        lo is always the best point so far satisfying sufficient decrease."""
        while self.losses < self.max_evaluations:
            if abs(hi - lo) <= 1e-12 * max(1.0, abs(lo)):
                break
            alpha = _interpolate(lo, f_lo, g_lo, hi, f_hi, g_hi)
            f = await self._f(alpha)
            if not math.isfinite(f) or f > f0 + self.c1 * alpha * g0 or f >= f_lo:
                hi, f_hi, g_hi = alpha, f, None
                continue
            g = await self._g(alpha)
            if abs(g) <= -self.c2 * g0:
                return self._step(True, alpha, f, g)
            if g * (hi - lo) >= 0:
                hi, f_hi, g_hi = lo, f_lo, g_lo
            lo, f_lo, g_lo = alpha, f, g
        return self._step(False, lo, f_lo, g_lo, "interval shrank without a strong Wolfe step")


def _interpolate(lo: float, f_lo: float, g_lo: float, hi: float, f_hi: float,
                 g_hi: float | None) -> float:
    """Cubic (both slopes known) or quadratic minimiser in [lo, hi], kept away from
    the ends; bisection when the model has no interior minimum."""
    a, b = min(lo, hi), max(lo, hi)
    width = b - a
    guess = math.nan
    d = hi - lo
    if g_hi is not None and math.isfinite(f_hi):
        d1 = g_lo + g_hi - 3 * (f_lo - f_hi) / (lo - hi)
        radicand = d1 * d1 - g_lo * g_hi
        if radicand >= 0:
            d2 = math.copysign(math.sqrt(radicand), hi - lo)
            denominator = g_hi - g_lo + 2 * d2
            if denominator != 0:
                guess = hi - (hi - lo) * (g_hi + d2 - d1) / denominator
    elif math.isfinite(f_hi):
        curvature = f_hi - f_lo - g_lo * d
        if curvature > 0:
            guess = lo - g_lo * d * d / (2 * curvature)
    if not (math.isfinite(guess) and a + 0.1 * width <= guess <= b - 0.1 * width):
        guess = 0.5 * (lo + hi)
    return guess
