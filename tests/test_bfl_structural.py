"""Detection by structure (a module under another name defining BFL's names) requires BFL's
signatures and semantics: a causal decoder's attention(q, k, v, pe=None) and a Gemma-style RMSNorm
(1 + weight) are left as written, with a report row saying why (issue 18 item 4)."""

import importlib
import sys
import textwrap

import pytest
import torch

import flux_npu

DECODER = '''
import torch


def apply_rope(xq, xk, freqs_cis):
    # LLaMA style: complex frequencies
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    return (torch.view_as_real(xq_ * freqs_cis).flatten(-2).type_as(xq),
            torch.view_as_real(xk_ * freqs_cis).flatten(-2).type_as(xk))


def attention(q, k, v, pe=None):
    """A causal decoder's attention, (B, H, L, D) out."""
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
'''

GEMMA = '''
import torch
from torch import nn


class RMSNorm(nn.Module):
    """Gemma style: the weight is stored as an offset from 1."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        rrms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return (x.float() * rrms * (1 + self.scale.float())).type_as(x)


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class EmbedND(nn.Module):
    def __init__(self, theta, axes_dim):
        super().__init__()
        self.theta, self.axes_dim = theta, axes_dim

    def forward(self, ids):
        return ids
'''


@pytest.fixture
def load(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def _load(name, source):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return importlib.import_module(name)

    yield _load
    for n in names:
        sys.modules.pop(n, None)


def test_causal_decoder_attention_is_not_replaced(load):
    m = load("toy_decoder_math", DECODER)
    original = m.attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    ref = m.attention(q, k, v)
    with flux_npu.patch("cpu", targets=["bfl"]) as handle:
        assert m.attention is original
        out = m.attention(q, k, v)  # the default argument still works
        rows = [r for r in handle.report() if "attention" in r.symbol and "toy_decoder_math" in r.target]
    assert torch.equal(out, ref)
    assert rows and all(r.status == "skipped" for r in rows)
    assert "recognised by its names only" in rows[0].reason and "default" in rows[0].reason


def test_gemma_rmsnorm_is_not_replaced(load):
    m = load("toy_gemma_layers", GEMMA)
    norm = m.RMSNorm(8)
    with torch.no_grad():
        norm.scale.normal_(generator=torch.Generator().manual_seed(1))
    qk = m.QKNorm(8)
    qk.load_state_dict({"query_norm.scale": norm.scale.detach(), "key_norm.scale": norm.scale.detach()})
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    ref, ref_qk = norm(x), qk(x, x, x)
    with flux_npu.patch("cpu", targets=["bfl"]) as handle:
        out, out_qk = norm(x), qk(x, x, x)
        rows = {r.symbol: r for r in handle.report() if "toy_gemma_layers" in r.target}
    assert torch.equal(out, ref)
    for a, b in zip(out_qk, ref_qk, strict=True):
        assert torch.equal(a, b)
    assert rows["RMSNorm.forward"].status == "skipped"
    assert "x * rrms * scale" in rows["RMSNorm.forward"].reason
    assert rows["QKNorm.forward"].status == "skipped"

# kohya's library.flux_models, found by structure too, still passes every probe and is patched:
# tests/test_patch_codebases.py::test_kohya_module_found_by_structure_and_served_with_its_bool_mask
