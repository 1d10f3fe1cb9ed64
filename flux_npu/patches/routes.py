"""Run-time bookkeeping of patched calls: the counted hand-back of a call to the original
(dispatch_stats()['fallback']), which implementation served a call that has several, and per
report row how many calls its replacement served and how many it handed back (with the reasons)."""

from __future__ import annotations

import threading
from collections import Counter


class RowStats:
    """Calls of one installed replacement: `calls` in all, `handed_back` those in which it (not a
    replacement it called) handed at least one op back, and the hand-back reasons counted."""

    __slots__ = ("calls", "handed_back", "reasons")

    def __init__(self):
        self.calls = 0
        self.handed_back = 0
        self.reasons: Counter[str] = Counter()

    @property
    def served(self) -> int:
        return self.calls - self.handed_back

    def top_reason(self) -> str | None:
        return self.reasons.most_common(1)[0][0] if self.reasons else None


_ACTIVE = threading.local()  # .stack: [RowStats, handed back?] per replacement call under way


def run_counted(stats: RowStats, fn, args, kwargs):
    """fn(*args, **kwargs), counted on `stats`; hand-backs during it are charged to the innermost
    counted call. Not counted while torch.compile traces (Python bookkeeping breaks the graph)."""
    if torch_compiling():
        return fn(*args, **kwargs)
    stack = _ACTIVE.__dict__.setdefault("stack", [])
    frame = [stats, False]
    stack.append(frame)
    try:
        return fn(*args, **kwargs)
    finally:
        stack.pop()
        stats.calls += 1
        if frame[1]:
            stats.handed_back += 1


def handback(op: str, backend, reason: str) -> None:
    """Count a replacement handing its call back to the original (dispatch_stats()['fallback'], and
    the report row of the replacement running now). Skipped while torch.compile traces: the
    counter is Python bookkeeping that would break the graph."""
    if torch_compiling():
        return
    from ..ops import record_fallback

    record_fallback(op, backend.name, reason)
    stack = getattr(_ACTIVE, "stack", None)
    if stack:
        frame = stack[-1]
        frame[1] = True
        frame[0].reasons[f"{op}: {reason}"] += 1


_ROUTES: Counter[tuple] = Counter()  # (what, route) -> calls: which implementation a patched call used


def note_route(what: str, route: str) -> None:
    """Count which implementation served a patched call that has several (shown by report_table)."""
    if not torch_compiling():
        _ROUTES[(what, route)] += 1


def routes() -> dict[tuple, int]:
    return dict(_ROUTES)


def reset_routes() -> None:
    _ROUTES.clear()


def torch_compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()
