"""Range checks of numeric config fields, written where each config dataclass is typed, so a
value that cannot work (a negative learning rate, ``nan``, zero checkpoints kept) is one clear
line before any work rather than a wrong run.

    ranges.check("optim", self, learning_rate="(0, inf)", b1="[0, 1)", warmup_steps="[0, inf)")
"""

from __future__ import annotations

import math


def _parse(interval: str) -> tuple[float, float, bool, bool]:
    lo_open, hi_open = interval[0] == "(", interval[-1] == ")"
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    return lo, hi, lo_open, hi_open


def _describe(interval: str) -> str:
    lo, hi, lo_open, hi_open = _parse(interval)
    show = lambda x: repr(int(x)) if float(x).is_integer() else repr(x)  # noqa: E731
    if math.isinf(hi):
        return f"{'>' if lo_open else '>='} {show(lo)}"
    return f"in {interval}"


def check(where: str, obj, **intervals: str) -> None:
    """Raises ValueError naming ``<where>.<field>`` (``<field>`` when ``where`` is "") for the first field of ``obj`` outside its
    interval (``"[lo, hi)"`` notation, ``inf`` allowed) or not a finite number."""
    for name, interval in intervals.items():
        value = getattr(obj, name)
        field = f"{where}.{name}" if where else name
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{field}={value!r} must be a number.")
        lo, hi, lo_open, hi_open = _parse(interval)
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            raise ValueError(f"{field}={value!r} must be {_describe(interval)}.")
