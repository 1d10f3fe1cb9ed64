"""Test helpers shared by the whole-model tests: run a model forward and backward and collect the
output, the input gradients and every parameter gradient; compare two such runs. Also the one way
the multi-process tests start `flux-npu run`."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import torch

from flux_npu import models
from flux_npu.testing import rel_err


def diffusers_run(model, inputs):
    """Forward + backward of a diffusers Flux model on FluxInputs with grad-requiring inputs."""
    for t in (inputs.hidden_states, inputs.encoder_hidden_states):
        t.grad = None
    model.zero_grad(set_to_none=True)
    out = model(**inputs.as_kwargs()).sample
    torch.manual_seed(99)
    g = torch.randn(out.shape)
    out.backward(g.to(out.dtype))
    res = {"out": out.detach().clone(), "d_hidden": inputs.hidden_states.grad.clone(),
           "d_text": inputs.encoder_hidden_states.grad.clone()}
    for name, p in model.named_parameters():
        if p.grad is not None:
            res["d_" + name], p.grad = p.grad, None  # moved, not copied: one set of gradients in memory
    return res


def diffusers_errors(model, inputs, ref):
    """{name: rel_err} of a forward + backward like `diffusers_run`, against `ref` (a `diffusers_run`
    result), measured as the gradients arrive: a post-accumulate hook compares each parameter's
    gradient and drops it, so a Flux-width model (~0.5 B parameters) never holds a second full set
    of gradients next to the reference's. Same tensors, same measure as `errors(diffusers_run(...), ref)`."""
    errs = {}

    def hook(name):
        def measure(p):
            errs["d_" + name] = rel_err(p.grad, ref["d_" + name]) if "d_" + name in ref else None
            p.grad = None
        return measure

    hooks = [p.register_post_accumulate_grad_hook(hook(n)) for n, p in model.named_parameters() if p.requires_grad]
    try:
        run = diffusers_run(model, inputs)  # only the output and the input gradients are left in it
    finally:
        for h in hooks:
            h.remove()
    errs.update({k: rel_err(v, ref[k]) for k, v in run.items()})
    assert errs.keys() == ref.keys() and None not in errs.values(), set(errs) ^ set(ref)
    return errs


def diffusers_model_and_inputs(preset="tiny", dtype=torch.float32, res=128, text_len=8, seed=0):
    model = models.build_diffusers_flux(preset, dtype=dtype, seed=seed)
    inputs = models.make_inputs(models.preset_config(preset), resolution=res, text_len=text_len, dtype=dtype,
                                seed=seed, requires_grad=True)
    return model, inputs


def cast_inputs(inputs, dtype):
    new = copy.copy(inputs)
    for k, v in inputs.__dict__.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in ("img_ids", "txt_ids"):
            nv = v.detach().to(dtype)
            if v.requires_grad:
                nv.requires_grad_(True)
            setattr(new, k, nv)
    return new


def errors(run, ref):
    """{name: rel_err(run[name], ref[name])} over the tensors both runs have."""
    assert run.keys() == ref.keys(), set(run) ^ set(ref)
    return {k: rel_err(run[k], ref[k]) for k in ref}


# bf16 rule of the whole-model tests: the patched run may be at most BF16_FACTOR times as far from
# the float32 reference as stock bf16 is, plus a floor for tensors where stock happens to be exact
BF16_FACTOR, BF16_FLOOR = 2.0, 1e-3


def assert_bf16_no_worse(patched, stock, ref32, keys=None):
    """patched bf16 error <= BF16_FACTOR * stock bf16 error + BF16_FLOOR, per tensor of ref32 (or `keys`)."""
    keys = list(ref32 if keys is None else keys)
    assert_bf16_errors_no_worse({k: rel_err(patched[k], ref32[k]) for k in keys},
                                {k: rel_err(stock[k], ref32[k]) for k in keys})


def assert_bf16_errors_no_worse(patched_errs, stock_errs):
    """The same rule on errors already measured against the float32 reference ({name: rel_err})."""
    assert patched_errs.keys() == stock_errs.keys(), set(patched_errs) ^ set(stock_errs)
    bad = {k: (e_p, stock_errs[k]) for k, e_p in patched_errs.items()
           if not e_p <= BF16_FACTOR * stock_errs[k] + BF16_FLOOR}
    assert not bad, f"bf16 patched (err, stock err) vs float32 reference: {bad}"


def bfl_model(dtype=torch.float32, seed=0, hidden=64, heads=4, depth=2, single=2, axes=(4, 6, 6)):
    from flux.model import Flux, FluxParams

    torch.manual_seed(seed)
    p = FluxParams(in_channels=16, vec_in_dim=24, context_in_dim=40, hidden_size=hidden, num_heads=heads,
                   depth=depth, depth_single_blocks=single, axes_dim=axes)
    return Flux(p).to(dtype)


def bfl_inputs(model, batch=1, side=6, text_len=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = model.params
    img = torch.randn(batch, side * side, p.in_channels, generator=g)
    ids = models.image_ids(side * 16)  # (side*side, 3): a side x side latent-token grid
    return dict(
        img=img.to(dtype).requires_grad_(True),
        img_ids=ids.reshape(1, side * side, 3).repeat(batch, 1, 1),
        txt=torch.randn(batch, text_len, p.context_in_dim, generator=g).to(dtype).requires_grad_(True),
        txt_ids=torch.zeros(batch, text_len, 3),
        timesteps=torch.rand(batch, generator=g).to(dtype),
        y=torch.randn(batch, p.vec_in_dim, generator=g).to(dtype),
        guidance=torch.full((batch,), 3.5).to(dtype),
    )


def bfl_run(model, inputs):
    for k in ("img", "txt"):
        inputs[k].grad = None
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    torch.manual_seed(99)
    out.backward(torch.randn(out.shape).to(out.dtype))
    res = {"out": out.detach().clone(), "d_img": inputs["img"].grad.clone(), "d_txt": inputs["txt"].grad.clone()}
    for name, p in model.named_parameters():
        if p.grad is not None:
            res["d_" + name] = p.grad.clone()
    return res


def cast_bfl_inputs(inputs, dtype):
    out = {}
    for k, v in inputs.items():
        nv = v.detach().to(dtype) if k not in ("img_ids", "txt_ids") else v
        if v.requires_grad:
            nv.requires_grad_(True)
        out[k] = nv
    return out


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flux_npu_run(*args, cwd=REPO, env_extra=None, timeout=300):
    """`python -m flux_npu run ARGS` -> (returncode, stdout, stderr). In its own session, so that a
    failing test cannot leave ranks behind: the launcher's group is killed if it outlives `timeout`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    env.pop("FLUX_NPU_BACKEND", None)
    proc = subprocess.Popen([sys.executable, "-m", "flux_npu", "run", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    return proc.returncode, out, err
