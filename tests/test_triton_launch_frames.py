"""Host cost of an eager Triton launch, counted in Python frames on triton's compiled-kernel path.

The interpreter (how the other Triton tests run without a GPU) never reaches the code a GPU runs
per launch: argument binding and specialisation, the kernel-cache lookup, the launcher. Here, in a
fresh process with TRITON_INTERPRET unset at import (`triton.jit` makes compiled kernels), triton
runs that path on CPU tensors against a stand-in driver that names an sm_90 (H100) target: each
kernel is really compiled for sm_90 on first use and looked up in triton's cache on every later
call. What is stubbed, and only that: the driver's device queries (device 0, stream 0, sm_90,
H100 shared memory), `load_binary` (no module is loaded into a GPU) and the driver's launcher
class, whose call records the launch instead of calling the C launch function; every Python frame
above it is the real one. The checks of the cuda backend take CPU tensors only under
TRITON_INTERPRET=1, so the variable is set after the kernels are jitted while triton's own
`interpret` knob stays off.

`sys.setprofile` counts the Python calls of one op call after a warm-up call. Measured here
(torch 2.13, triton 3.9): ops.rms_norm on the cuda code path 44 frames (537 when the launch goes
through torch's wrap_triton, as it did before); a patched diffusers double-block FluxAttention
445 against stock's 175. The limits below leave room for small changes and fail on the HOP path.
"""

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
pytest.importorskip("diffusers")

pytestmark = pytest.mark.triton

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, triton

    import sm90_driver  # tests/, on PYTHONPATH

    import flux_npu.kernels.cuda  # jitted now, as compiled kernels (TRITON_INTERPRET is unset)
    from flux_npu.kernels.cuda import _triton as T, rms_norm as RMS

    assert not T.interpreted(RMS._rms_norm_fwd)
    triton.knobs.runtime.interpret = False  # triton's knob wins over the variable set next
    os.environ["TRITON_INTERPRET"] = "1"  # the cuda backend's checks: CPU tensors go to the Triton kernels

    LAUNCHES = []


    class Launcher:  # stands for the driver's launcher: records instead of calling the C launch
        def __init__(self, src, metadata):
            self.name = src.fn.__name__

        def __call__(self, grid_x, grid_y, grid_z, stream, function, *args):
            LAUNCHES.append((self.name, sys._getframe(1)))


    sm90_driver.install(Launcher)

    import flux_npu
    from flux_npu import models, ops
    from flux_npu.backends import cuda

    backend = cuda.BACKEND.with_device_type("cpu")


    def frames(fn):
        fn()  # warm: compiles for sm_90, fills the plans and triton's kernel cache
        n = [0]

        def count(frame, event, arg):
            if event == "call":
                n[0] += 1

        sys.setprofile(count)
        try:
            fn()
        finally:
            sys.setprofile(None)
        return n[0]


    def in_triton(frame):
        path = frame.f_code.co_filename.replace(os.sep, "/")
        return "/triton/" in path and "/flux_npu/" not in path


    def depths(fn):
        # per launch: the frames between the patched processor's __call__ and triton's first frame
        del LAUNCHES[:]
        fn()
        out = []
        for name, f in LAUNCHES:
            while in_triton(f):
                f = f.f_back
            chain = []
            while f is not None and not (f.f_code.co_name == "__call__"
                                         and f.f_code.co_filename.endswith("diffusers_flux.py")):
                chain.append(f.f_code.co_name)
                f = f.f_back
            assert f is not None, (name, chain)
            out.append([name, chain])
        return out


    res = {}
    model = models.build_diffusers_flux("tiny", dtype=torch.bfloat16, seed=0)
    double, single = model.transformer_blocks[0].attn, model.single_transformer_blocks[0].attn
    torch.manual_seed(0)
    img, txt = torch.randn(1, 16, 32, dtype=torch.bfloat16), torch.randn(1, 8, 32, dtype=torch.bfloat16)
    joint = torch.randn(1, 24, 32, dtype=torch.bfloat16)
    rope = (torch.randn(24, 16), torch.randn(24, 16))
    x, w = torch.randn(2, 16, 3, 128, dtype=torch.bfloat16), torch.randn(128, dtype=torch.bfloat16)
    with torch.no_grad():
        run_double = lambda: double(hidden_states=img, encoder_hidden_states=txt, image_rotary_emb=rope)
        run_single = lambda: single(hidden_states=joint, image_rotary_emb=rope)
        res["stock_double"], res["stock_single"] = frames(run_double), frames(run_single)
        handle = flux_npu.patch(backend, model=model)
        try:
            res["patched_double"], res["patched_single"] = frames(run_double), frames(run_single)
            res["depth"] = depths(run_double) + depths(run_single)
        finally:
            handle.undo()
        res["rms_norm"] = frames(lambda: ops.rms_norm(x, w, 1e-6, backend=backend))
        del LAUNCHES[:]
        ops.rms_norm(x, w, 1e-6, backend=backend)
        res["launches_per_rms_norm"] = len(LAUNCHES)
        T.launch = T.wrap_triton  # the old path: every launch through torch's higher-order op
        res["rms_norm_wrap_triton"] = frames(lambda: ops.rms_norm(x, w, 1e-6, backend=backend))
    res["served"] = sorted({k[2] for k in ops.dispatch_stats()["served"]})
    print(json.dumps(res))
    """
)


@pytest.fixture(scope="module")
def counted():
    from sm90_driver import script_env

    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=script_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_eager_rms_norm_costs_about_triton_own_launch(counted):
    """ops.rms_norm on the cuda code path: one launch, within ~100 Python frames; the same count
    with the launch routed through torch's wrap_triton is far above it (the measure sees the HOP)."""
    assert counted["launches_per_rms_norm"] == 1, counted
    assert counted["rms_norm"] <= 100, counted
    assert counted["rms_norm_wrap_triton"] > 3 * counted["rms_norm"], counted


def test_patched_flux_attention_within_a_small_multiple_of_stock(counted):
    """A patched diffusers double-block FluxAttention (4 RMSNorm and 2 RoPE launches, SDPA) and a
    single-block one (the fused QK-norm + RoPE launch) cost at most 4x the stock module's frames."""
    assert {"triton.rms_norm", "triton.rope", "triton.qk_norm_rope"} <= set(counted["served"]), counted
    assert counted["patched_double"] <= 4 * counted["stock_double"], counted
    assert counted["patched_single"] <= 4 * counted["stock_single"], counted


def test_at_most_five_frames_from_the_patched_processor_to_the_launch(counted):
    """Every launch made inside the patched processor is reached through at most five Python
    frames (e.g. _rms -> ops.rms_norm -> _call -> Function.apply -> forward, which launches)."""
    names = [name for name, _ in counted["depth"]]
    assert names.count("_rms_norm_fwd") == 4 and names.count("_rope_fwd") == 3, counted["depth"]
    for name, chain in counted["depth"]:
        assert len(chain) <= 5, (name, chain[::-1])
