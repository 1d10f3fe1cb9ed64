"""Plain-text tables for reports and CLI output: the one entry point every caller uses, rendered
by tabulate (issue 19: a kept library instead of a hand-written renderer)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def format_table(headers: Sequence[str], rows: Iterable[Sequence], max_width: int = 100) -> str:
    """`headers` over `rows`, left-aligned, a dashed rule under the header. None prints as an
    empty cell, short rows are padded and cells past the last header dropped. A cell longer than
    `max_width` wraps onto further lines of its column (nothing is cut), so one long reason does not
    push every other row's columns off screen."""
    from tabulate import tabulate

    cols = len(headers)
    cells = [["" if c is None else str(c) for c in list(r)[:cols]] for r in rows]
    cells = [r + [""] * (cols - len(r)) for r in cells]
    # disable_numparse: cells are already formatted text ("1.43x", "2e7", "0012"); tabulate must
    # not re-read them as numbers, realign them on a decimal point or drop their zeros.
    # Every column wraps at max_width only when some cell is longer (tabulate leaves shorter ones).
    wide = [max_width if any(len(r[i]) > max_width for r in cells) else None for i in range(cols)] if cells else None
    text = tabulate(cells, headers=list(headers), tablefmt="simple", disable_numparse=True, stralign="left",
                    maxcolwidths=wide)
    return "\n".join(line.rstrip() for line in text.splitlines())
