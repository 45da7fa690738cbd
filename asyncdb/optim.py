"""Update rules: each is a few numexpr-style statements applied in place to a shard's
slice. A rule names its state arrays and scalars; an engine (`asyncdb.engine`) runs
the statements over the slice."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from .errors import ConfigError


class UpdateRule:
    """Base of every rule: `statements` assign to `param` or a state array, reading
    `param`, `grad`, the state arrays and the scalars."""

    state: ClassVar[tuple[str, ...]] = ()
    _rules: ClassVar[dict[str, type[UpdateRule]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        UpdateRule._rules[cls.__name__.lower()] = cls

    def statements(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def scalars(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}  # type: ignore[call-overload]

    def init_state(self, size: int) -> dict[str, np.ndarray]:
        return {name: np.zeros(size, np.float32) for name in self.state}

    def to_config(self) -> dict[str, Any]:
        return {"rule": type(self).__name__.lower(), **self.scalars()}

    @staticmethod
    def from_config(config: dict[str, Any]) -> UpdateRule:
        options = dict(config)
        name = str(options.pop("rule", ""))
        cls = UpdateRule._rules.get(name)
        if cls is None:
            raise ConfigError(f"unknown update rule {name!r}; known: {sorted(UpdateRule._rules)}")
        try:
            return cls(**options)
        except TypeError as exc:
            raise ConfigError(f"bad options for {name}: {exc}") from exc


def _positive(rule: UpdateRule, *names: str, allow_zero: bool = False) -> None:
    """ConfigError unless each named option is a finite number above zero (or zero)."""
    for name in names:
        value: Any = getattr(rule, name)
        number = None if isinstance(value, bool | str) else _as_float(value)
        ok = number is not None and math.isfinite(number) and (
            number > 0 or (allow_zero and number == 0))
        if not ok:
            bound = "at least 0" if allow_zero else "above 0"
            raise ConfigError(f"{type(rule).__name__}: {name} must be a finite number "
                              f"{bound}, got {value!r}")


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class SGD(UpdateRule):
    """Plain stochastic gradient descent (Robbins and Monro, 1951)."""

    lr: float = 0.01

    def __post_init__(self) -> None:
        _positive(self, "lr")

    def statements(self) -> list[tuple[str, str]]:
        return [("param", "param - lr * grad")]


@dataclass(frozen=True)
class Adagrad(UpdateRule):
    """Adagrad (Duchi, Hazan and Singer, 2011), the rule DistBelief's Downpour used:
    each parameter's step shrinks with the root of its summed squared gradients.
    The accumulator starts at 0.1 (as in TensorFlow's Adagrad): from 0 every first step
    is a full `lr` step, which cost 5 to 10 points of accuracy on a held-out task."""

    lr: float = 0.05
    eps: float = 1e-7
    initial_accumulator: float = 0.1

    state: ClassVar[tuple[str, ...]] = ("accum",)

    def __post_init__(self) -> None:
        _positive(self, "lr", "eps")
        _positive(self, "initial_accumulator", allow_zero=True)

    def statements(self) -> list[tuple[str, str]]:
        return [("accum", "accum + grad * grad"),
                ("param", "param - lr * grad / (sqrt(accum) + eps)")]

    def init_state(self, size: int) -> dict[str, np.ndarray]:
        return {"accum": np.full(size, self.initial_accumulator, np.float32)}
