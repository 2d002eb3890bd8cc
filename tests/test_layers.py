"""Leaf modules and the attention op against plain references, on CPU.

Run: python -m pytest -q tests/test_layers.py
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from conftest import ROOT, randomize_
from hybrid.attention import _window_block_mask, attention, attention_ref, causal_band_mask, flex_window_attention
from hybrid.layers import (
    MLP,
    BigramHash,
    CausalAttention,
    Rotary,
    SmearGate,
    TokenShiftMix,
    ValueEmbedding,
    bigram_hash_ids,
    exclusive_self_attention,
    token_shift_ref,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def qkv(B, T, H, G, D, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, T, n, D, generator=g, dtype=dtype) for n in (H, G, G)]
    return [t.requires_grad_(grad) for t in ts]


def attention_loop64(q, k, v, window):
    """The spec spelled out: one query at a time, float64, explicit key range (t - w, t]."""
    q, k, v = q.double(), k.double(), v.double()
    _, T, H, D = q.shape
    group = H // k.size(2)
    out = []
    for t in range(T):
        lo = 0 if window is None else max(0, t - window + 1)
        kk = k[:, lo:t + 1].repeat_interleave(group, dim=2)  # (B, n, H, D)
        vv = v[:, lo:t + 1].repeat_interleave(group, dim=2)
        s = torch.einsum("bhd,bnhd->bhn", q[:, t], kk) / math.sqrt(D)
        out.append(torch.einsum("bhn,bnhd->bhd", torch.softmax(s, dim=-1), vv))
    return torch.stack(out, dim=1)  # (B, T, H, D)


# ---- attention op ------------------------------------------------------------------------------

AWKWARD_T = (1, 7, 63, 130, 257)
WINDOWS = (1, 4, 128, None, 10_000)  # 10_000 > every T: must equal plain causal


@pytest.mark.parametrize("T", AWKWARD_T)
@pytest.mark.parametrize("window", WINDOWS)
def test_attention_matches_ref_and_float64_loop(T, window):
    q, k, v = qkv(2, T, 4, 2, 16, grad=True)
    y_fast = attention(q, k, v, window)
    y_ref = attention_ref(q, k, v, window)
    assert y_fast.shape == y_ref.shape == (2, T, 4, 16)
    torch.testing.assert_close(y_ref.double(), attention_loop64(q, k, v, window), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(y_fast, y_ref, atol=2e-6, rtol=1e-5)
    # backward: same upstream gradient through both paths
    dy = torch.randn_like(y_ref)
    g_fast = torch.autograd.grad(y_fast, (q, k, v), dy)
    g_ref = torch.autograd.grad(y_ref, (q, k, v), dy)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,window", [(7, 1), (63, 4), (130, 128)])
def test_attention_ref_grads_match_float64_loop(T, window):
    q, k, v = qkv(1, T, 4, 2, 8, dtype=torch.float64, grad=True)
    dy = torch.randn(1, T, 4, 8, dtype=torch.float64)
    g_ref = torch.autograd.grad(attention_ref(q, k, v, window), (q, k, v), dy)
    g_loop = torch.autograd.grad(attention_loop64(q, k, v, window), (q, k, v), dy)
    for a, b in zip(g_ref, g_loop):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_attention_rejects_nonpositive_window():
    q, k, v = qkv(1, 4, 2, 2, 8)
    for fn in (attention, attention_ref):
        with pytest.raises(ValueError, match="window"):
            fn(q, k, v, 0)


@pytest.mark.parametrize("T,window", [(7, 4), (130, 4), (257, 128), (300, 1), (256, 200)])
def test_flex_window_path_matches_ref(T, window):
    """The CUDA branch's block mask and mask_mod, run through flex's unfused CPU reference."""
    q, k, v = qkv(2, T, 4, 2, 16)
    block_mask = _window_block_mask(T, window, q.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           block_mask=block_mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(y, attention_ref(q, k, v, window), atol=2e-6, rtol=1e-5)
    # Block sparsity: a (query block, key block) tile is computed iff the band touches it.
    n = block_mask.BLOCK_SIZE[0]
    nb = (T + n - 1) // n
    band = F.pad(causal_band_mask(T, window, "cpu"), (0, nb * n - T, 0, nb * n - T))
    touched = band.reshape(nb, n, nb, n).any(dim=3).any(dim=1)  # (nb, nb)
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), touched)


def test_flex_window_path_traces_fullgraph():
    """create_block_mask + flex_attention trace without graph breaks (what compile does on CUDA)."""
    q, k, v = (t.transpose(1, 2) for t in qkv(1, 130, 4, 2, 16))
    fn = torch.compile(flex_window_attention, backend="aot_eager", fullgraph=True, dynamic=False)
    y = fn(q, k, v, 8).transpose(1, 2)
    torch.testing.assert_close(y, attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 8),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_attention_window_is_exactly_the_last_w_keys(window):
    """Perturbing key/value j changes exactly the queries t with t - window < j <= t."""
    T = 16
    q, k, v = qkv(1, T, 4, 2, 8)
    base = attention(q, k, v, window)
    for j in range(T):
        k2, v2 = k.clone(), v.clone()
        k2[:, j] += 1.0
        v2[:, j] += 1.0
        changed = (attention(q, k2, v2, window) - base).abs().amax(dim=(0, 2, 3)) > 1e-4
        expected = torch.tensor([j <= t < j + window for t in range(T)])
        assert torch.equal(changed, expected), (j, changed)


# ---- RoPE ----------------------------------------------------------------------------------------

def rope_full_ref(x, base=10000.0):
    """Full RoPE on [B, T, H, D] in float64 via complex numbers: pair (j, j+D/2) is z = x_j + i x_{j+D/2},
    rotated by e^{-i t θ_j}, θ_j = base^(-2j/D) (the baseline's sign convention)."""
    T, D = x.shape[1], x.shape[3]
    x = x.double()
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta  # (T, D/2)
    z = torch.complex(x[..., :D // 2], x[..., D // 2:]) * torch.polar(torch.ones_like(angle), -angle)[None, :, None]
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("shape", [(2, 9, 3, 16), (2, 4, 4, 16), (1, 1, 2, 8)])  # incl. T == H
def test_rotary_full_matches_reference(shape):
    x = torch.randn(*shape)
    y = Rotary(head_dim=shape[-1], rope_dims=shape[-1])(x)
    torch.testing.assert_close(y.double(), rope_full_ref(x), atol=1e-5, rtol=1e-5)


def test_rotary_partial_rotates_only_the_first_dims_and_follows_T():
    rot = Rotary(head_dim=32, rope_dims=8, base=10000.0)
    for T in (12, 5, 12, 33):  # the cache must follow T both ways
        x = torch.randn(2, T, 3, 32)
        y = rot(x)
        assert torch.equal(y[..., 8:], x[..., 8:])
        # frequencies are built over the rotated dims: exactly full RoPE of an 8-dim head
        torch.testing.assert_close(y[..., :8].double(), rope_full_ref(x[..., :8]), atol=1e-5, rtol=1e-5)
        assert rot.cos_sin(T, x.device)[0].shape == (T, 4)


def test_rotary_rejects_bad_rope_dims():
    for rd in (0, 7, 40):
        with pytest.raises(ValueError, match="rope_dims"):
            Rotary(head_dim=32, rope_dims=rd)


# ---- XSA ------------------------------------------------------------------------------------------

def test_xsa_removes_own_value_direction_and_matches_repeat_interleave():
    B, T, H, G, D = 2, 5, 6, 3, 8
    y, v = torch.randn(B, T, H, D), torch.randn(B, T, G, D)
    out = exclusive_self_attention(y, v)
    v_hat = F.normalize(v, dim=-1).repeat_interleave(H // G, dim=2)  # (B, T, H, D)
    ref = y - (y * v_hat).sum(-1, keepdim=True) * v_hat
    torch.testing.assert_close(out, ref)
    assert (out * v_hat).sum(-1).abs().max() < 1e-5  # orthogonal to the own value, every head
    # the part removed is parallel to v̂
    removed = y - out
    torch.testing.assert_close(removed, (removed * v_hat).sum(-1, keepdim=True) * v_hat)


# ---- token shift ------------------------------------------------------------------------------------

def test_token_shift_ref_hand_computed():
    x = torch.tensor([[[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]])
    assert torch.equal(token_shift_ref(x), torch.tensor([[[0.0, 0.0], [1.0, 10.0], [2.0, 20.0]]]))
    assert torch.equal(token_shift_ref(x[:, :1]), torch.zeros(1, 1, 2))


def test_token_shift_mix_matches_float64_formula():
    C = 16
    m = randomize_(TokenShiftMix(C))
    x = torch.randn(2, 7, C)
    W = {n: getattr(m, n).weight.double() for n in ("w_r", "w_k", "w_v")}
    sr, sk = torch.sigmoid(m.mix_r.double()), torch.sigmoid(m.mix_k.double())
    ref = torch.empty(2, 7, C, dtype=torch.float64)
    for t in range(7):
        xt = x[:, t].double()
        xp = x[:, t - 1].double() if t > 0 else torch.zeros_like(xt)
        r = torch.sigmoid((sr * xt + (1 - sr) * xp) @ W["w_r"].T)
        k = torch.relu((sk * xt + (1 - sk) * xp) @ W["w_k"].T) ** 2
        ref[:, t] = r * (k @ W["w_v"].T)
    torch.testing.assert_close(m(x).double(), ref, atol=1e-5, rtol=1e-5)


def test_token_shift_mix_init_is_identity_residual():
    m = TokenShiftMix(16)
    m.w_v.weight.data.zero_()  # what init_weights does for the _zero_init flag
    assert m.w_v._zero_init and torch.all(m.mix_r == 0.5) and torch.all(m.mix_k == 0.5)
    assert torch.equal(m(torch.randn(1, 4, 16)), torch.zeros(1, 4, 16))


# ---- SmearGate, BigramHash, ValueEmbedding, MLP ------------------------------------------------------

def test_smear_gate_formula_and_bos_fix():
    C = 4
    sg = randomize_(SmearGate(C))
    g = torch.sigmoid(sg.gate)
    x = torch.randn(1, 4, C)
    ids = torch.tensor([[5, 9, 1, 7]])  # BOS (id 1) at position 2
    plain, fixed = sg(x), sg(x, ids)
    expect = (1 - g) * x + g * token_shift_ref(x)
    torch.testing.assert_close(plain, expect)
    torch.testing.assert_close(fixed[:, 2], (1 - g) * x[:, 2])  # no leak from the previous document
    torch.testing.assert_close(fixed[:, [0, 1, 3]], expect[:, [0, 1, 3]])
    assert torch.all(SmearGate(C).gate == 0)  # g = 0.5 at init


def test_bigram_hash_indices_hand_computed():
    ids = torch.tensor([[5, 7, 1, 1023], [0, 0, 3, 2]])
    B = 2048
    expect = [[2047, (36313 * 7 ^ 27191 * 5) % 2047, (36313 * 1 ^ 27191 * 7) % 2047, (36313 * 1023 ^ 27191 * 1) % 2047],
              [2047, 0, (36313 * 3) % 2047, (36313 * 2 ^ 27191 * 3) % 2047]]
    assert bigram_hash_ids(ids, B).tolist() == expect
    assert bigram_hash_ids(ids.to(torch.int32), B).dtype == torch.int64


def test_bigram_hash_module():
    bh = randomize_(BigramHash(buckets=16, dim_b=8, model_dim=12))
    ids = torch.tensor([[3, 4, 5]])
    idx = bigram_hash_ids(ids, 16)
    expect = bh.table.weight[idx] @ bh.proj.weight.T * bh.bigram_scale
    torch.testing.assert_close(bh(ids), expect)
    fresh = BigramHash(16, 8, 12)
    assert torch.all(fresh.table.weight == 0) and fresh.bigram_scale.item() == pytest.approx(0.05)
    with pytest.raises(ValueError, match="buckets"):
        BigramHash(1, 8, 12)


def test_value_embedding_module():
    ve = ValueEmbedding(vocab_size=32, ve_dim=8, kv_dim=16)
    assert ve.shared_scale.item() == pytest.approx(0.1)
    assert abs(ve.table.weight.std().item() - 0.01) < 0.003
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(ve(ids), ve.table.weight[ids] @ ve.proj.weight.T * 0.1)


@pytest.mark.parametrize("act,fn", [("relu2", lambda h: torch.relu(h) ** 2),
                                    ("leaky_relu2", lambda h: torch.where(h > 0, h, 0.5 * h) ** 2)])
def test_mlp_activation(act, fn):
    m = randomize_(MLP(8, 24, act))
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), fn(x @ m.fc.weight.T) @ m.proj.weight.T)


# ---- causality of every mixer ---------------------------------------------------------------------

def attn_layer(window, xsa=True, use_ve=False):
    return randomize_(CausalAttention(32, 4, 2, rope_dims=4, rope_base=10000.0, qk_gain_init=1.5,
                                      window=window, xsa=xsa, use_ve=use_ve))


def assert_causal(fn, x, T, positions=None, self_effect_from=0):
    """Perturbing position t never changes outputs < t (and, from `self_effect_from` on, does change
    the output at t: XSA zeroes position 0, whose only key is itself)."""
    base = fn(x)
    for t in positions or (0, 1, T // 2, T - 1):
        x2 = x.clone()
        x2[:, t] += 1.0
        out = fn(x2)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        if t >= self_effect_from:
            assert (out[:, t] - base[:, t]).abs().max() > 1e-4, f"position {t} has no effect on itself"


@pytest.mark.parametrize("name", ["token_shift", "attn_full", "attn_full_xsa", "attn_window1", "attn_window4",
                                  "attn_window4_xsa", "attn_ve", "smear", "mlp"])
def test_mixer_causality(name):
    T = 24
    x = torch.randn(2, T, 32)
    ve = torch.randn(2, T, 16)
    ve_layer = attn_layer(4, xsa=False, use_ve=True)
    fns = {
        "token_shift": randomize_(TokenShiftMix(32)),
        "attn_full": attn_layer(None, xsa=False),
        "attn_full_xsa": attn_layer(None),
        "attn_window1": attn_layer(1, xsa=False),
        "attn_window4": attn_layer(4, xsa=False),
        "attn_window4_xsa": attn_layer(4),
        "attn_ve": lambda z: ve_layer(z, ve),
        "smear": randomize_(SmearGate(32)),
        "mlp": randomize_(MLP(32, 64)),
    }
    assert_causal(fns[name], x, T, self_effect_from=1 if name.endswith("xsa") else 0)


def test_xsa_with_only_itself_to_attend_outputs_zero():
    """Window 1 (or position 0) attends only to its own value, which XSA then removes entirely."""
    x = torch.randn(1, 6, 32)
    assert attn_layer(1, xsa=True)(x).abs().max() < 1e-5
    assert attn_layer(None, xsa=True)(x)[:, 0].abs().max() < 1e-5


def test_id_mixers_causality():
    """The id-driven extras: changing token t leaves earlier positions alone."""
    T = 20
    ids = torch.randint(0, 50, (2, T))
    for m in (randomize_(BigramHash(64, 8, 16)), randomize_(ValueEmbedding(50, 8, 16))):
        base = m(ids)
        for t in (0, 7, T - 1):
            ids2 = ids.clone()
            ids2[:, t] = (ids2[:, t] + 1) % 50
            torch.testing.assert_close(m(ids2)[:, :t], base[:, :t], atol=0, rtol=0)


@pytest.mark.parametrize("window", [1, 3, 6])
def test_windowed_layer_sees_exactly_its_window(window):
    """A single W layer (VE on): input j reaches outputs j .. j+window-1 and nothing else. With XSA
    on, position 0 (only itself to attend to) is always zero, so it never changes."""
    T = 16
    torch.manual_seed(window)
    for xsa in (False, True):
        layer = attn_layer(window, xsa=xsa, use_ve=True)
        x, ve = torch.randn(1, T, 32), torch.randn(1, T, 16)
        base = layer(x, ve)
        for j in range(T):
            x2 = x.clone()
            x2[:, j] += 1.0
            changed = (layer(x2, ve) - base).abs().amax(dim=(0, 2)) > 1e-4
            expect = torch.tensor([j <= t < j + window and not (xsa and (t == 0 or window == 1)) for t in range(T)])
            assert torch.equal(changed, expect), (xsa, j)


def test_attention_layer_shapes_and_ve_guard():
    layer = attn_layer(None, use_ve=False)
    x = torch.randn(2, 5, 32)
    assert layer(x).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="use_ve"):
        layer(x, torch.randn(2, 5, 16))


# ---- token-mix variants of the T layers (hybrid/token_mix.py, ModelConfig.token_mix) --------------

from hybrid.config import TOKEN_MIXES, ModelConfig  # noqa: E402
from hybrid.model import HybridGPT  # noqa: E402
from hybrid.token_mix import (  # noqa: E402
    ConvShiftMix,
    DDLerpMix,
    SiLUGateShiftMix,
    SoftShiftMix,
    token_mixer,
)

SIG = 1.0 / (1.0 + math.exp(-0.5))  # σ(0.5): shift's init weight on the current token
VARIANTS = [("ddlerp", 1), ("conv", 1), ("conv", 2), ("conv", 4), ("shiftk", 1), ("shiftk", 2), ("shiftk", 4),
            ("shift_silu_gate", 1)]


def copy_rkv(dst, src):
    """Give `dst` the W_r/W_k/W_v weights of `src`."""
    with torch.no_grad():
        for n in ("w_r", "w_k", "w_v"):
            getattr(dst, n).weight.copy_(getattr(src, n).weight)
    return dst


def rkv64(m, xr, xk, gate="sigmoid"):
    """The r/k/v path in float64 from the module's weights; xr, xk [B, C] float64."""
    W = {n: getattr(m, n).weight.double() for n in ("w_r", "w_k", "w_v")}
    z = xr @ W["w_r"].T
    r = 1 / (1 + torch.exp(-z))
    if gate == "silu":
        r = z * r
    k = torch.relu(xk @ W["w_k"].T) ** 2
    return r * (k @ W["w_v"].T)


def tap(x, t, j):
    """x[:, t−j] in float64, zeros before the sequence."""
    return x[:, t - j].double() if t - j >= 0 else torch.zeros_like(x[:, 0]).double()


def ddlerp_ref64(m, x):
    R = m.rank
    A, Br, Bk = m.lora_a.weight.double(), m.lora_b_r.weight.double(), m.lora_b_k.weight.double()
    mx, mr, mk = m.mu_x.double(), m.mu_r.double(), m.mu_k.double()
    out = []
    for t in range(x.size(1)):
        xt, xp = tap(x, t, 0), tap(x, t, 1)
        xx = xp - xt
        z = torch.tanh((xt + xx * mx) @ A.T)
        xr = xt + xx * (mr + z[:, :R] @ Br.T)
        xk = xt + xx * (mk + z[:, R:] @ Bk.T)
        out.append(rkv64(m, xr, xk))
    return torch.stack(out, dim=1)


def taps_ref64(m, x, wr, wk, gate="sigmoid"):
    """Σ_j w[j] ⊙ x[t−j] per branch, then the r/k/v path; wr, wk [K, C] float64."""
    out = []
    for t in range(x.size(1)):
        xr = sum(wr[j] * tap(x, t, j) for j in range(wr.size(0)))
        xk = sum(wk[j] * tap(x, t, j) for j in range(wk.size(0)))
        out.append(rkv64(m, xr, xk, gate))
    return torch.stack(out, dim=1)


def softmax64(logits):
    e = torch.exp(logits.double() - logits.double().max(dim=0).values)
    return e / e.sum(dim=0)


def variant_ref64(m, x):
    if isinstance(m, DDLerpMix):
        return ddlerp_ref64(m, x)
    if isinstance(m, ConvShiftMix):
        return taps_ref64(m, x, m.conv_mix_r.double(), m.conv_mix_k.double())
    if isinstance(m, SoftShiftMix):
        return taps_ref64(m, x, softmax64(m.mix_r), softmax64(m.mix_k))
    sr, sk = torch.sigmoid(m.mix_r.double()), torch.sigmoid(m.mix_k.double())
    return taps_ref64(m, x, torch.stack((sr, 1 - sr)), torch.stack((sk, 1 - sk)), gate="silu")


@pytest.mark.parametrize("kind,K", VARIANTS)
def test_token_mix_matches_float64_reference_at_random_params(kind, K):
    """Random (non-init) parameters, LoRA B included; the module in float64 against a per-step loop."""
    m = randomize_(token_mixer(kind, 16, K), std=0.4).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), variant_ref64(m, x), atol=1e-10, rtol=1e-10)
    # and in float32, the trained dtype
    m32 = randomize_(token_mixer(kind, 16, K), std=0.4)
    torch.testing.assert_close(m32(x.float()).double(), variant_ref64(m32, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,K", VARIANTS)
def test_token_mix_causal_and_reads_exactly_its_lookback(kind, K):
    """Input j reaches outputs j .. j + lookback and nothing else (lookback = 1, or K − 1 for conv/shiftk):
    causal, and the receptive field that stateful evaluation carries."""
    T = 12
    m = randomize_(token_mixer(kind, 16, K), std=0.4)
    L = K - 1 if kind in ("conv", "shiftk") else 1
    assert m.lookback == L
    x = torch.randn(2, T, 16)
    assert_causal(m, x, T)
    base = m(x)
    for j in range(T):
        x2 = x.clone()
        x2[:, j] += 1.0
        changed = (m(x2) - base).abs().amax(dim=(0, 2)) > 1e-5
        assert changed.tolist() == [j <= t <= j + L for t in range(T)], j


@pytest.mark.parametrize("kind,K", [("ddlerp", 1), ("conv", 2), ("conv", 4), ("conv", 7), ("shiftk", 2)])
def test_token_mix_at_init_equals_shift(kind, K):
    """ddlerp (B = 0), conv (taps [σ, 1−σ, 0, ..]) and shiftk with K = 2 start as shift's lerp: same output
    as TokenShiftMix with the same W_r/W_k/W_v (random, W_v included, so the output is not just 0)."""
    shift = randomize_(TokenShiftMix(16), std=0.4)
    with torch.no_grad():
        shift.mix_r.fill_(0.5), shift.mix_k.fill_(0.5)
    m = copy_rkv(token_mixer(kind, 16, K), shift)
    if kind == "ddlerp":  # a random A must not matter while B = 0
        torch.nn.init.normal_(m.lora_a.weight)
        assert torch.all(m.lora_b_r.weight == 0) and torch.all(m.lora_b_k.weight == 0)
        assert m.lora_b_r._zero_init and m.lora_b_k._zero_init and m.rank == 4  # min(32, 16 // 4)
    x = torch.randn(2, 10, 16)
    ref = shift(x)
    assert ref.abs().max() > 1e-2
    torch.testing.assert_close(m(x), ref, atol=1e-6, rtol=1e-5)
    if kind == "ddlerp":  # a nonzero B makes it data-dependent: the comparison above can fail
        torch.nn.init.normal_(m.lora_b_r.weight)
        assert (m(x) - ref).abs().max() > 1e-3


def test_shiftk_init_weights_and_limit():
    """shiftk K > 2 starts at softmax([0.5, 0, −4, ..]) (documented), and with the old logits at −∞ it
    is shift again; K = 1 has no lookback (weight 1 on the current token)."""
    shift = randomize_(TokenShiftMix(16), std=0.4)
    with torch.no_grad():
        shift.mix_r.fill_(0.5), shift.mix_k.fill_(0.5)
    m = copy_rkv(SoftShiftMix(16, 4), shift)
    w = torch.softmax(torch.tensor([0.5, 0.0, -4.0, -4.0], dtype=torch.float64), 0)
    assert w.tolist() == pytest.approx([0.6140, 0.3724, 0.0068, 0.0068], abs=1e-4)
    torch.testing.assert_close(softmax64(m.mix_r), w[:, None].expand(4, 16))
    x = torch.randn(2, 10, 16)
    assert (m(x) - shift(x)).abs().max() > 1e-4  # not equal at init (documented)
    with torch.no_grad():
        m.mix_r[2:] = -float("inf")
        m.mix_k[2:] = -float("inf")
    torch.testing.assert_close(m(x), shift(x), atol=1e-6, rtol=1e-5)
    one = SoftShiftMix(16, 1)
    assert one.lookback == 0 and torch.all(softmax64(one.mix_r) == 1)
    conv1 = ConvShiftMix(16, 1)
    assert conv1.lookback == 0 and torch.all(conv1.conv_mix_r == 1)
    conv4 = ConvShiftMix(16, 4)
    torch.testing.assert_close(conv4.conv_mix_k[:, 0], torch.tensor([SIG, 1 - SIG, 0.0, 0.0]))


def test_silu_gate_is_pre_activation_times_shift():
    """Same weights: shift_silu_gate's output is (W_r·xr) ⊙ shift's, since SiLU(z) = z·σ(z)."""
    shift = randomize_(TokenShiftMix(16), std=0.4)
    m = copy_rkv(SiLUGateShiftMix(16), shift)
    with torch.no_grad():
        m.mix_r.copy_(shift.mix_r), m.mix_k.copy_(shift.mix_k)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in shift.named_parameters()]  # shift's names
    x = torch.randn(2, 8, 16)
    sr = torch.sigmoid(shift.mix_r)
    xr = sr * x + (1 - sr) * token_shift_ref(x)
    torch.testing.assert_close(m(x), shift.w_r(xr) * shift(x), atol=1e-5, rtol=1e-5)
    assert torch.all(SiLUGateShiftMix(16).mix_r == 0.5)


def tiny_mix_model(token_mix: str, K: int = 4, pattern: str = "TTWT", **kw) -> HybridGPT:
    cfg = ModelConfig(vocab_size=64, num_layers=len(pattern), layer_pattern=pattern, model_dim=32, num_heads=4,
                      num_kv_heads=2, attn_window=4, rope_dims=4, ve_dim=8, bigram_buckets=16, bigram_dim=8,
                      rwkv_head_size=16, mlp_mult=2.0, token_mix=token_mix, token_mix_kernel=K, **kw)
    return HybridGPT(cfg)


def test_token_mix_default_is_conv_and_shift_keeps_the_model_and_its_names():
    """The default T mixer is conv over K = 4 tokens (issue 11's winner, with XSA off); token_mix="shift" is
    TokenShiftMix with its five tensors, nothing new in the state dict, and a shift model never imports
    hybrid/token_mix.py (code bytes) while a default one does."""
    assert ModelConfig().token_mix == "conv" and ModelConfig().token_mix_kernel == 4 and ModelConfig().xsa_last == 0
    assert type(tiny_mix_model("conv").blocks[0].mixer) is ConvShiftMix
    m = tiny_mix_model("shift")
    t_keys = {k for k in m.state_dict() if k.startswith("blocks.0.mixer.")}
    assert t_keys == {f"blocks.0.mixer.{n}" for n in ("mix_r", "mix_k", "w_r.weight", "w_k.weight", "w_v.weight")}
    assert type(m.blocks[0].mixer) is TokenShiftMix
    assert set(m.state_dict()) == set(HybridGPT(dataclasses.replace(m.cfg, token_mix_kernel=2)).state_dict())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for mix, loaded in (("shift", "False"), (None, "True")):
        arg = "" if mix is None else f"token_mix={mix!r}, "
        code = ("import sys; from hybrid.config import ModelConfig; from hybrid.model import HybridGPT; "
                f"HybridGPT(ModelConfig({arg}model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4, ve_dim=8, "
                "bigram_dim=8, mlp_mult=1.0, vocab_size=64)); print('hybrid.token_mix' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == loaded, mix


@pytest.mark.parametrize("kind", [k for k in TOKEN_MIXES if k != "shift"])
def test_token_mix_model_builds_trains_and_init_equals_shift(kind):
    """A tiny model per variant: forward + backward with a gradient on every parameter (randomized, so no
    zero-init path hides one); at init ddlerp/conv equal the shift model with the same weights."""
    torch.manual_seed(1)
    m = tiny_mix_model(kind)
    assert isinstance(m.blocks[0].mixer, type(token_mixer(kind, 8)))
    ids = torch.randint(0, 64, (2, 12))
    loss = m(ids, torch.randint(0, 64, (2, 12)))
    loss.backward()
    assert torch.isfinite(loss)
    randomize_(m, std=0.2)
    m.zero_grad()
    m(ids, torch.randint(0, 64, (2, 12))).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, n
    if kind in ("ddlerp", "conv"):
        fresh = tiny_mix_model(kind)
        shift = tiny_mix_model("shift")
        sd = fresh.state_dict()
        own = shift.state_dict()
        assert {k for k in own if k not in sd} == {f"blocks.{i}.mixer.mix_{b}" for i in (0, 1, 3) for b in "rk"}
        shift.load_state_dict({k: sd.get(k, v) for k, v in own.items()})  # every shared tensor, same values
        torch.testing.assert_close(fresh.forward_logits(ids), shift.forward_logits(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,K", VARIANTS)
def test_token_mix_stateful_chunks_equal_one_forward(kind, K):
    """Stateful evaluation carries the last K−1 (or 1) normed inputs of each T layer: chunks (some shorter
    than the lookback) give the logits of one pass; a fresh state does not."""
    torch.manual_seed(2)
    m = randomize_(tiny_mix_model(kind, K, pattern="TRTT", rwkv_ffn="cmix"), std=0.2).eval()
    x = torch.randint(0, 64, (2, 30))
    full = m.forward_logits(x)
    state, parts = None, []
    for a, b in [(0, 1), (1, 3), (3, 4), (4, 17), (17, 30)]:
        logits, state = m.forward_logits_stateful(x[:, a:b], state)
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert state[1][0][0].shape == (2, m.blocks[0].mixer.lookback, 32)
    halves = [m.forward_logits_stateful(x[:, :15], None)]
    halves.append(m.forward_logits_stateful(x[:, 15:], halves[0][1]))
    torch.testing.assert_close(torch.cat([h[0] for h in halves], dim=1), full, rtol=1e-5, atol=1e-5)
    if m.blocks[0].mixer.lookback:
        assert (m.forward_logits_stateful(x[:, 15:], None)[0] - full[:, 15:]).abs().max() > 1e-3


def test_token_mix_config_validation():
    with pytest.raises(ValueError, match=r"token_mix must be one of .*'shift'.*'ddlerp'.*'conv'.*'shiftk'.*"
                                         r"'shift_silu_gate'.*got 'lerp'"):
        ModelConfig(token_mix="lerp")
    for K in (0, -1, 16):
        with pytest.raises(ValueError, match=f"token_mix_kernel must be in \\[1, 15\\], got {K}"):
            ModelConfig(token_mix="conv", token_mix_kernel=K)
    with pytest.raises(ValueError, match="token_mix"):
        token_mixer("lerp", 8)
    with pytest.raises(ValueError, match="kernel"):
        ConvShiftMix(8, 0)
    ModelConfig(token_mix="shiftk", token_mix_kernel=15)


def test_token_mix_flows_from_hyperparameters():
    """TOKEN_MIX / TOKEN_MIX_KERNEL and --token-mix / --token-mix-kernel reach ModelConfig, like ATTN_WINDOW."""
    from train_gpt import resolve_hyperparameters

    h = resolve_hyperparameters(["--token-mix", "shift", "--token-mix-kernel", "3"], env={})
    assert (h.model_config().token_mix, h.model_config().token_mix_kernel) == ("shift", 3)
    h = resolve_hyperparameters([], env={"TOKEN_MIX": "ddlerp", "TOKEN_MIX_KERNEL": "2"})
    assert (h.token_mix, h.token_mix_kernel) == ("ddlerp", 2)
    h = resolve_hyperparameters([], env={})
    assert (h.token_mix, h.token_mix_kernel, h.xsa_last) == ("conv", 4, 0)
    h = resolve_hyperparameters(["--arch", "moe"], env={})  # the MoE keeps the mixers it was fitted with
    assert (h.token_mix, h.xsa_last) == ("shift", 4)


@pytest.mark.parametrize("kind", ["ddlerp", "conv", "shiftk"])
def test_token_mix_params_get_optimizer_groups_and_export_precision(kind):
    """At full width (C = 512, meta device): LoRA factors are Muon matrices stored as int; the vectors
    and [K, C] taps are Adam control tensors stored in fp32."""
    from hybrid.training.optim import split_params
    from quant.policy import make_precision_fn, tensor_group

    cfg = ModelConfig(token_mix=kind, token_mix_kernel=8)
    with torch.device("meta"):
        m = HybridGPT(cfg)
    emb, mat, sca = split_params(m)
    group = {n: "muon" for n, _ in mat} | {n: "adam" for n, _ in sca} | {n: "emb" for n, _ in emb}
    prec = make_precision_fn()
    seen = {}
    for n, p in m.blocks[0].mixer.named_parameters():
        full = f"blocks.0.mixer.{n}"
        seen[n] = (group[full], prec(full, p).kind, tensor_group(full, p))
    expect = {n: ("muon", "int", "mixer") for n in ("w_r.weight", "w_k.weight", "w_v.weight")}
    if kind == "ddlerp":
        expect |= {n: ("adam", "fp32", "control") for n in ("mu_x", "mu_r", "mu_k")}
        expect |= {n: ("muon", "int", "mixer") for n in ("lora_a.weight", "lora_b_r.weight", "lora_b_k.weight")}
        assert m.blocks[0].mixer.lora_a.weight.shape == (64, 512)  # rank 32 per branch
    else:
        names = ("conv_mix_r", "conv_mix_k") if kind == "conv" else ("mix_r", "mix_k")
        expect |= {n: ("adam", "fp32", "control") for n in names}
        assert getattr(m.blocks[0].mixer, names[0]).shape == (8, 512)
    assert seen == expect


def test_token_mix_compiles_fullgraph():
    """No graph break in the variants' forward or in the stateful step (dynamo only, eager backend)."""
    for kind in ("ddlerp", "conv", "shiftk", "shift_silu_gate"):
        m = randomize_(token_mixer(kind, 16, 3), std=0.4)
        x = torch.randn(2, 6, 16)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(m, backend="eager", fullgraph=True)(x), m(x))
        past = torch.randn(2, m.lookback, 16)
        step = torch.compile(m.step, backend="eager", fullgraph=True)
        for a, b in zip(step(x, past), m.step(x, past)):
            torch.testing.assert_close(a, b)
