"""The one home of patch routes. Run-time bookkeeping of patched calls: the counted hand-back of a
call to the original (dispatch_stats()['fallback']), which implementation served a call that has
several, and per report row how many calls its replacement served and how many it handed back
(with the reasons). And the rules every codebase patch shares: the guard "fused op, or the original
plus a counted hand-back" (`fused_or_stock`, and `rms_module` for a QK-norm module), when a module
may be bypassed (`calls_plainly`: no hooks, so offloading and layerwise casting keep working), the
2-D key-padding mask rule (`key_padding_mask`) and the user's diffusers attention backend
(`user_attention_backend`)."""

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


def fused_or_stock(op: str, backend, why: str | None, fused, stock):
    """fused() when `why` is None; else count a hand-back of `op` with that reason and run stock()."""
    if why is None:
        return fused()
    handback(op, backend, why)
    return stock()


def calls_plainly(module) -> bool:
    """Whether calling `module` runs nothing but its class's forward: no forward / backward hooks of
    its own or global ones, no `forward` set on the instance (accelerate's offload hooks and
    diffusers' group offloading / layerwise casting set one). Only then may a replacement read its
    weights and skip its `__call__` (a hook that loads, casts or rescales would silently stop
    running otherwise)."""
    from torch.nn.modules import module as M

    return not (
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or "forward" in module.__dict__
        or M._global_forward_hooks or M._global_forward_pre_hooks or M._global_backward_hooks
        or M._global_backward_pre_hooks
    )


def plain_rms_norm(norm, x) -> bool:
    """A torch.nn.RMSNorm over x's last dim, with its weight on x's device, called plainly."""
    import torch

    return (
        type(norm) is torch.nn.RMSNorm
        and tuple(norm.normalized_shape) == (x.shape[-1],)
        and calls_plainly(norm)
        and (norm.weight is None or norm.weight.device == x.device)
    )


def rms_module(norm, x, backend, where: str, use: bool = True):
    """A QK-norm module applied to x: ops.rms_norm for a plain torch.nn.RMSNorm (eps None = torch's
    finfo eps), else the module itself, counted as a hand-back (`use` False: the module, uncounted,
    for a user who excluded rms_norm)."""
    import torch

    from .. import ops

    if not use:
        return norm(x)
    if plain_rms_norm(norm, x):  # called inline, not through fused_or_stock: the launch stays <= 5 frames away
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return ops.rms_norm(x, norm.weight, eps, backend=backend)
    handback("rms_norm", backend, (
        f"{where}: QK norm is not a torch.nn.RMSNorm over the head dim called plainly (hooks such as "
        "offloading or layerwise casting, an instance forward, or weights on another device)"))
    return norm(x)


def key_padding_mask(mask):
    """diffusers' rule for a 2-D attention mask: (B, Sk) key padding -> (B, 1, 1, Sk); others as given."""
    if mask is not None and mask.dim() == 2:
        return mask[:, None, None, :]
    return mask


def user_attention_backend(proc):
    """The diffusers attention backend the user chose for this processor (set_attention_backend,
    the `attention_backend` context manager or DIFFUSERS_ATTN_BACKEND), else None (the default
    native one, which ops.attention replaces)."""
    chosen = getattr(proc, "_attention_backend", None)
    if chosen is not None:
        return chosen
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    except Exception:  # an older diffusers without the registry: nothing to honour
        return None
    active = _AttentionBackendRegistry._active_backend
    return None if active == AttentionBackendName.NATIVE else active


def backend_name(chosen) -> str:
    return "native" if chosen is None else str(getattr(chosen, "value", chosen))
