"""Every Triton kernel of the cuda backend compiles to a GPU binary, on any machine.

The interpreter (how the other Triton tests run without a GPU) executes kernels in numpy and
accepts programs the real compiler rejects (layouts of tl.reshape/tl.split/tl.join, pointer
values chosen by a branch, loop-carried types). Triton can compile for a named target without a
device: each kernel is compiled here to a cubin for sm_90 (H100) in bfloat16 at the
configurations Flux uses (about 20 s uncached; Triton caches it), in a fresh interpreter where
TRITON_INTERPRET is unset (`triton.jit` decides interpreted-or-compiled at import). On a GPU host
the other tests compile and run them for real, so these are skipped there.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

pytestmark = pytest.mark.triton

SCRIPT = textwrap.dedent(
    """
    import itertools, json, os, re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from flux_npu.kernels.cuda import adaln_residual, layer_norm_modulate, rms_norm
    from flux_npu.kernels.cuda import apply_rope as rope

    PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}

    def signature(kernel, dt, f32_ptrs=()):
        sig = {}
        for p in kernel.params:
            if p.is_constexpr:
                sig[p.name] = "constexpr"
            elif p.name == "eps":
                sig[p.name] = "fp32"
            elif p.name[0].isupper():  # pointer arguments are the upper-case names
                sig[p.name] = "*fp32" if p.name in f32_ptrs else PTR[dt]
            else:  # sizes and strides: Python ints below 2**31 launch as i32
                sig[p.name] = "i32"
        return sig

    # what a real launch at Flux's shapes tells the compiler (triton's specialisation): every pointer,
    # size and stride is a multiple of 16 (torch's allocations, rows of 128 or 3072), except n1 and n2,
    # leading dims such as 24 heads; without it every load would be scalar
    def aligned(kernel):
        return {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
                if not p.is_constexpr and p.name not in ("eps", "n1", "n2")}

    # (kernel, constexprs, float32 pointers, num_warps) as the launchers use them at Flux's shapes
    # (head dim 128, hidden 3072): forwards on TILE-sized blocks with 8 warps, backwards on
    # BWD_TILE-sized blocks (D=128: 16 rows, 8 warps; a 3072 row: 16 warps), RoPE's on 8 rows, 4 warps
    CASES = []
    for has_w in (True, False):
        CASES.append((rms_norm._rms_norm_fwd, dict(HAS_W=has_w, BLOCK_M=32, BLOCK_N=128), (), 8))
        CASES.append((rms_norm._rms_norm_bwd, dict(HAS_W=has_w, BLOCK_M=16, BLOCK_N=128), ("DW",), 8))
        CASES.append((rms_norm._rms_norm_bwd, dict(HAS_W=has_w, BLOCK_M=1, BLOCK_N=4096), ("DW",), 16))
    # (NORM, HAS_W, TWO): apply_rope; qk_norm_rope with and without weights; its one-tensor fallback
    for cos_sin, (norm, has_w, two) in itertools.product(
        (True, False), ((False, False, False), (True, True, True), (True, True, False))
    ):
        flags = dict(COS_SIN=cos_sin, NORM=norm, HAS_W=has_w, TWO=two, BLOCK_D=128)
        CASES.append((rope._rope_fwd, dict(flags, BLOCK_M=32), ("F0", "F1"), 8))
        CASES.append((rope._rope_bwd, dict(flags, BLOCK_M=8), ("F0", "F1", "DW"), 4))
    CASES.append((layer_norm_modulate._ln_mod_fwd, dict(BLOCK_M=1, BLOCK_N=4096), (), 8))
    CASES.append((layer_norm_modulate._ln_mod_bwd, dict(BLOCK_M=1, BLOCK_N=4096), ("DSH", "DSC"), 16))
    CASES.append((adaln_residual._adaln_res_fwd, dict(BLOCK_M=1, BLOCK_N=4096), (), 8))
    CASES.append((adaln_residual._adaln_res_bwd, dict(BLOCK_M=1, BLOCK_N=4096), ("DG", "DSH", "DSC"), 16))

    def loop(ttgir):
        # the persistent loop in triton's GPU IR (`scf.while`, its body after `} do {`): how many loads
        # an iteration issues, how many of them the loop carries to the next iteration (a software
        # prefetch: the next block's loads are in flight while this one is computed), and whether
        # every load comes before the iteration's first reduction
        lines = ttgir.splitlines()
        start = next(i for i, line in enumerate(lines) if line.strip() == "} do {")
        indent = len(lines[start]) - len(lines[start].lstrip())
        body = []
        for line in lines[start + 1:]:
            if line.strip().startswith("scf.yield") and len(line) - len(line.lstrip()) == indent + 2:
                carried = re.findall(r"%[\\w.#]+", line.split(" : ")[0])
                break
            body.append(line)
        loads = [(k, re.match(r"\\s*(%[\\w.#]+) = tt\\.load", line).group(1))
                 for k, line in enumerate(body) if re.match(r"\\s*%[\\w.#]+ = tt\\.load", line)]
        reduces = [k for k, line in enumerate(body) if '"tt.reduce"' in line]
        return dict(loads=len(loads), carried=sum(name in carried for _, name in loads),
                    loads_first=all(k < min(reduces, default=len(body)) for k, _ in loads))

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    done, usage = [], []
    for arch, dt in ((90, "bf16"),):
        for kernel, consts, f32, warps in CASES:
            name = kernel.fn.__name__
            src = ASTSource(kernel, signature(kernel, dt, f32), constexprs=consts, attrs=aligned(kernel))
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
            assert compiled.asm.get("cubin"), name
            done.append(f"sm_{arch}:{name}:{sorted(consts.items())}")
            if name.endswith("_bwd") and os.path.exists(cuobjdump):
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(compiled.asm["cubin"])
                    f.flush()
                    res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
                m = re.search(r"REG:(\\d+) STACK:(\\d+) SHARED:(\\d+) LOCAL:(\\d+)", res)
                usage.append(dict(name=name, consts=consts, warps=warps, regs=int(m.group(1)),
                                  stack=int(m.group(2)), shared=compiled.metadata.shared,
                                  **loop(compiled.asm["ttgir"])))
    print(json.dumps({"done": done, "usage": usage, "triton": triton.__version__}))
    """
)


@pytest.fixture(scope="module")
def sm90():
    """The compile script's result: compiled kernel names, backward resource usage, triton version."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the kernel tests compile and run for real")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    import json

    return json.loads(res.stdout.strip().splitlines()[-1])


def test_kernels_compile_for_sm90(sm90):
    done = sm90["done"]
    assert len(done) == 22, done  # rms_norm 6, rope 12, layer_norm_modulate 2, adaln_residual 2


# Register file and limits of an sm_90 SM (H100): 64K registers, allocated per warp in units of 256;
# at most 64 resident warps and 32 resident programs.
REGS_PER_SM, REG_UNIT, WARPS_PER_SM, CTAS_PER_SM = 65536, 256, 64, 32


def _resident(u):
    """Programs of this compiled kernel one SM holds at once (its registers, warps and programs)."""
    per_warp = -(-u["regs"] * 32 // REG_UNIT) * REG_UNIT
    return min(REGS_PER_SM // (per_warp * u["warps"]), WARPS_PER_SM // u["warps"], CTAS_PER_SM)


def test_backward_kernels_fit_the_sm_without_spilling(sm90):
    """Every backward kernel, compiled for sm_90 at the launch configuration (tiles, warps, and the
    alignment triton's specialisation finds) Flux's shapes use: at least one program fits an SM (so
    the launch cannot fail for registers), no register spills (the stack frame holds spills;
    cuobjdump's STACK), every load of a loop iteration issued before its first reduction, and at
    least two row blocks of loads in flight per SM. Each kernel with a weight/shift/scale gradient
    (a persistent loop) carries every load of the next block into the next iteration (a software
    prefetch: checked in triton's GPU IR), and RoPE's persistent grid holds no more programs per SM
    than fit at once (a program more would be a second wave)."""
    from flux_npu.kernels.cuda import _triton
    from flux_npu.kernels.cuda import apply_rope as rope

    usage = sm90["usage"]
    if not usage:
        pytest.skip("triton's cuobjdump is not bundled here")
    table = []
    for u in usage:
        resident = _resident(u)
        persistent = u["name"] != "_rope_bwd" or u["consts"]["HAS_W"]
        prefetch = 0 < u["carried"] == u["loads"]
        per_sm = _triton.PROGRAMS_PER_SM
        if u["name"] == "_rope_bwd":
            per_sm = rope.BWD_PROGRAMS_PER_SM[u["consts"]["COS_SIN"]]
        at_once = min(resident, per_sm) if persistent else resident
        in_flight = at_once * (2 if prefetch else 1)
        table.append((u["name"], u["consts"], u["warps"], u["regs"], u["stack"], resident, u["carried"], in_flight))
        assert resident >= 1, table[-1]
        assert u["stack"] == 0, table[-1]
        assert u["loads_first"], table[-1]
        assert in_flight >= 2, table[-1]
        if persistent:
            assert prefetch, table[-1]
        if persistent and u["name"] == "_rope_bwd":
            assert resident >= per_sm, table[-1]
    assert {t[0] for t in table} == {"_rms_norm_bwd", "_rope_bwd", "_ln_mod_bwd", "_adaln_res_bwd"}, table


TRACE_SCRIPT = textwrap.dedent(
    """
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from torch._functorch.aot_autograd import aot_export_joint_simple


    class TargetOnly:  # what torch's kernel analysis asks of the driver: the target to compile for
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)


    triton.runtime.driver.set_active(TargetOnly())
    torch.compiler.is_compiling = lambda: True  # as under dynamo: the wrappers call the custom ops
    from flux_npu.kernels.cuda import _triton, adaln_residual as AR, layer_norm_modulate as LN, qk_norm_rope as QK
    from flux_npu.kernels.cuda import rms_norm as RMS, apply_rope as R

    assert not _triton.interpreted(RMS._rms_norm_fwd)

    def f(x, w, q, k, cos, sin, h, sh, sc):
        yq, yk = QK.qk_norm_rope(q, k, w, w, (cos, sin), 1e-6, 1)
        outs = (RMS.rms_norm(x, w), yq, yk, LN.layer_norm_modulate(h, sh, sc), R.apply_rope(q, (cos, sin), 1))
        outs += AR.adaln_residual(h, sc, h * 2, sh, sc)
        return (sum(o.float().pow(2).sum() for o in outs),)

    m = lambda *s: torch.randn(*s, device="meta")
    args = [m(2, 5, 3, 32), m(32), m(1, 6, 2, 32), m(1, 6, 2, 32), m(6, 32), m(6, 32)]
    args += [m(2, 7, 64), m(2, 1, 64), m(2, 1, 64)]
    for i in (0, 1, 2, 3, 6, 7, 8):
        args[i].requires_grad_()
    g = aot_export_joint_simple(f, args, trace_joint=True)
    hops = [n for n in g.graph.nodes if "triton_kernel_wrapper_functional" in str(n.target)]
    cloned = [n.args[0].name for n in g.graph.nodes if n.target == torch.ops.aten.clone.default
              and n.args[0].op == "placeholder" and n.args[0].name.startswith("primals")]
    print(len(hops), cloned)
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the kernel tests compile the ops for real")
def test_compiled_triton_path_traces_without_input_copies():
    """With compiled Triton the custom ops are triton_ops: torch.compile's AOT tracing (fake
    implementations derived from the launchers, functional decomposition into the Triton kernel
    wrapper) covers forward and backward of all five kernels, and its analysis of what each kernel
    writes finds only the outputs, so no input is copied before a call. Traced on meta tensors
    with only a compile target set (no device)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    n_hops, cloned = res.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(n_hops) == 10, res.stdout  # 5 forward launches + 5 backward launches
    assert cloned == "[]", f"inputs copied before a Triton kernel: {cloned}"
