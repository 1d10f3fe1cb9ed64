"""Plain-text tables for reports and CLI output."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def format_table(headers: Sequence[str], rows: Iterable[Sequence], max_width: int = 100) -> str:
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    cols = len(headers)
    widths = [len(h) for h in headers]
    for r in rows:
        for i in range(cols):
            widths[i] = min(max(widths[i], len(r[i]) if i < len(r) else 0), max_width)

    def line(cells):
        out = []
        for i in range(cols):
            c = cells[i] if i < len(cells) else ""
            out.append(c.ljust(widths[i]) if i < cols - 1 else c)
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), sep] + [line(r) for r in rows])
