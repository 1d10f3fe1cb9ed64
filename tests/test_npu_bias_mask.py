"""npu attention with additive bias masks (issue 15 item 6), on the torch_npu contract EMULATOR (not
hardware): a mask with values other than 0 and -inf (ChromaPipeline's 0/1 mask, ComfyUI Redux's
attn_bias, with or without -inf entries) is served by npu_fusion_attention through `pse` (its -inf
entries as the boolean atten_mask), forward and backward against a float64 reference, in each pse
form the op takes; the pse convention is probed once; a device whose op matches neither reading
declines bias masks with the reason."""

import pytest
import torch
from npu_emulator import record

from flux_npu import ops
from flux_npu.kernels.npu import attention as npu_attention
from flux_npu.testing import rel_err, tolerance

B, H, S, D = 2, 3, 7, 16


def _leaf(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)


def _bias(kind, seed=5):
    g = torch.Generator().manual_seed(seed)
    if kind == "chroma_0_1":  # ChromaPipeline's 0/1 float mask, used additively: (B, 1, 1, S)
        m = (torch.rand(B, 1, 1, S, generator=g) > 0.3).float()
        return m
    if kind == "redux_bias":  # a per-query bias over the keys, one for every batch: (1, 1, S, S)
        return torch.randn(1, 1, S, S, generator=g) * 2
    if kind == "bias_with_neginf":  # a bias with masked keys and one fully masked query row: (B, 1, S, S)
        m = torch.randn(B, 1, S, S, generator=g)
        m[:, :, :, -2:] = float("-inf")
        m[1, :, 4] = float("-inf")
        return m
    raise ValueError(kind)


def _grads(out, inputs):
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    return torch.autograd.grad(out, inputs, cot)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["chroma_0_1", "redux_bias", "bias_with_neginf"])
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_bias_mask_served_through_pse(npu_emulated, kind, dtype, layout):
    q, k, v = (_leaf((B, H, S, D), dtype, s) for s in (1, 2, 3))
    mask = _bias(kind).to(dtype)
    t = (lambda x: x) if layout == "BHSD" else (lambda x: x.transpose(1, 2))
    ops.reset_dispatch_stats()
    record.clear()
    out = ops.attention(t(q), t(k), t(v), mask=mask, layout=layout, backend=npu_emulated)
    assert ops.dispatch_stats()["served"][("attention", "npu", "torch_npu.npu_fusion_attention")] == 1
    assert not ops.dispatch_stats()["fallback"]
    (call,) = [c for c in record.calls("npu_fusion_attention") if c["tensors"]["query"]["shape"][2:] != (1, 2)]
    assert call["tensors"]["pse"]["dtype"] == dtype
    assert call["tensors"]["atten_mask"]["dtype"] == torch.bool
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref = ops.reference.attention(q64, k64, v64, mask=mask.double())
    assert not torch.isnan(out).any()
    tol = tolerance(dtype)
    assert rel_err(t(out).float(), ref.float()) <= tol
    for a, b in zip(_grads(out, (q, k, v)), _grads(t(ref), (q64, k64, v64)), strict=True):
        assert rel_err(a.float(), b.float()) <= tol
    if kind == "bias_with_neginf":
        assert t(out)[1, :, 4].abs().max() == 0  # the fully masked query row gives zeros, as the reference


def test_pse_forms_the_op_takes(npu_emulated):
    """(B,1,1,S) -> BN1S, (1,1,S,S) -> 1NSS, (B,1,S,S) -> BNSS: the emulator rejects any other."""
    shapes = {}
    for kind in ("chroma_0_1", "redux_bias", "bias_with_neginf"):
        q, k, v = (_leaf((B, H, S, D), torch.float32, s) for s in (1, 2, 3))
        record.clear()
        ops.attention(q, k, v, mask=_bias(kind), backend=npu_emulated)
        shapes[kind] = record.calls("npu_fusion_attention")[-1]["tensors"]["pse"]["shape"]
    assert shapes == {"chroma_0_1": (B, H, 1, S), "redux_bias": (1, H, S, S), "bias_with_neginf": (B, H, S, S)}


def test_pse_convention_probed_once_and_unknown_convention_declines(npu_emulated, monkeypatch):
    q, k, v = (_leaf((B, H, S, D), torch.float32, s) for s in (1, 2, 3))
    npu_attention._PSE.clear()
    ops.attention(q, k, v, mask=_bias("redux_bias"), backend=npu_emulated)
    assert {("cpu", torch.float32): "scaled"} == npu_attention._PSE  # the emulator follows the formula
    monkeypatch.setitem(npu_attention._PSE, ("cpu", torch.float32), "the op's pse probe gave [0.5, 0.5]")
    ops.reset_dispatch_stats()
    out = ops.attention(q, k, v, mask=_bias("redux_bias"), backend=npu_emulated)
    (reason,) = [r for (op, b, r) in ops.dispatch_stats()["fallback"] if op == "attention"]
    assert "bias mask" in reason and "probe gave" in reason
    ref = ops.reference.attention(q.double(), k.double(), v.double(), mask=_bias("redux_bias").double())
    assert rel_err(out, ref.float()) <= tolerance(torch.float32)


@pytest.mark.emulator
def test_parity_rows_for_the_bias_case_on_the_emulator(npu_emulated, tmp_path):
    """The parity case `attention_bias` recorded on cpu and checked on the emulated npu: every row
    passes, and the npu rows were served by npu_fusion_attention (through pse), not the reference."""
    from flux_npu import parity

    path = tmp_path / "bias.safetensors"
    parity.record(path, backend="cpu", shape_sets="tiny,width", dtypes="fp32,bf16,fp16", cases=["attention_bias"])
    ops.reset_dispatch_stats()
    report = parity.check(path, backend=npu_emulated)
    assert report.ok, report.table()
    assert len(report.results) == 6 and all(r.status == "pass" for r in report.results)
    served = ops.dispatch_stats()["served"]
    assert served[("attention", "npu", "torch_npu.npu_fusion_attention")] >= 6
    assert not [k for k in ops.dispatch_stats()["fallback"] if k[0] == "attention"]
