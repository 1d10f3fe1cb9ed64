"""EMULATED torch_npu ops (contract emulator, CPU tensors, plain autograd-capable torch).

Each op binds its arguments against the documented signature (an unknown or missing argument is
a TypeError, as with the real bindings), checks argument types, dtypes and the documented shape
limits (raising as the real op does), records the call, then computes the documented formula in
float32 and rounds once to the input dtype. Where the documentation leaves a case open the
emulator takes the strict reading (noted inline); features flux_npu does not use raise
NotImplementedError rather than being guessed.
"""

from __future__ import annotations

import functools
import inspect

import torch
from npu_emulator.record import CALLS, CONFIG, FLOAT64

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_MAX = 2147483647


def _emulated(fn):
    sig = inspect.signature(fn)
    name = fn.__name__

    @functools.wraps(fn)
    def op(*args, **kwargs):
        if torch.compiler.is_compiling():
            # traced by torch.compile: the real ops are graph nodes; here the plain-torch contract
            # maths is traced instead (the checks still run on the fake tensors; no recording,
            # which is Python-side state)
            return fn(*args, **kwargs)
        bound = sig.bind(*args, **kwargs)
        explicit = set(bound.arguments)
        bound.apply_defaults()
        tensors, plain = {}, {}
        for k, v in bound.arguments.items():
            if isinstance(v, torch.Tensor):
                tensors[k] = dict(shape=tuple(v.shape), dtype=v.dtype, data_ptr=v.data_ptr(),
                                  requires_grad=v.requires_grad)
                if v.dtype == torch.float64:
                    FLOAT64.append((name, k))
            else:
                plain[k] = v
        CALLS.append(dict(op=name, args=plain, tensors=tensors, explicit=explicit))
        return fn(**bound.arguments)

    return op


def _tensor(op, name, t, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}(): argument '{name}' must be Tensor, not {type(t).__name__}")
    if t.device.type != "cpu":
        raise RuntimeError(f"{op}(): the contract emulator computes on CPU tensors, got {name} on {t.device}")


def _float_dtype(op, name, t):
    if t is not None and t.dtype not in DTYPES:
        raise RuntimeError(f"{op}(): {name} has dtype {t.dtype}; supported: float16, bfloat16, float32")


def _int(op, name, v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}(): argument '{name}' must be int, not {type(v).__name__}")


def _number(op, name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}(): argument '{name}' must be float, not {type(v).__name__}")


def _str(op, name, v):
    if not isinstance(v, str):
        raise TypeError(f"{op}(): argument '{name}' must be str, not {type(v).__name__}")


def _bool(op, name, v):
    if not isinstance(v, bool):
        raise TypeError(f"{op}(): argument '{name}' must be bool, not {type(v).__name__}")


# -- npu_fusion_attention ---------------------------------------------------------------------------


def _to_bnsd(t, layout, head_dim):
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    if layout == "SBH":
        t = t.transpose(0, 1)
    b, s, h = t.shape
    return t.reshape(b, s, h // head_dim, head_dim).transpose(1, 2)


def _from_bnsd(t, layout):
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    out = t.transpose(1, 2).flatten(2)  # (B, S, N*D)
    return out.transpose(0, 1) if layout == "SBH" else out


@_emulated
def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=INT_MAX, next_tockens=INT_MAX, inner_precise=0,
                         prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout=""):
    op = "npu_fusion_attention"
    for n, t in (("query", query), ("key", key), ("value", value)):
        _tensor(op, n, t)
        _float_dtype(op, n, t)
    _tensor(op, "pse", pse, optional=True)
    _float_dtype(op, "pse", pse)
    _tensor(op, "atten_mask", atten_mask, optional=True)
    _int(op, "head_num", head_num)
    _str(op, "input_layout", input_layout)
    _number(op, "scale", scale)
    _number(op, "keep_prob", keep_prob)
    for n, v in (("pre_tockens", pre_tockens), ("next_tockens", next_tockens), ("inner_precise", inner_precise),
                 ("sparse_mode", sparse_mode)):
        _int(op, n, v)
    _bool(op, "gen_mask_parallel", gen_mask_parallel)
    _bool(op, "sync", sync)
    _str(op, "softmax_layout", softmax_layout)
    if input_layout not in ("BSH", "SBH", "BSND", "BNSD", "TND"):
        raise RuntimeError(f"{op}(): input_layout must be BSH, SBH, BSND, BNSD or TND, got {input_layout!r}")
    if input_layout == "TND" or actual_seq_qlen is not None or actual_seq_kvlen is not None or prefix is not None:
        raise NotImplementedError(f"{op}: varlen (TND) and prefix modes are not emulated")
    if padding_mask is not None:
        raise RuntimeError(f"{op}(): padding_mask is not supported")
    if not (0.0 < keep_prob <= 1.0):
        raise RuntimeError(f"{op}(): keep_prob must be in (0, 1], got {keep_prob}")
    if keep_prob < 1.0:
        raise NotImplementedError(f"{op}: dropout (keep_prob < 1) is not emulated")
    dts = {t.dtype for t in (query, key, value, pse) if t is not None}
    if len(dts) != 1:
        raise RuntimeError(f"{op}(): query, key, value and pse must share one dtype, got {sorted(map(str, dts))}")
    if tuple(key.shape) != tuple(value.shape):
        raise RuntimeError(f"{op}(): key {tuple(key.shape)} and value {tuple(value.shape)} must have one shape")
    if input_layout in ("BSH", "SBH"):
        if head_num < 1 or query.dim() != 3 or query.shape[-1] % head_num:
            raise RuntimeError(f"{op}(): {input_layout} query {tuple(query.shape)} not divisible into {head_num} heads")
        head_dim = query.shape[-1] // head_num
        if key.dim() != 3 or key.shape[-1] % head_dim:
            raise RuntimeError(f"{op}(): {input_layout} key {tuple(key.shape)} not divisible into heads of {head_dim}")
    else:
        if query.dim() != 4 or key.dim() != 4:
            raise RuntimeError(f"{op}(): {input_layout} needs 4-D query/key/value, got {query.dim()}-D")
        head_dim = query.shape[-1]
    q, k, v = (_to_bnsd(t, input_layout, head_dim) for t in (query, key, value))
    B, Nq, Sq, D = q.shape
    _, Nkv, Sk, Dk = k.shape
    if Nq != head_num:
        raise RuntimeError(f"{op}(): head_num={head_num} but the {input_layout} query has {Nq} heads")
    if not 1 <= Nq <= 256:
        raise RuntimeError(f"{op}(): query head count N={Nq} outside 1..256")
    if Nq % Nkv:
        raise RuntimeError(f"{op}(): Nq/Nkv = {Nq}/{Nkv} is not a whole number")
    if Dk != D or not 1 <= D <= 768:
        raise RuntimeError(f"{op}(): head dim must satisfy Dq == Dk in 1..768, got Dq={D}, Dk={Dk}")
    if k.shape[0] != B or not 1 <= B <= 2 * 1024 * 1024 or max(Sq, Sk) > 1024 * 1024:
        raise RuntimeError(f"{op}(): batch or sequence outside the supported range (B 1..2M, S 1..1M)")
    scores = torch.matmul(q.float(), k.float().repeat_interleave(Nq // Nkv, dim=1).transpose(-1, -2))
    if pse is not None:
        if pse.dim() != 4 or pse.shape[-1] != Sk or tuple(pse.shape[:3]) not in ((B, Nq, Sq), (B, Nq, 1), (1, Nq, Sq)):
            raise RuntimeError(f"{op}(): pse must be BNSS, BN1S or 1NSS, got {tuple(pse.shape)}")
        scores = scores + pse.float()
    scores = scores * scale
    if atten_mask is not None:
        if atten_mask.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"{op}(): atten_mask must be bool or uint8, got {atten_mask.dtype}")
        m = atten_mask
        ok = (m.dim() == 2 and tuple(m.shape) == (Sq, Sk)) or (
            m.dim() == 4 and tuple(m.shape[2:]) == (Sq, Sk) and tuple(m.shape[:2]) in ((B, Nq), (B, 1), (1, 1))
        )
        if not ok:
            raise RuntimeError(f"{op}(): atten_mask shape {tuple(m.shape)} is not BNSS, B1SS, 11SS or SS "
                               f"for B={B}, N={Nq}, Sq={Sq}, Skv={Sk}")
        if sparse_mode != 0 or (pre_tockens, next_tockens) != (INT_MAX, INT_MAX):
            raise NotImplementedError(f"{op}: sparse modes other than 0 and band masks are not emulated")
        scores = scores.masked_fill(m.bool(), float("-inf"))  # True = masked out
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.float().repeat_interleave(Nq // Nkv, dim=1)).to(query.dtype)
    stats = scores.detach()
    softmax_max = stats.amax(dim=-1, keepdim=True).expand(B, Nq, Sq, 8).contiguous()
    softmax_sum = torch.exp(stats - softmax_max[..., :1]).sum(-1, keepdim=True).expand(B, Nq, Sq, 8).contiguous()
    return (_from_bnsd(out, input_layout), softmax_max, softmax_sum, torch.empty(0, dtype=query.dtype), 0, 0, 0)


# -- npu_rotary_mul ---------------------------------------------------------------------------------

_R_SHAPES = {
    # layout: (B, N, S) positions in the input, and operand shape forms per mode
    "BNSD": ((0, 1, 2), {"interleave": ("11SD",), "half": ("11SD", "B1SD", "BNSD")}),
    "BSND": ((0, 2, 1), {"interleave": ("1S1D",), "half": ("1S1D", "BS1D", "BSND")}),
    "SBND": ((1, 2, 0), {"interleave": ("S11D",), "half": ("S11D", "SB1D", "SBND")}),
}


def _form_shape(form, layout, x):
    (bi, ni, si), _ = _R_SHAPES[layout]
    sizes = {"B": x.shape[bi], "N": x.shape[ni], "S": x.shape[si], "D": x.shape[3], "1": 1}
    return tuple(sizes[c] for c in form)


def _rotary(op, x, r1, r2, rotary_mode, rotate):
    for n, t in (("input", x), ("r1", r1), ("r2", r2)):
        _tensor(op, n, t)
        _float_dtype(op, n, t)
    _str(op, "rotary_mode", rotary_mode)
    if rotary_mode not in ("half", "interleave"):
        raise RuntimeError(f"{op}(): rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    if rotate is not None:
        raise NotImplementedError(f"{op}: the rotate matrix form is not emulated")
    # Strict reading: the docstring lists one dtype set for all three; the emulator requires one dtype.
    if not (x.dtype == r1.dtype == r2.dtype):
        raise RuntimeError(f"{op}(): input, r1, r2 dtypes differ ({x.dtype}, {r1.dtype}, {r2.dtype})")
    if x.dim() != 4 or r1.dim() != 4 or tuple(r1.shape) != tuple(r2.shape):
        raise RuntimeError(f"{op}(): input, r1, r2 must be 4-D and r1, r2 one shape; got {tuple(x.shape)}, "
                           f"{tuple(r1.shape)}, {tuple(r2.shape)}")
    D = x.shape[-1]
    if D % 2 or D >= 896:
        raise RuntimeError(f"{op}(): D must be even and < 896, got {D}")
    if CONFIG.get("jit_compile", False):
        # docstring (2.14.0), "jit_compile=True场景": only half mode, 4-D, B and N <= 1000, D == 128
        if rotary_mode != "half":
            raise RuntimeError(f"{op}(): with jit_compile=True only rotary_mode='half' is supported, got "
                               f"{rotary_mode!r}")
        if D != 128:
            raise RuntimeError(f"{op}(): with jit_compile=True D must be 128, got {D}")
    layout = None
    for name, ((bi, ni, _), forms) in _R_SHAPES.items():
        if any(tuple(r1.shape) == _form_shape(f, name, x) for f in forms[rotary_mode]):
            layout, B, N = name, x.shape[bi], x.shape[ni]
            break
    if layout is None:
        raise RuntimeError(f"{op}(): r1/r2 shape {tuple(r1.shape)} is not a supported broadcast of input "
                           f"{tuple(x.shape)} in {rotary_mode} mode (interleave: 11SD, 1S1D or S11D)")
    if rotary_mode == "interleave" and B * N >= 1000:
        raise RuntimeError(f"{op}(): interleave mode needs B*N < 1000, got {B}*{N}")
    if rotary_mode == "half" and (B >= 1000 or N >= 1000):
        raise RuntimeError(f"{op}(): half mode needs B, N < 1000, got B={B}, N={N}")
    with torch.no_grad():  # a value check reads data: done eagerly, not in a compiled graph
        if not torch.compiler.is_compiling() and bool((r1.abs() > 1 + 1e-6).any() or (r2.abs() > 1 + 1e-6).any()):
            raise RuntimeError(f"{op}(): r1/r2 values must lie in [-1, 1] (cos and sin)")
    xf = x.float()
    if rotary_mode == "interleave":
        x_new = torch.stack((-xf[..., 1::2], xf[..., 0::2]), dim=-1).flatten(-2)
    else:
        x1, x2 = torch.chunk(xf, 2, dim=-1)
        x_new = torch.cat((-x2, x1), dim=-1)
    return (r1.float() * xf + r2.float() * x_new).to(x.dtype)


@_emulated
def npu_rotary_mul(input, r1, r2, rotary_mode="half", rotate=None):  # noqa: A002 (the documented name)
    return _rotary("npu_rotary_mul", input, r1, r2, rotary_mode, rotate)


def _legacy_npu_rotary_mul(self, r1, r2):
    return _rotary("npu_rotary_mul", self, r1, r2, "half", None)


_legacy_npu_rotary_mul.__name__ = "npu_rotary_mul"
legacy_npu_rotary_mul = _emulated(_legacy_npu_rotary_mul)  # builds before the 7.0.0 op-plugin branch


# -- npu_rms_norm -----------------------------------------------------------------------------------


@_emulated
def npu_rms_norm(self, gamma, epsilon=1e-06):
    op = "npu_rms_norm"
    _tensor(op, "self", self)
    _tensor(op, "gamma", gamma)
    _float_dtype(op, "self", self)
    _float_dtype(op, "gamma", gamma)
    _number(op, "epsilon", epsilon)
    if not 2 <= self.dim() <= 8:
        raise RuntimeError(f"{op}(): self must have 2..8 dims, got {self.dim()}")
    if gamma.dtype != self.dtype:
        raise RuntimeError(f"{op}(): gamma dtype {gamma.dtype} must equal self dtype {self.dtype}")
    g = gamma.dim()
    if not 1 <= g <= self.dim() or tuple(self.shape[-g:]) != tuple(gamma.shape):
        raise RuntimeError(
            f"{op}(): gamma {tuple(gamma.shape)} must match the trailing dims of self {tuple(self.shape)}")
    dims = tuple(range(-g, 0))
    xf = self.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    # dtype rule of the backward: npu_rms_norm_backward returns dgamma in float32 (meta registration,
    # 2.14.0) and autograd then rounds it to gamma's dtype (gamma == self's dtype): the backward of
    # gamma.float() below does exactly that rounding, so a caller that casts a float32 weight to
    # self's dtype before the call sees the same bf16-rounded weight gradient as on the device
    y = (xf * rstd * gamma.float()).to(self.dtype)
    return y, rstd


# -- npu_fused_infer_attention_score (FIA) ---------------------------------------------------------


class _NoBackward(torch.autograd.Function):
    """The real FIA has no derivative: a backward through its output raises."""

    @staticmethod
    def forward(ctx, out, *inputs):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("the derivative for 'npu_fused_infer_attention_score' is not implemented "
                           "(the op is inference-only; torch_npu 2.14.0 docstring)")


def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
                                    actual_seq_lengths_kv=None, dequant_scale1=None, quant_scale1=None,
                                    dequant_scale2=None, quant_scale2=None, quant_offset2=None, antiquant_scale=None,
                                    antiquant_offset=None, block_table=None, query_padding_size=None,
                                    kv_padding_size=None, key_antiquant_scale=None, key_antiquant_offset=None,
                                    value_antiquant_scale=None, value_antiquant_offset=None, key_shared_prefix=None,
                                    value_shared_prefix=None, actual_shared_prefix_len=None, query_rope=None,
                                    key_rope=None, key_rope_antiquant_scale=None, num_heads=1, scale=1.0,
                                    pre_tokens=INT_MAX, next_tokens=INT_MAX, input_layout="BSH",
                                    num_key_value_heads=0, sparse_mode=0, inner_precise=0, block_size=0,
                                    antiquant_mode=0, softmax_lse_flag=False, key_antiquant_mode=0,
                                    value_antiquant_mode=0):
    """Documented (2.14.0 docstring) for inference: float16/bfloat16 (int8/int4 quantised modes not
    emulated), non-contiguous inputs rejected, BSH/BSND/BNSD layouts (TND, BNSD_BSND, paged KV,
    prefixes, quantisation, pse_shift not emulated), GQA with num_heads/num_key_value_heads <= 64,
    B <= 65536, N <= 256, D <= 512 (a multiple of 16 for float16/bfloat16 when Q_S > 1), N*D < 65535
    for BSH/BSND; atten_mask bool/int8/uint8, True = masked out (strict reading: the convention of
    npu_fusion_attention and PromptFlashAttention), shapes (1,1,Sq,Sk), (B,1,Sq,Sk), (1,Sq,Sk) or
    (Sq,Sk) in sparse_mode 0. Returns (attention_out, softmax_lse); no backward."""
    op = "npu_fused_infer_attention_score"
    local = dict(locals())
    unsupported = [n for n in ("pse_shift", "actual_seq_lengths", "actual_seq_lengths_kv", "dequant_scale1",
                               "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2", "antiquant_scale",
                               "antiquant_offset", "block_table", "query_padding_size", "kv_padding_size",
                               "key_antiquant_scale", "key_antiquant_offset", "value_antiquant_scale",
                               "value_antiquant_offset", "key_shared_prefix", "value_shared_prefix",
                               "actual_shared_prefix_len", "query_rope", "key_rope", "key_rope_antiquant_scale")
                   if local[n] is not None]
    if unsupported:
        raise NotImplementedError(f"{op}: {', '.join(unsupported)} not emulated")
    for n, t in (("query", query), ("key", key), ("value", value)):
        _tensor(op, n, t)
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"{op}(): {n} has dtype {t.dtype}; supported: float16, bfloat16 (int8/int4 quantised)")
        if not t.is_contiguous():
            raise RuntimeError(f"{op}(): {n} is not contiguous (non-contiguous tensors are not supported)")
    _tensor(op, "atten_mask", atten_mask, optional=True)
    for n, v in (("num_heads", num_heads), ("pre_tokens", pre_tokens), ("next_tokens", next_tokens),
                 ("num_key_value_heads", num_key_value_heads), ("sparse_mode", sparse_mode),
                 ("inner_precise", inner_precise), ("block_size", block_size)):
        _int(op, n, v)
    _number(op, "scale", scale)
    _str(op, "input_layout", input_layout)
    _bool(op, "softmax_lse_flag", softmax_lse_flag)
    if input_layout not in ("BSH", "BSND", "BNSD"):
        raise NotImplementedError(f"{op}: input_layout {input_layout!r} not emulated (BSH, BSND, BNSD are)")
    if sparse_mode != 0 or (pre_tokens, next_tokens) != (INT_MAX, INT_MAX) and atten_mask is not None:
        raise NotImplementedError(f"{op}: sparse modes other than 0 and band masks are not emulated")
    if inner_precise not in (0, 1, 2, 3):
        raise RuntimeError(f"{op}(): inner_precise must be 0..3, got {inner_precise}")
    if len({query.dtype, key.dtype, value.dtype}) != 1:
        raise RuntimeError(f"{op}(): query, key, value dtypes differ")
    if tuple(key.shape) != tuple(value.shape):
        raise RuntimeError(f"{op}(): key {tuple(key.shape)} and value {tuple(value.shape)} must have one shape")
    if input_layout == "BSH":
        if query.dim() != 3 or num_heads < 1 or query.shape[-1] % num_heads:
            raise RuntimeError(f"{op}(): BSH query {tuple(query.shape)} not divisible into {num_heads} heads")
        D = query.shape[-1] // num_heads
    else:
        if query.dim() != 4 or key.dim() != 4:
            raise RuntimeError(f"{op}(): {input_layout} needs 4-D query/key/value")
        D = query.shape[-1]
    q, k, v = (_to_bnsd(t, "BSND" if input_layout == "BSND" else input_layout, D) for t in (query, key, value))
    B, Nq, Sq, Dq = q.shape
    _, Nkv, Sk, Dk = k.shape
    if Nq != num_heads:
        raise RuntimeError(f"{op}(): num_heads={num_heads} but the query has {Nq} heads")
    if num_key_value_heads not in (0, Nkv):
        raise RuntimeError(f"{op}(): num_key_value_heads={num_key_value_heads} but key/value have {Nkv} heads")
    if Nq % Nkv or Nq // Nkv > 64:
        raise RuntimeError(f"{op}(): num_heads / num_key_value_heads = {Nq}/{Nkv} must be a whole number <= 64")
    if not 1 <= Nq <= 256 or not 1 <= B <= 65536 or Dq != Dk or Dq > 512:
        raise RuntimeError(f"{op}(): B {B} (<= 65536), N {Nq} (<= 256), D {Dq} (<= 512, Dq == Dk) out of range")
    if Sq > 1 and Dq % 16:
        raise RuntimeError(f"{op}(): float16/bfloat16 inputs need D a multiple of 16, got {Dq}")
    if input_layout in ("BSH", "BSND") and Nq * Dq >= 65535:
        raise RuntimeError(f"{op}(): N*D must be < 65535 for {input_layout}, got {Nq * Dq}")
    scores = torch.matmul(q.float(), k.float().repeat_interleave(Nq // Nkv, dim=1).transpose(-1, -2)) * scale
    if atten_mask is not None:
        if atten_mask.dtype not in (torch.bool, torch.int8, torch.uint8):
            raise TypeError(f"{op}(): atten_mask must be bool, int8 or uint8, got {atten_mask.dtype}")
        m = atten_mask
        ok = (m.dim() == 4 and tuple(m.shape[1:]) == (1, Sq, Sk) and m.shape[0] in (1, B)) or (
            m.dim() == 3 and tuple(m.shape) == (1, Sq, Sk)) or (m.dim() == 2 and tuple(m.shape) == (Sq, Sk) and Sq > 1)
        if not ok:
            raise RuntimeError(f"{op}(): atten_mask shape {tuple(m.shape)} is not (1,1,Sq,Sk), (B,1,Sq,Sk), "
                               f"(1,Sq,Sk) or (Sq,Sk) for B={B}, Sq={Sq}, Skv={Sk}")
        scores = scores.masked_fill(m.bool(), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.float().repeat_interleave(Nq // Nkv, dim=1)).to(query.dtype)
    out = _from_bnsd(out, "BSND" if input_layout == "BSND" else input_layout)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        out = _NoBackward.apply(out, query, key, value)
    return out, torch.zeros(1, dtype=torch.float32)


npu_fused_infer_attention_score = _emulated(npu_fused_infer_attention_score)
