"""The CUDA backend: NVIDIA GPUs, Triton kernels, SDPA attention, nccl.

The probe asks for a real CUDA device: `torch_npu.contrib.transfer_to_npu` makes
`torch.cuda.is_available()` answer True on an Ascend machine, so a CUDA runtime in this torch
build (`torch.version.cuda`) is required as well. Triton's presence is not part of the probe:
without it the backend still runs (SDPA attention, reference ops) and each Triton kernel's check
says why it declines.
"""

import functools
import os
import re
from dataclasses import dataclass

import torch

from .base import Backend, DeviceUtils

# Triton's floor (its README: compute capability 7.0+); bfloat16 compute needs Ampere (8.0).
MIN_COMPUTE_CAPABILITY = (7, 0)
BF16_COMPUTE_CAPABILITY = (8, 0)


def _probe():
    if not torch.cuda.is_available():
        built = torch.version.cuda
        return "torch.cuda.is_available() is False" + ("" if built else " (this torch is a CPU-only build)")
    # transfer_to_npu makes torch.cuda.is_available() True on an Ascend box: a real CUDA device
    # has a compute capability and a CUDA runtime version in this torch build.
    if torch.version.cuda is None:
        return "torch.cuda reports a device but this torch build has no CUDA runtime (is transfer_to_npu active?)"
    return None


@functools.cache
def compute_capability(index: int = None):
    """(major, minor) of CUDA device `index` (default: current), or None without CUDA."""
    if _probe() is not None:
        return None
    return tuple(torch.cuda.get_device_capability(index))


# -- SDPA routing around known-bad kernels ----------------------------------------------------------

SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")  # torch.nn.attention.SDPBackend names, short
_SDPA_ENUMS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
               "math": "MATH"}
SDPA_ENV = "FLUX_NPU_SDPA_BACKENDS"
SDPA_ENV_OLD = "FLUX_NPU_SDPA_PRIORITY"  # earlier name of the same setting, still read


@dataclass(frozen=True)
class SdpaFact:
    """One known-bad SDPA backend: which, for what (backward = training), on which torch versions
    ([since, fixed_in); fixed_in None while no fix is known) and compute capabilities, and where
    the fact comes from."""

    sdpa_backend: str
    affects: str  # "backward" (training only) or "forward" (always)
    since: tuple[int, int]
    fixed_in: tuple[int, int] | None
    capabilities: tuple[tuple[int, int], ...]
    what: str
    sources: tuple[str, ...]

    def applies(self, version: tuple[int, int], capability, training: bool) -> bool:
        if self.affects == "backward" and not training:
            return False
        if capability is None or tuple(capability) not in self.capabilities:
            return False
        return version >= self.since and (self.fixed_in is None or version < self.fixed_in)


SDPA_FACTS = (
    SdpaFact(
        sdpa_backend="cudnn",
        affects="backward",
        since=(2, 11),
        fixed_in=None,
        capabilities=((9, 0),),
        what="cuDNN SDPA backward is broken on sm_90 (H100): illegal memory access in Flux training, "
        "wrong (NaN) grad_q at small shapes",
        sources=(
            'PyTorch issue 196678, "NaN grad_q from cuDNN SDPA backward since 2.11"',
            "flux-npu, 2026-11-25: stock diffusers Flux training on an H100 80GB HBM3 with torch 2.11.0+cu130 died "
            "with an illegal memory access (cuBLAS 'execution failed' status, mha_graph execute errors) and "
            "trained with cuDNN SDPA disabled",
        ),
    ),
)


def sdpa_enums(names) -> list:
    """torch.nn.attention.SDPBackend members for SDPA backend names (SDPA_BACKENDS' short names), in
    the given order: what `sdpa_kernel(..., set_priority=True)` takes."""
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, _SDPA_ENUMS[n]) for n in names]


def torch_version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as '2.11.0+cu130'."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(f"cannot read a torch version from {version!r}")
    return int(m.group(1)), int(m.group(2))


def parse_sdpa_backends(spec: str, source: str = SDPA_ENV) -> tuple[str, ...]:
    """'flash,efficient,math' -> ('flash', 'efficient', 'math'); unknown names are a clear error."""
    from ..utils.env import parse_list

    names = tuple(s.lower() for s in parse_list(spec) or ())
    unknown = [n for n in names if n not in SDPA_BACKENDS]
    if unknown or not names:
        raise ValueError(
            f"{source}={spec!r}: unknown or no SDPA backends {unknown}; name one or more of {', '.join(SDPA_BACKENDS)} "
            "in priority order, e.g. flash,efficient,math"
        )
    return names


@dataclass(frozen=True)
class SdpaRoute:
    """The SDPA backends to allow, in priority order (None: torch's own choice) and why."""

    backends: tuple[str, ...] | None
    reason: str
    facts: tuple[SdpaFact, ...] = ()


def sdpa_route(torch_version: str, capability, training: bool, override: str | None = None,
               override_source: str = SDPA_ENV, facts=SDPA_FACTS) -> SdpaRoute:
    """Which SDPA backends attention may use. A pure function of its inputs (tests fake them).

    override (FLUX_NPU_SDPA_BACKENDS or the backend option `sdpa_backends`) wins and is used as
    given. Otherwise every fact that applies to this torch version, compute capability and mode
    removes its SDPA backend from torch's list (flash, efficient, cudnn, math kept in that order);
    with none applying, torch chooses freely."""
    version = torch_version_tuple(torch_version)
    bad = tuple(f for f in facts if f.applies(version, capability, training))
    if override:
        chosen = parse_sdpa_backends(override, override_source)
        known_bad = [f for f in bad if f.sdpa_backend in chosen]
        if not known_bad:
            return SdpaRoute(chosen, f"SDPA backends {','.join(chosen)} (from {override_source})")
        import warnings

        why = "; ".join(f"{f.what} [{f.sources[0]}]" for f in known_bad)
        msg = (f"{override_source}={override!r} re-enables SDPA backend(s) "
               f"{','.join(sorted({f.sdpa_backend for f in known_bad}))} known to be broken for "
               f"{'training' if training else 'inference'} on torch {version[0]}.{version[1]} / "
               f"sm_{capability[0]}{capability[1]}: {why}")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return SdpaRoute(chosen, f"SDPA backends {','.join(chosen)} (from {override_source}; WARNING: {msg})",
                         tuple(known_bad))
    if not bad:
        return SdpaRoute(None, "SDPA backend chosen by torch (no known-bad backend for this torch/device/mode)")
    drop = {f.sdpa_backend for f in bad}
    chosen = tuple(b for b in SDPA_BACKENDS if b not in drop)
    cc = f"sm_{capability[0]}{capability[1]}"
    why = "; ".join(f"{f.what} [{f.sources[0]}]" for f in bad)
    mode = "training" if training else "inference"
    return SdpaRoute(
        chosen,
        f"SDPA {mode} on torch {version[0]}.{version[1]} / {cc}: {','.join(sorted(drop))} excluded, using "
        f"{','.join(chosen)} ({why}); override with {SDPA_ENV}=flash,efficient,cudnn,math",
        bad,
    )


_ROUTES: dict = {}


def _override(backend: Backend | None = None):
    opt = backend.option("sdpa_backends") if backend is not None else None
    if opt:
        return (",".join(opt) if not isinstance(opt, str) else opt), "backend option sdpa_backends"
    found = _ROUTES.get(SDPA_ENV)
    if found is None:  # read once; reset_sdpa_routes() re-reads
        found = (os.environ.get(SDPA_ENV, "").strip() or os.environ.get(SDPA_ENV_OLD, "").strip(),
                 SDPA_ENV if os.environ.get(SDPA_ENV, "").strip() else SDPA_ENV_OLD)
        if not torch.compiler.is_compiling():
            _ROUTES[SDPA_ENV] = found
    return found


def reset_sdpa_routes() -> None:
    """Forget the cached routes and re-read FLUX_NPU_SDPA_BACKENDS at the next attention call."""
    _ROUTES.clear()


def route_for(backend: Backend | None, device_index, training: bool) -> SdpaRoute:
    """The route for attention on this CUDA device in this mode, decided once and cached.

    A torch.compile trace only reads the cache (`warm_routes` filled it when the backend was
    loaded or bound by `patch()`): a write inside the trace would make dynamo guard on the cache's
    new contents and recompile on the next call. A route missing from the cache while tracing is
    decided in the trace and not stored."""
    key = (None if backend is None else backend.plan_key, device_index, training)
    route = _ROUTES.get(key)
    if route is None:
        override, source = _override(backend)
        cap = compute_capability(device_index) if not override else None
        route = sdpa_route(torch.__version__, cap, training, override, source)
        if not torch.compiler.is_compiling():
            _ROUTES[key] = route
    return route


def warm_routes(backend: Backend | None = None) -> None:
    """Decide the routes for both modes now (the op table calls this when the backend is loaded
    or bound by `patch()`), so that a torch.compile trace only reads them: for the current CUDA
    device, and for tensors without a device index (CPU tensors under the Triton interpreter)."""
    indices = [None] + ([torch.cuda.current_device()] if _probe() is None else [])
    for index in indices:
        for training in (True, False):
            route_for(backend, index, training)


def sdpa_routing_line(training: bool = True, backend: Backend | None = None) -> str:
    """One line for reports (`flux-npu info`, the patch report): how attention is routed here."""
    if _probe() is not None and not _override(backend)[0]:
        facts = "; ".join(f"{f.sdpa_backend} {f.affects} on torch>={f.since[0]}.{f.since[1]} "
                          f"{'/'.join(f'sm_{a}{b}' for a, b in f.capabilities)}" for f in SDPA_FACTS)
        return f"no CUDA device here; known-bad SDPA backends avoided when present: {facts}"
    return route_for(backend, None, training).reason


def capability_rows() -> list:
    """(capability, value) rows for `flux-npu info`: compute capability and the SDPA routing."""
    cc = compute_capability() if _probe() is None else None
    rows = [("compute capability", f"sm_{cc[0]}{cc[1]}" if cc else "no CUDA device")]
    rows.append(("sdpa routing (training)", sdpa_routing_line(True)))
    rows.append(("sdpa routing (inference)", sdpa_routing_line(False)))
    for f in SDPA_FACTS:
        rows.append(("known-bad sdpa", f"{f.sdpa_backend} {f.affects}: {f.what}; sources: {' | '.join(f.sources)}"))
    return rows


class CUDADeviceUtils(DeviceUtils):
    """torch.cuda events, synchronize and allocator peaks; the name carries the capability."""

    def __init__(self):
        super().__init__("cuda")

    def device_name(self) -> str:
        name = super().device_name()
        try:
            cc = compute_capability()
        except Exception:  # a name query must not crash a report
            cc = None
        return f"{name} (sm_{cc[0]}{cc[1]})" if cc else name


BACKEND = Backend(
    name="cuda",
    device_type="cuda",
    probe=_probe,
    dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64}),
    supports_float64=True,
    dist_backend="nccl",
    autocast_device_type="cuda",
    priority=20,
    utils_factory=CUDADeviceUtils,
    kernel_modules=("flux_npu.kernels.cuda",),
    description="NVIDIA GPUs: Triton fused kernels (RMSNorm, RoPE, QK-norm+RoPE, AdaLN, gated residual+AdaLN), "
                "PyTorch SDPA (flash / cuDNN / efficient)",
    options=(
        ("min_compute_capability", MIN_COMPUTE_CAPABILITY),
        ("bf16_compute_capability", BF16_COMPUTE_CAPABILITY),
        ("capability_rows", capability_rows),
        ("prepare", warm_routes),
    ),
)
