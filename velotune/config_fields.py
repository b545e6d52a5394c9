"""The pieces a config field is declared with: `setting(default, help, bound)` and the numeric ranges (`Bound`) that
sit beside each field, checked by the schema's validation (config.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Bound:
    """A numeric range declared beside a field. Values must also be finite; `count`: a list of that many numbers."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False                             # True: `low` itself is out of range
    high_open: bool = False
    count: int | None = None

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            text = (f"in {'(' if self.low_open else '['}{_number_text(self.low)}, "
                    f"{_number_text(self.high)}{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_number_text(self.low)}"
        else:
            text = f"{'<' if self.high_open else '<='} {_number_text(self.high)}"
        return f"{_COUNT_WORDS.get(self.count, self.count)} numbers {text}" if self.count else text

    def problem(self, value) -> str | None:
        """Why `value` is out of range, or None when it fits."""
        if self.count is not None:
            fits = (isinstance(value, list) and len(value) == self.count
                    and all(is_number(v) and finite(v) and self._fits(v) for v in value))
            return None if fits else f"must be {self}"
        if not finite(value):
            return "must be finite"
        return None if self._fits(value) else f"must be {self}"

    def _fits(self, value) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below


_COUNT_WORDS = {2: "two", 3: "three"}
AT_LEAST_ONE = Bound(1)
POSITIVE = Bound(0, low_open=True)
NON_NEGATIVE = Bound(0)
FRACTION = Bound(0, 1, high_open=True)


def _number_text(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)  # ints are finite, however large


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def setting(default, help: str, bound: Bound | None = None, *, comma_list: bool = False):
    """A schema field: its default, a one-line help, an optional range, and (comma_list) whether a plain string
    "a,b" stands for the list [a, b]."""
    meta = {"help": help, "bound": bound, "comma_list": comma_list}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)
