"""Run-time bookkeeping of patched calls: the counted hand-back of a call to the original
(dispatch_stats()['fallback']) and which implementation served a call that has several."""

from __future__ import annotations

from collections import Counter


def handback(op: str, backend, reason: str) -> None:
    """Count a replacement handing its call back to the original (dispatch_stats()['fallback']).
    Skipped while torch.compile traces: the counter is Python bookkeeping that would break the graph."""
    if torch_compiling():
        return
    from ..ops import record_fallback

    record_fallback(op, backend.name, reason)


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
