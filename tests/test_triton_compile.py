"""Every Triton kernel of the cuda backend compiles to a GPU binary, on any machine.

The interpreter (how the other Triton tests run without a GPU) executes kernels in numpy and
accepts programs the real compiler rejects (layouts of tl.reshape/tl.split/tl.join, pointer
values chosen by a branch, loop-carried types). Triton can compile for a named target without a
device: each kernel is compiled here to a cubin for sm_90 (H100) in bfloat16 at the
configurations Flux uses (about 20 s uncached; cached by Triton after that), in a fresh interpreter where TRITON_INTERPRET is unset (`triton.jit`
decides interpreted-or-compiled at import). On a GPU host the other tests compile and run them
for real, so this one is skipped there.
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
    import itertools, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from flux_npu.kernels.cuda import layer_norm_modulate, rms_norm, rope

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

    # (kernel, constexprs, float32 pointers): Flux's shapes (head dim 128, hidden 3072)
    CASES = []
    for has_w in (True, False):
        CASES.append((rms_norm._rms_norm_fwd, dict(HAS_W=has_w, BLOCK_M=32, BLOCK_N=128), ()))
        CASES.append((rms_norm._rms_norm_bwd, dict(HAS_W=has_w, BLOCK_M=1, BLOCK_N=4096), ("DW",)))
    # (NORM, HAS_W, TWO): apply_rope; qk_norm_rope with and without weights; its one-tensor fallback
    for cos_sin, (norm, has_w, two) in itertools.product(
        (True, False), ((False, False, False), (True, True, True), (True, True, False))
    ):
        consts = dict(COS_SIN=cos_sin, NORM=norm, HAS_W=has_w, TWO=two, BLOCK_M=32, BLOCK_D=128)
        CASES.append((rope._rope_fwd, consts, ("F0", "F1")))
        CASES.append((rope._rope_bwd, consts, ("F0", "F1", "DW")))
    CASES.append((layer_norm_modulate._ln_mod_fwd, dict(BLOCK_M=1, BLOCK_N=4096), ()))
    CASES.append((layer_norm_modulate._ln_mod_bwd, dict(BLOCK_M=1, BLOCK_N=4096), ("DSH", "DSC")))

    done = []
    for arch, dt in ((90, "bf16"),):
        for kernel, consts, f32 in CASES:
            name = kernel.fn.__name__
            src = ASTSource(kernel, signature(kernel, dt, f32), constexprs=consts)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
            assert compiled.asm.get("cubin"), name
            done.append(f"sm_{arch}:{name}:{sorted(consts.items())}")
    print(json.dumps(done))
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the kernel tests compile and run for real")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    import json

    done = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(done) == 18, done  # rms_norm 4, rope 12, layer_norm_modulate 2
