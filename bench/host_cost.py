"""Host cost of each patched op against the stock code it replaces, on tiny CPU tensors.

On tiny tensors the device work is negligible, so the time per call is what the Python and
dispatcher layers cost: the patched op must cost at most 1.3x the stock op (issue 9). The stock
side is the exact code the patches replace (diffusers' `nn.RMSNorm` QK norm, `apply_rotary_emb`,
`FluxPosEmbed`'s `get_1d_rotary_pos_embed`, the AdaLN `LayerNorm(x) * (1 + scale) + shift`,
`dispatch_attention_fn`, `x + gate * y`).

Timing is round-robin: every round times a block of calls of each variant of each op in turn
(alternating which goes first), so load on a shared machine hits all alike; the table gives the
median per-call time over rounds and the interquartile range. Each variant's output is checked
against the other before timing. A benchmark, not a test: nothing here asserts a time.

    python bench/host_cost.py [--rounds 41] [--calls 200] [--backend cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch


def cases(backend):
    """{op: (stock callable, patched callable)} on tiny Flux-shaped CPU tensors."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed

    from flux_npu import models, ops

    cfg = models.preset_config("tiny")
    H, D = cfg["num_attention_heads"], cfg["attention_head_dim"]
    B, S, hidden = 1, 24, H * D
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    q, k, v = r(B, S, H, D), r(B, S, H, D), r(B, S, H, D)
    norm_q, norm_k = torch.nn.RMSNorm(D, eps=1e-6), torch.nn.RMSNorm(D, eps=1e-6)
    pos = torch.arange(S, dtype=torch.float32)
    cos, sin = get_1d_rotary_pos_embed(D, pos, 10000, use_real=True, repeat_interleave_real=True,
                                       freqs_dtype=torch.float64)
    cs = (cos.float(), sin.float())
    x3, shift, scale = r(B, S, hidden), r(B, hidden), r(B, hidden)
    ln = torch.nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
    gate, y = r(B, 1, hidden), r(B, S, hidden)
    dim = cfg["axes_dims_rope"][-1]

    def stock_qk():
        return apply_rotary_emb(norm_q(q), cs, sequence_dim=1), apply_rotary_emb(norm_k(k), cs, sequence_dim=1)

    return {
        "rms_norm": (lambda: norm_q(q), lambda: ops.rms_norm(q, norm_q.weight, 1e-6, backend=backend)),
        "apply_rope": (lambda: apply_rotary_emb(q, cs, sequence_dim=1),
                       lambda: ops.apply_rope(q, cs, sequence_dim=1, backend=backend)),
        "qk_norm_rope": (stock_qk, lambda: ops.qk_norm_rope(q, k, norm_q.weight, norm_k.weight, cs, 1e-6, 1,
                                                            backend=backend)),
        "rope_freqs": (
            lambda: get_1d_rotary_pos_embed(dim, pos, 10000, use_real=True, repeat_interleave_real=True,
                                            freqs_dtype=torch.float64),
            lambda: ops.rope_freqs(pos, dim, 10000.0, form="cos_sin", backend=backend),
        ),
        "layer_norm_modulate": (lambda: ln(x3) * (1 + scale[:, None]) + shift[:, None],
                                lambda: ops.layer_norm_modulate(x3, shift[:, None], scale[:, None], 1e-6,
                                                                backend=backend)),
        "gated_residual": (lambda: x3 + gate * y, lambda: ops.gated_residual(x3, gate, y, backend=backend)),
        # the diffusers double block's `h = h + gate * attn; n = norm2(h) * (1 + scale) + shift`
        "adaln_residual": (lambda: _adaln_residual_stock(ln, x3, gate, y, shift[:, None], scale[:, None]),
                           lambda: ops.adaln_residual(x3, gate, y, shift[:, None], scale[:, None], 1e-6,
                                                      backend=backend)),
        "attention": (lambda: dispatch_attention_fn(q, k, v),
                      lambda: ops.attention(q, k, v, layout="BSHD", backend=backend)),
    }


def _adaln_residual_stock(ln, x, gate, y, shift, scale):
    h = x + gate * y
    return h, ln(h) * (1 + scale) + shift


def _close(a, b):
    from flux_npu.testing import rel_err

    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    return max(rel_err(x.float(), y.float()) for x, y in zip(a, b, strict=False))


def measure(backend, rounds: int = 41, calls: int = 200):
    table = cases(backend)
    with torch.no_grad():
        for op, (stock, patched) in table.items():
            err = _close(patched(), stock())
            if err > 1e-5:
                raise AssertionError(f"{op}: patched differs from stock by {err:.2e} (relative)")
            for _ in range(calls):  # warm-up: plans, caches, allocator
                stock()
                patched()
        samples = {op: ([], []) for op in table}
        for rnd in range(rounds):
            for op, pair in table.items():
                order = (0, 1) if rnd % 2 == 0 else (1, 0)
                for which in order:
                    fn = pair[which]
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    samples[op][which].append((time.perf_counter() - t0) / calls * 1e6)
    rows = []
    for op, (st, pa) in samples.items():
        ratios = sorted(p / s for s, p in zip(st, pa, strict=False))
        rows.append(dict(op=op, stock_us=statistics.median(st), patched_us=statistics.median(pa),
                         ratio=statistics.median(ratios), ratio_q1=_q(ratios, 0.25), ratio_q3=_q(ratios, 0.75),
                         stock_iqr=_q(sorted(st), 0.75) - _q(sorted(st), 0.25),
                         patched_iqr=_q(sorted(pa), 0.75) - _q(sorted(pa), 0.25)))
    return rows


def _q(sorted_values, f):
    i = (len(sorted_values) - 1) * f
    lo, hi = int(i), min(int(i) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (i - lo)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: host cost only)")
    p.add_argument("--json", help="also write the rows and the machine to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from flux_npu.backends import get_backend

    backend = get_backend(args.backend)
    rows = measure(backend, args.rounds, args.calls)
    machine = dict(cpu=backend.utils.device_name(), python=platform.python_version(), torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), threads=args.threads,
                   rounds=args.rounds, calls=args.calls, backend=backend.name)
    print(f"host cost per call, tiny Flux shapes, {machine['cpu']}, torch {machine['torch']}, {machine['date']}")
    print(f"{'op':<20} {'stock us':>9} {'(IQR)':>7} {'patched us':>11} {'(IQR)':>7} {'ratio':>6} {'ratio IQR':>12}")
    for r in rows:
        print(f"{r['op']:<20} {r['stock_us']:9.2f} {r['stock_iqr']:7.2f} {r['patched_us']:11.2f} "
              f"{r['patched_iqr']:7.2f} {r['ratio']:6.2f} {r['ratio_q1']:5.2f}-{r['ratio_q3']:<5.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(dict(machine=machine, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
