"""The record every op file of the catalogue fills in, and the validation helpers they share."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..precision import FLOAT_DTYPES


@dataclass(frozen=True, slots=True)
class OpInfo:
    """One op's home (the idea of PyTorch's OpInfo): what dispatch, parity, the benchmarks,
    `flux-npu info`, the patches' op switches and the tests read about it.

    validate(*args): raises naming the problem and the fix; returns "empty" for a zero-size input.
    key(plan_key, *args): the hashable input signature its kernels' checks read (raises
      AttributeError/TypeError/ValueError when there is none: validation then says why).
    ref(*args): the plain-torch reference (float32 accumulation, float64 for float64 inputs, so a
      float64 call is the tests' oracle); with bound=True ref(backend, *args) (rope_freqs: float32
      maths on a device without float64). Fallback, test oracle and benchmark check at once.
    arg_names / grads: the public arguments, and those the tests take gradients of.
    sample_inputs(shape, dtype, device="meta", gen=None): arguments as the patches pass them at a
      named Flux shape (`flux_npu.shapes`); meta tensors unless a device and a generator are given.
    extra_samples: name -> fn(dtype, device="meta", gen=None): inputs no named shape has (strided
      views of one projection, odd widths, other broadcasts), same contract; tests/ops runs them.
    nbytes(*args): bytes an ideal kernel moves (reads + writes) for those arguments.
    switchable: whether patch(ops=/exclude=) and FLUX_NPU_OPS name it (composite ops follow
      their parts).
    bench: benchmark variant name -> builder(shape, dtype, device, backend, rnd) returning the
      parts of a `benchmark.ops.Case` (the stock code the patches replace, our op, the reference).
    """

    name: str
    validate: Callable
    key: Callable
    ref: Callable
    arg_names: tuple
    grads: tuple
    sample_inputs: Callable
    nbytes: Callable
    switchable: bool = True
    bench: dict = field(default_factory=dict)
    extra_samples: dict = field(default_factory=dict)
    bound: bool = False
    doc: str = ""

    def reference(self, b):
        return functools.partial(self.ref, b) if self.bound else self.ref


def tensor_bytes(*ts) -> int:
    total = 0
    for t in ts:
        if isinstance(t, (tuple, list)):
            total += tensor_bytes(*t)
        elif isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def maker(dtype, device="meta", gen=None):
    """t(*shape, dt=dtype, scale=1.0): an empty meta tensor, or seeded random values on `device`."""

    def t(*shape, dt=dtype, scale=1.0):
        if str(device) == "meta" or gen is None:
            return torch.empty(*shape, dtype=dt, device=device)
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dt)

    return t


# -- validation helpers --------------------------------------------------------------------------


def check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(op, name, t):
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype}; supported dtypes are float32, bfloat16, float16 and "
            f"float64. Cast it first (e.g. {name}.float())."
        )


def same_device(op, **tensors):
    devs = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devs.values())) > 1:
        raise ValueError(f"{op}: tensors are on different devices ({devs}); move them to one device first")


def broadcast(a, b):
    """torch.broadcast_shapes for two shapes as plain tuples (None when they do not broadcast)."""
    a, b = tuple(a), tuple(b)
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b, strict=True):
        if x != y and x != 1 and y != 1:
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


def sig(t):
    """The signature of an optional tensor argument."""
    return None if t is None else (t.dtype, t.shape, t.device)
