"""torch.compile of a Flux patched onto the cuda backend's Triton kernels: one graph (as stock,
tests/test_compile.py), no recompile when the timestep and latents change, compiled == eager,
forward and backward.

On the `device` fixture: a GPU when present (the kernels are triton_ops that AOT autograd sees
through), else CPU tensors with the Triton interpreter (opaque custom ops there). The kernels'
checks are walked inside the trace, so this also proves they neither break the graph nor add
guards that fail on the next step.
"""

import pytest
import torch
from conftest import requires

import flux_npu
from flux_npu import models, ops
from flux_npu.backends import cuda as cuda_backend
from flux_npu.kernels.cuda import _checks
from flux_npu.testing import assert_close

pytestmark = [
    pytest.mark.triton,
    requires("diffusers"),
    pytest.mark.skipif(_checks.triton_import_error() is not None, reason="triton not importable"),
]

CALLS = 2  # two steps of a denoising loop: the second would recompile if a guard depended on the step


def _step(i, device):
    inp = models.make_inputs(models.preset_config("tiny"), resolution=64, text_len=4, seed=200 + i,
                             device=device, requires_grad=True)
    kw = inp.as_kwargs()
    kw["timestep"] = torch.full_like(kw["timestep"], 0.9 - 0.3 * i)
    return kw


def _run(model, kw):
    out = model(**kw).sample
    params = [p for p in model.parameters()][:4]
    grads = torch.autograd.grad(out.square().mean(), [kw["hidden_states"], *params])
    return out.detach(), [g.detach() for g in grads]


def test_compiled_patched_flux_is_one_graph_on_the_cuda_code_path(device):
    from torch._dynamo.backends.debugging import aot_eager

    backend = cuda_backend.BACKEND if device.type == "cuda" else cuda_backend.BACKEND.with_device_type("cpu")
    model = models.build_diffusers_flux("tiny", seed=0).to(device)
    handle = flux_npu.patch(backend, model=model)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    try:
        # the compiled call is the first call of all: `patch()` warmed every cache the trace reads
        # (the kernels' checks, the cuda attention routes), so nothing is filled while tracing
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=counting, fullgraph=True)
        got = [_run(compiled, _step(i, device)) for i in range(CALLS)]
        torch._dynamo.reset()
        ops.reset_dispatch_stats()
        want = [_run(model, _step(i, device)) for i in range(CALLS)]
        stats = ops.dispatch_stats()
    finally:
        handle.undo()
    assert len(graphs) == 1, f"{len(graphs)} graphs over {CALLS} steps (a graph break or a recompile)"
    in_graph = {str(n.target).split(".")[-2] for n in graphs[0].graph.nodes if "flux_npu.triton_" in str(n.target)}
    want_ops = {"triton_rms_norm", "triton_apply_rope", "triton_qk_norm_rope", "triton_layer_norm_modulate",
                "triton_adaln_residual"}
    assert want_ops <= in_graph, in_graph  # our kernels are in the compiled graph, not traced around
    for (out_c, grads_c), (out_e, grads_e) in zip(got, want, strict=False):
        assert_close(out_c, out_e, torch.float32, scale=10.0, what="compiled vs eager output")
        for gc, ge in zip(grads_c, grads_e, strict=False):
            assert_close(gc, ge, torch.float32, scale=10.0, what="compiled vs eager gradient")
    for op, kernel in [
        ("rms_norm", "triton.rms_norm"),
        ("apply_rope", "triton.rope"),
        ("qk_norm_rope", "triton.qk_norm_rope"),
        ("layer_norm_modulate", "triton.layer_norm_modulate"),
        ("adaln_residual", "triton.adaln_residual"),
    ]:
        assert stats["served"][(op, "cuda", kernel)] > 0, (op, stats["served"])
    assert not stats["fallback"], stats["fallback"]
