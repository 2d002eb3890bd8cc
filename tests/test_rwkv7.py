"""RWKV-7: the WKV-7 recurrence (step-by-step spec, chunked PyTorch, Triton under the interpreter),
the time-mix / block / LM, the reference init, presets, and parity with the `rwkv` PyPI package.

External parity: `rwkv` 0.8.32 from PyPI (BlinkDL's ChatRWKV runtime, `rwkv.model.RWKV_x070`, its
pure-PyTorch per-token path on the CPU in fp32) loads our weights via `rwkv7_reference_state_dict`;
logits and states agree to ~3e-6 (logits of size ~4). Skipped if the package is absent.

Run: python -m pytest -q tests/test_rwkv7.py   (CPU, ~10-25 s)
The Triton and `rwkv` checks run in subprocesses: TRITON_INTERPRET and RWKV_V7_ON are read when those
packages are imported, and the `rwkv` package changes global torch settings on import.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid.layers import CastedLinear
from hybrid.rwkv7 import (
    RWKV7_PRESETS,
    RWKV7LM,
    RWKV7_LORA_NAMES,
    RWKV7ChannelMix,
    RWKV7LoRAQAT,
    RWKV7TimeMix,
    rwkv7_load_reference_state_dict,
    rwkv7_lora_dims,
    rwkv7_param_count,
    rwkv7_reference_state_dict,
)
from hybrid.kernels.wkv7 import wkv7, wkv7_chunked, wkv7_ref

ROOT = Path(__file__).resolve().parents[1]
LOG_DECAY_MIN = -math.exp(-0.5)


def wkv_inputs(B, T, H, N, dtype=torch.float64, seed=0, state=False):
    """RWKV-7-shaped inputs: log decay in (−e^{−1/2}, 0), a = −κ̂, b = κ̂⊙rate with unit κ̂ per head."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.randn(B, T, H, N, generator=g, dtype=dtype)
    r, k, v = rnd(), rnd(), rnd()
    w = LOG_DECAY_MIN * torch.rand(B, T, H, N, generator=g, dtype=dtype)
    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    rate = torch.rand(B, T, H, N, generator=g, dtype=dtype)
    xs = [r, w, k, v, -kk, kk * rate]
    s0 = torch.randn(B, H, N, N, generator=g, dtype=dtype) if state else None
    return xs, s0


def loss_and_grads(fn, xs, s0, seed=1):
    """Random linear functional of (y, final state) and its gradients w.r.t. every input."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    s0 = s0.detach().clone().requires_grad_() if s0 is not None else None
    y, s = fn(*xs, state=s0)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)  # same draw for any dtype
    gs = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)
    loss = (y * gy).sum() + (s * gs).sum()
    grads = torch.autograd.grad(loss, xs + ([s0] if s0 is not None else []))
    return y.detach(), s.detach(), grads


def randomize_(module, std=0.1, seed=0):
    """Perturb every parameter (zero-init ones included) so no path is trivially off."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


# ------------------------------------------------------------------------------------------------
# The recurrence


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [1, 7, 33, 70])
def test_chunked_matches_stepwise_forward_and_grads(T, with_state):
    xs, s0 = wkv_inputs(2, T, 3, 8, state=with_state, seed=T)
    y_ref, s_ref, g_ref = loss_and_grads(wkv7_ref, xs, s0)
    y_chk, s_chk, g_chk = loss_and_grads(lambda *a, state: wkv7_chunked(*a, state=state, chunk_size=16), xs, s0)
    torch.testing.assert_close(y_chk, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s_chk, s_ref, rtol=1e-10, atol=1e-10)
    assert len(g_chk) == len(g_ref) == 6 + with_state
    for gc, gr in zip(g_chk, g_ref):
        torch.testing.assert_close(gc, gr, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_any_chunk_size_and_fp32(chunk):
    xs, s0 = wkv_inputs(1, 45, 2, 16, state=True, seed=3)
    y_ref, s_ref = wkv7_ref(*xs, state=s0)
    y, s = wkv7_chunked(*[x.float() for x in xs], state=s0.float(), chunk_size=chunk)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    scale = y_ref.abs().max()
    assert (y.double() - y_ref).abs().max() < 1e-5 * scale
    assert (s.double() - s_ref).abs().max() < 1e-5 * s_ref.abs().max()


def test_recurrence_ignores_autocast():
    """Under bf16 autocast the recurrence still runs its matmuls in fp32 (decays sit close to 1)."""
    xs, s0 = wkv_inputs(1, 40, 2, 16, dtype=torch.float32, state=True, seed=7)
    for fn in (wkv7_ref, wkv7_chunked):
        y, s = fn(*xs, state=s0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_ac, s_ac = fn(*xs, state=s0)
        assert y_ac.dtype == torch.float32 and s_ac.dtype == torch.float32
        torch.testing.assert_close(y_ac, y, rtol=0, atol=0)
        torch.testing.assert_close(s_ac, s, rtol=0, atol=0)


@pytest.mark.parametrize("fn", [wkv7_ref, wkv7_chunked])
def test_state_carried_across_calls_equals_one_call(fn):
    xs, s0 = wkv_inputs(2, 50, 2, 8, state=True, seed=5)
    y_full, s_full = fn(*xs, state=s0)
    y1, s1 = fn(*[x[:, :19] for x in xs], state=s0)
    y2, s2 = fn(*[x[:, 19:] for x in xs], state=s1)
    torch.testing.assert_close(torch.cat((y1, y2), dim=1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_full, rtol=1e-10, atol=1e-10)


def test_dispatch_and_decay_bounds():
    xs, _ = wkv_inputs(1, 20, 2, 8, seed=2)
    y_auto, _ = wkv7(*xs)  # CPU -> chunked
    y_ref, _ = wkv7(*xs, impl="ref")
    torch.testing.assert_close(y_auto, y_ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="impl"):
        wkv7(*xs, impl="cuda")
    with pytest.raises(ValueError, match="state"):
        wkv7(*xs, state=torch.zeros(1, 2, 8, 4, dtype=torch.float64))
    # Decays pinned at both clamp bounds (d = 0.545 and d = 1) stay exact in the chunked form.
    for w_val in (LOG_DECAY_MIN, 0.0):
        xs_b = list(xs)
        xs_b[1] = torch.full_like(xs[1], w_val)
        torch.testing.assert_close(wkv7_chunked(*xs_b, chunk_size=16)[0], wkv7_ref(*xs_b)[0], rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Triton kernel under the interpreter (CPU)

TRITON_SCRIPT = r"""
import json, torch
from hybrid.kernels.wkv7_triton import TRITON_AVAILABLE, wkv7_triton
from hybrid.kernels.wkv7 import wkv7_ref
from hybrid.rwkv7 import RWKV7TimeMix
from tests.test_rwkv7 import loss_and_grads, wkv_inputs, randomize_
out = {"available": TRITON_AVAILABLE, "cases": []}
for T, chunk, st in ((7, 8, False), (21, 8, True)):
    xs, s0 = wkv_inputs(1, T, 2, 16, state=st, seed=T)
    y_r, s_r, g_r = loss_and_grads(wkv7_ref, xs, s0)
    xs32 = [x.float() for x in xs]
    s032 = s0.float() if s0 is not None else None
    y_t, s_t, g_t = loss_and_grads(lambda *a, state: wkv7_triton(*a, state=state, chunk_size=chunk), xs32, s032)
    rel = lambda a, b: float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12))
    out["cases"].append({"T": T, "y": rel(y_t, y_r), "state": rel(s_t, s_r), "grads": [rel(a, b) for a, b in zip(g_t, g_r)]})
torch.manual_seed(0)
tm = randomize_(RWKV7TimeMix(32, 16, 1, 2, chunk_size=8))
x = torch.randn(2, 19, 32, requires_grad=True)
vf = torch.randn(2, 19, 32)
res = []
for impl in ("chunked", "triton"):
    tm.impl = impl
    o, _, (_, s) = tm(x, vf)
    gx, = torch.autograd.grad(o.square().sum() + s.sum(), x)
    res.append((o.detach(), s.detach(), gx))
out["timemix"] = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(res[1], res[0])]
print("RESULT" + json.dumps(out))
"""


def test_triton_kernel_matches_reference_under_interpreter():
    pytest.importorskip("triton", reason="triton is not installed (pip install triton): kernel test skipped")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["available"]
    for case in out["cases"]:  # fp32 kernel vs float64 spec, errors relative to each tensor's max
        assert case["y"] < 1e-5 and case["state"] < 1e-5, case
        assert max(case["grads"]) < 1e-5, case
        assert len(case["grads"]) == 6 + (case["T"] == 21), case
    assert max(out["timemix"]) < 1e-5, out["timemix"]


# ------------------------------------------------------------------------------------------------
# Modules and model


def test_timemix_is_causal():
    torch.manual_seed(0)
    tm = randomize_(RWKV7TimeMix(32, 8, 1, 3)).double()
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    v_first = torch.randn(2, 40, 32, dtype=torch.float64)
    out, vf, _ = tm(x, v_first)
    assert vf is v_first
    for t in (0, 17, 39):
        x2, v2 = x.clone(), v_first.clone()
        x2[:, t] += 1.0
        v2[:, t] -= 1.0
        out2, _, _ = tm(x2, v2)
        torch.testing.assert_close(out2[:, :t], out[:, :t], rtol=0, atol=1e-12)
        assert (out2[:, t] - out[:, t]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="v_first"):
        tm(x)


def test_lm_is_causal_and_carries_state():
    torch.manual_seed(0)
    m = randomize_(RWKV7LM(64, 32, 2, head_size=8, ffn_hidden=96, chunk_size=8)).double()
    ids = torch.randint(0, 64, (2, 29))
    logits = m.forward_logits(ids)
    assert logits.shape == (2, 29, 64) and logits.dtype == torch.float32
    for t in (0, 13, 28):
        ids2 = ids.clone()
        ids2[:, t] = (ids2[:, t] + 1) % 64
        logits2 = m.forward_logits(ids2)
        torch.testing.assert_close(logits2[:, :t], logits[:, :t], rtol=0, atol=1e-6)
        assert (logits2[:, t] - logits[:, t]).abs().max() > 1e-4
    # A zero state is a fresh sequence; two windows with the carried state equal one pass.
    l0, _ = m.forward_logits(ids, m.initial_state(2))
    torch.testing.assert_close(l0, logits, rtol=0, atol=1e-6)
    la, state = m.forward_logits(ids[:, :11], m.initial_state(2))
    lb, state = m.forward_logits(ids[:, 11:], state)
    torch.testing.assert_close(torch.cat((la, lb), dim=1), logits, rtol=0, atol=1e-6)
    assert len(state) == 2 and state[0][1].shape == (2, 4, 8, 8)


def test_lm_trains_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    m = RWKV7LM(64, 32, 3, head_size=16, ffn_hidden=96, tie=True, logit_softcap=30.0)
    ids = torch.randint(0, 64, (2, 24))
    loss = m(ids[:, :-1], ids[:, 1:])
    assert abs(loss.item() - math.log(64)) < 0.1  # near-uniform at init
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(m(ids[:, :-1], ids[:, 1:]))
    # Big matrices are CastedLinear (QAT hook `qat_bits`); the LoRA factors are plain Parameters with a
    # parameter-free QAT handle each (late QAT off by default).
    block = m.blocks[1]
    for lin in (block.att.receptance, block.att.key, block.att.value, block.att.output, block.ffn.key, block.ffn.value):
        assert isinstance(lin, CastedLinear) and lin.qat_bits == 0
    assert isinstance(block.att.w1, torch.nn.Parameter) and block.att.lora_qat["w1"].qat_bits == 0
    assert not hasattr(m.blocks[0].att, "v1") and hasattr(block.att, "v1")


def test_reference_init_table():
    C, N, L = 128, 64, 4
    for l in (0, 2):
        tm = RWKV7TimeMix(C, N, l, L)
        r1, r0 = 1 - l / L, l / (L - 1)
        for i in (0, 1, 63, 64, 127):  # the reference's per-channel loops, written out
            lin = i / (C - 1) - 0.5
            zz = ((i % N) - (N - 1) / 2) / ((N - 1) / 2)
            zz *= abs(zz)
            www = -6 + 6 * (i / (C - 1)) ** (1 + r0 ** 0.3)
            assert tm.w0[i].item() == pytest.approx(www + 0.5 + 2.5 * zz, abs=1e-6)
            assert tm.x_r[i].item() == pytest.approx(1 - (i / C) ** (0.2 * r1), abs=1e-6)
            assert tm.x_w[i].item() == pytest.approx(1 - (i / C) ** (0.9 * r1), abs=1e-6)
            assert tm.x_k[i].item() == pytest.approx(1 - (i / C) ** (0.7 * r1), abs=1e-6)
            assert tm.a0[i].item() == pytest.approx(-0.19 + 0.3 * zz + 0.4 * lin, abs=1e-6)
            assert tm.k_k[i].item() == pytest.approx(0.71 - 0.1 * lin, abs=1e-6)
            if l > 0:
                assert tm.v0[i].item() == pytest.approx(0.73 - 0.4 * lin, abs=1e-6)
        if l == 0:
            assert tm.w0[0].item() == pytest.approx(-8.0) and tm.w0[C - 1].item() == pytest.approx(3.0)
        decay = torch.exp(LOG_DECAY_MIN * torch.sigmoid(tm.w0))  # at init the LoRA adds 0
        assert decay.min() > math.exp(LOG_DECAY_MIN) and decay.max() < 1
        assert torch.all(tm.k_a == 1.02) and torch.all(tm.r_k == -0.04)
        assert torch.all(tm.ln_x.weight == ((l + 1) / L) ** 0.7) and torch.all(tm.ln_x.bias == 0)
        assert torch.all(tm.output.weight == 0) and torch.all(tm.w1 == 0) and torch.all(tm.g1 == 0)
        for w2 in (tm.w2, tm.a2, tm.g2):  # orthogonal rows, gain 0.1
            torch.testing.assert_close(w2 @ w2.T, 0.01 * torch.eye(w2.size(0)), rtol=0, atol=1e-5)
        assert tm.key.weight.abs().max() <= 0.05 / math.sqrt(C)
        assert tm.receptance.weight.abs().max() <= 0.5 / math.sqrt(C)
        ffn = RWKV7ChannelMix(C, 4 * C, l, L)
        assert torch.all(ffn.value.weight == 0)
        assert ffn.x_k[5].item() == pytest.approx(1 - (5 / C) ** (r1 ** 4), abs=1e-6)
    assert rwkv7_lora_dims(512) == {"w": 64, "a": 64, "v": 32, "g": 128}
    assert rwkv7_lora_dims(768) == {"w": 64, "a": 64, "v": 32, "g": 128}
    m = RWKV7LM(256, 64, 2, head_size=16)
    assert m.emb.weight.abs().max() <= 1e-4
    gain = 0.5 * math.sqrt(256 / 64)
    torch.testing.assert_close(m.head.weight.T @ m.head.weight, gain ** 2 * torch.eye(64), rtol=0, atol=1e-4)


def test_presets_param_counts_on_meta():
    with torch.device("meta"):
        big = RWKV7LM(**RWKV7_PRESETS["rwkv7-191m"])
        golf = RWKV7LM(**RWKV7_PRESETS["golf"])
    n_big = sum(p.numel() for p in big.parameters())
    assert abs(n_big - 191e6) / 191e6 < 0.03, n_big
    assert n_big == rwkv7_param_count(**RWKV7_PRESETS["rwkv7-191m"])
    # The README formula 2VD + 4D + L(19D + 12D² + 2D(64+32+64+128)) counts layer 0's unused v LoRA too.
    V, D, L = 65536, 768, 12
    assert n_big + D + 2 * D * 32 == 2 * V * D + 4 * D + L * (19 * D + 12 * D * D + 2 * D * (64 + 32 + 64 + 128))
    n_golf = sum(p.numel() for p in golf.parameters())
    assert n_golf == rwkv7_param_count(**RWKV7_PRESETS["golf"])
    emb = golf.emb.weight.numel()
    vectors = sum(p.numel() for p in golf.parameters() if p.dim() == 1) + sum(b.att.r_k.numel() for b in golf.blocks)
    est = 0.6 * (n_golf - emb - vectors) + 1.0 * emb + 2.0 * vectors  # int6 matrices, int8 emb, fp16 vectors
    assert est < 15_500_000, est
    golf.to_empty(device="cpu")
    golf.init_weights()
    assert torch.isfinite(golf.blocks[3].att.w0).all() and torch.all(golf.blocks[3].att.output.weight == 0)


def test_reference_state_dict_round_trip():
    m = randomize_(RWKV7LM(64, 32, 2, head_size=16, ffn_hidden=64))
    ref = rwkv7_reference_state_dict(m)
    assert ref["blocks.1.att.x_r"].shape == (1, 1, 32) and ref["blocks.0.att.v1"].shape == (32, 32)
    assert ref["blocks.0.ln0.weight"].shape == (32,) and ref["blocks.1.att.r_k"].shape == (2, 16)
    m2 = RWKV7LM(64, 32, 2, head_size=16, ffn_hidden=64)
    rwkv7_load_reference_state_dict(m2, ref)
    ids = torch.randint(0, 64, (1, 10))
    torch.testing.assert_close(m2.forward_logits(ids), m.forward_logits(ids), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Late QAT of the LoRA factors (quant.qat.set_qat reaches them through RWKV7LoRAQAT handles)

TIMEMIX_KEYS = ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a", "w1", "w2", "a1", "a2", "g1",
                "g2", "r_k", "receptance.weight", "key.weight", "value.weight", "output.weight", "ln_x.weight",
                "ln_x.bias"]


def test_lora_qat_handles_leave_state_dict_and_parameters_as_they_were():
    m = RWKV7LM(64, 128, 2, head_size=64, ffn_hidden=256)
    keys = list(m.state_dict())
    assert keys == [n for n, _ in m.named_parameters()]  # no buffers, no extra entries
    assert not any("lora_qat" in k for k in keys)
    for layer, extra in ((0, []), (1, ["v0", "v1", "v2"])):
        prefix = f"blocks.{layer}.att."
        assert sorted(k[len(prefix):] for k in keys if k.startswith(prefix)) == sorted(TIMEMIX_KEYS + extra)
        att = m.blocks[layer].att
        assert sorted(att.lora_qat) == sorted(n for n in RWKV7_LORA_NAMES if hasattr(att, n))
        assert all(h.weight is getattr(att, n) for n, h in att.lora_qat.items())
    assert sum(p.numel() for p in m.parameters()) == rwkv7_param_count(64, 128, 2, 64, 256)


def test_lora_qat_handles_follow_rebuilt_and_copied_parameters():
    with torch.device("meta"):
        m = RWKV7LM(64, 128, 2, head_size=64, ffn_hidden=256)
    m.to_empty(device="cpu")
    m.init_weights()
    att = m.blocks[1].att
    assert att.lora_qat["g2"].weight is att.g2 and att.lora_qat["g2"].weight.device.type == "cpu"
    twin = copy.deepcopy(m).blocks[1].att
    assert twin.lora_qat["w1"].weight is twin.w1 and twin.w1 is not att.w1
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    assert att.lora_qat["a1"].weight is att.a1


def qat_model(kind: str) -> torch.nn.Module:
    """Models where the policy sends some LoRA factors to the int grid and keeps others in float."""
    torch.manual_seed(0)
    if kind == "lm":  # untied: emb (nn.Embedding, never fake-quantized) and head (CastedLinear)
        # C=128: w1 [128, 48] and g1 [128, 64] are > 4096 values (int); a1 [128, 32] and v1 [128, 16] are not.
        return randomize_(RWKV7LM(64, 128, 2, head_size=64, ffn_hidden=256,
                                  lora={"w": 48, "a": 32, "v": 16, "g": 64}), std=0.1, seed=5)
    from hybrid.config import ARCH_DEFAULTS, ModelConfig
    from hybrid.model import HybridGPT

    # the trainer's --arch rwkv7 model, narrower: at C=192 every LoRA factor is int; tied tok_emb int8.
    cfg = ModelConfig(**dict(ARCH_DEFAULTS["rwkv7"], model_dim=192, num_layers=2, layer_pattern="RR"))
    return randomize_(HybridGPT(cfg), std=0.1, seed=5)


def qat_target(name: str, module: torch.nn.Module) -> str:
    """The state-dict name of the tensor a QAT module fake-quantizes."""
    if isinstance(module, RWKV7LoRAQAT):
        return name.rsplit(".lora_qat.", 1)[0] + "." + module.param_name
    return name + ".weight"


# (model, precision policy): int6; int5; int6 with the att/mixer group at int7, the channel-mix at int5
# and SDClip row scales (the policy decides per state-dict name, so the handles must be asked alike).
QAT_CASES = [("lm", dict(matrix_bits=6)), ("lm", dict(matrix_bits=5)), ("arch", dict(matrix_bits=6)),
             ("arch", dict(matrix_bits=6, mlp_bits=5, attn_bits=7, clip="sdclip"))]


@pytest.mark.parametrize("kind, policy", QAT_CASES)
def test_set_qat_fake_quantizes_exactly_the_int_tensors(kind, policy):
    from quant.int6 import dequantize_rows, quantize_rows
    from quant.policy import make_precision_fn
    from quant.qat import set_qat

    model = qat_model(kind)
    precision = make_precision_fn(embed_bits=8, **policy)
    sd = model.state_dict()
    embedding_owned = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    want = {n: precision(n, t) for n, t in sd.items()
            if precision(n, t).kind == "int" and n not in embedding_owned}
    lora_int = {n.rsplit(".", 1)[-1] for n in want if n.rsplit(".", 1)[-1] in RWKV7_LORA_NAMES}
    assert lora_int == ({"w1", "w2", "g1", "g2"} if kind == "lm" else set(RWKV7_LORA_NAMES))
    assert embedding_owned & {n for n, t in sd.items() if precision(n, t).kind == "int"}  # skipped on purpose

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(6))
    plain = model.forward_logits(ids).detach()
    assert set_qat(model, True, precision) == len(want)
    on = {qat_target(n, m): ("int", m.qat_bits, m.qat_clip, m.qat_sd_k)
          for n, m in model.named_modules() if getattr(m, "qat_bits", 0) > 0}
    assert on == {n: tuple(p) for n, p in want.items()}
    if "attn_bits" in policy:  # the LoRA factors sit in the policy's "mixer" group, at its width
        assert {p.bits for n, p in want.items() if n.rsplit(".", 1)[-1] in RWKV7_LORA_NAMES} == {7}

    # The QAT forward is the forward of the exported (dequantized) weights (to 1e-6: the same values,
    # but in other buffers, which CPU BLAS may sum in another order) ...
    reference = copy.deepcopy(model)
    set_qat(reference, False, precision)
    with torch.no_grad():
        for n, p in want.items():
            t = reference.get_parameter(n)
            t.copy_(dequantize_rows(*quantize_rows(t, p.bits, p.clip, p.sd_k), dtype=t.dtype))
    out = model.forward_logits(ids)
    ref_out = reference.forward_logits(ids)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    assert (out - plain).abs().max() > 1e-4  # ... which differs from the float model
    # ... and the straight-through gradient of each factor is the dequantized model's gradient.
    out.square().mean().backward()
    ref_out.square().mean().backward()
    for n in want:
        torch.testing.assert_close(model.get_parameter(n).grad, reference.get_parameter(n).grad, rtol=0, atol=1e-6)

    assert set_qat(model, False, precision) == 0
    assert all(h.qat_bits == 0 for h in model.modules() if isinstance(h, RWKV7LoRAQAT))
    torch.testing.assert_close(model.forward_logits(ids), plain, rtol=1e-6, atol=1e-6)


def test_lora_qat_traces_fullgraph():
    from quant.policy import make_precision_fn
    from quant.qat import set_qat

    tm = randomize_(RWKV7TimeMix(128, 64, 1, 2, lora={"w": 48, "a": 32, "v": 16, "g": 64}), std=0.1)
    x = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(7))
    vf = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(8))
    compiled = torch.compile(tm, backend="eager", fullgraph=True, dynamic=False)  # dynamo only: guards + graph breaks
    plain = compiled(x, vf)[0]
    assert set_qat(tm, True, make_precision_fn(6, 8)) == 4 + 4  # 4 CastedLinear + w1 w2 g1 g2
    quantized = compiled(x, vf)[0]  # the int attribute is guarded: a recompile, not a stale graph
    torch.testing.assert_close(quantized, tm(x, vf)[0], rtol=0, atol=1e-6)
    assert not torch.equal(quantized, plain)


# ------------------------------------------------------------------------------------------------
# Parity with an implementation no one here wrote: the `rwkv` package (BlinkDL's ChatRWKV runtime)

RWKV_PKG_SCRIPT = r"""
import sys, torch
from rwkv.model import RWKV  # RWKV_V7_ON=1 selects RWKV_x070; RWKV_CUDA_ON=0: pure-PyTorch per-token loop
d = sys.argv[1]
m = RWKV(model=d + "/model", strategy="cpu fp32")
ids = torch.load(d + "/ids.pt").tolist()
logits, state = m.forward(ids, None, full_output=True)
la, st = m.forward(ids[:9], None, full_output=True)
lb, st = m.forward(ids[9:], st, full_output=True)
torch.save({"logits": logits, "state": state, "split": torch.cat((la, lb)), "split_state": st}, d + "/theirs.pt")
"""


def test_logits_match_rwkv_package(tmp_path):
    if importlib.util.find_spec("rwkv") is None:
        pytest.skip("the `rwkv` package is not installed (pip install rwkv): external parity skipped")
    version = importlib.metadata.version("rwkv")
    torch.manual_seed(0)
    # head_size 64 (the package's ln_x eps is a fixed 64e-5 = 1e-5·64); 2 layers, dim 128, vocab 128.
    m = randomize_(RWKV7LM(128, 128, 2, head_size=64, ffn_hidden=256), std=0.1, seed=3)
    torch.save(rwkv7_reference_state_dict(m), tmp_path / "model.pth")
    ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(4))
    torch.save(ids, tmp_path / "ids.pt")
    env = dict(os.environ, RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
    proc = subprocess.run([sys.executable, "-c", RWKV_PKG_SCRIPT, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"rwkv {version}: {proc.stderr[-3000:]}"
    theirs = torch.load(tmp_path / "theirs.pt")
    with torch.no_grad():
        ours, state = m.forward_logits(ids[None], m.initial_state(1))
    ours = ours[0]
    assert ours.abs().max() > 1.0  # a non-degenerate model
    # Their decay constant is the rounded 0.606531 (vs e^{-1/2} = 0.60653066): ~1e-6 relative.
    torch.testing.assert_close(theirs["logits"], ours, rtol=0, atol=2e-5, msg=f"rwkv {version} logits")
    torch.testing.assert_close(theirs["split"], ours, rtol=0, atol=2e-5, msg=f"rwkv {version} split logits")
    for layer, (att_shift, wkv_state, ffn_shift) in enumerate(state):  # their state: shift, [H,N,N], shift
        for j, mine in enumerate((att_shift, wkv_state, ffn_shift)):
            for key in ("state", "split_state"):
                torch.testing.assert_close(theirs[key][3 * layer + j], mine[0], rtol=0, atol=2e-5,
                                           msg=f"rwkv {version} state {layer}.{j}")
