"""How numbers read in the closing summaries and the sweep's tables, the same everywhere.

* counts (steps, examples, units, rows) and rates of them: whole numbers with thousands
  separators, ``1,024`` and ``12,345 steps/s`` (:func:`count`);
* measured values (returns, losses, accuracies, their means): four significant digits, with
  no exponent between 1e-4 and 1,000 and every digit of the integer part above it, ``0.9123``,
  ``-12.35``, ``3,457``, ``1.234e-05`` (:func:`measured`); standard errors with two;
* durations: ``42.1s``, ``3m07s``, ``5h02m09s`` (:func:`duration`).

It imports nothing heavy: the sweep's driver uses it without torch.
"""

from __future__ import annotations

import math

__all__ = ["count", "duration", "measured"]


def count(n: float) -> str:
    """``n`` rounded to a whole number, with thousands separators: ``1,024``."""
    return f"{round(n):,}"


def measured(value: float, digits: int = 4) -> str:
    """``value`` to ``digits`` significant digits (``-`` for NaN): ``0.9123``, ``-12.35``,
    ``1.234e-05``; from ``10 ** (digits - 1)`` on, whole, with thousands separators
    (``3,457``, not ``3.457e+03``)."""
    if math.isnan(value):
        return "-"
    if math.isfinite(value) and abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def duration(seconds: float) -> str:
    """``42.1s``, ``3m07s`` or ``5h02m09s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
