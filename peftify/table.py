"""Plain-text tables for plans, captures and reports."""

from __future__ import annotations


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    """Left-aligned columns, numbers right-aligned, one header rule."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(isinstance(r[i], (int, float)) for r in rows) and rows for i in range(len(header))]

    def line(r):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.3g}"
    if isinstance(c, int) and not isinstance(c, bool):
        return human(c)
    return str(c)


def human(n: int) -> str:
    """1234567 → '1.23M'; the unit is the one its 3 digits round into (999,698 → '1M')."""
    if abs(n) < 1000:
        return str(n)
    units = (("K", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12))
    for unit, scale in units:
        text = f"{n / scale:.3g}"
        if abs(float(text)) < 1000 or unit == units[-1][0]:
            return text + unit
