"""quant/int6.py (the grid), quant/policy.py and quant/qat.py, on CPU."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from quant.int6 import CLIP_RATIOS, FP16_MIN_NORMAL, _grid, dequantize_rows, fake_quant, qmax
from quant.int6 import quantize_rows, row_scales
from quant.policy import FP16, FP32, RAW, Precision, make_precision_fn, tensor_group, tensor_precision
from quant.qat import set_qat


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so -0.0 vs 0.0 and NaN payloads count as differences."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def adversarial(dtype=torch.float32) -> torch.Tensor:
    """Rows that stress the scale rule: zeros, one huge outlier, tiny values, constants, exact ties."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 40, generator=g) * 0.05
    w[0] = 0.0  # all-zero row: scale floor, q = 0
    w[1, 3] = 1e3  # one outlier dominates the row max
    w[2] *= 1e-7  # far below the fp16 scale floor
    w[3] = 0.5  # constant row
    w[4] = -w[4].abs()  # one-signed row
    w[5, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 31.0, -31.0, 0.25])  # ties on a unit grid
    w[6] *= 1e4  # large but fp16-representable scale
    return w.to(dtype)


def reference_quantize(w: torch.Tensor, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent float64 numpy version of the documented rule (argmin over CLIP_RATIOS per row)."""
    qm = qmax(bits)
    w64 = w.float().double().numpy()
    amax = np.abs(w.float().numpy()).max(axis=1)
    best_q, best_s = [], []
    for r in range(w64.shape[0]):
        errs, cands = [], []
        for ratio in CLIP_RATIOS:
            f = np.float32(ratio / qm)
            s = np.float16(np.clip(np.float32(amax[r]) * f, FP16_MIN_NORMAL, 65504.0))
            q = np.clip(np.round(w64[r] / np.float64(s)), -qm, qm)  # np.round: half to even
            errs.append(((w64[r] - q * np.float64(s)) ** 2).sum())
            cands.append((q, s))
        k = int(np.argmin(errs))  # first minimum: the larger clip on ties
        best_q.append(cands[k][0])
        best_s.append(cands[k][1])
    return np.stack(best_q).astype(np.int8), np.array(best_s, dtype=np.float16)


# ----------------------------------------------------------------------------- the grid

def test_qmax_values_and_bounds():
    assert [qmax(b) for b in range(2, 9)] == [1, 3, 7, 15, 31, 63, 127]
    for bad in (1, 9, 6.0, "6"):
        with pytest.raises(ValueError):
            qmax(bad)


@pytest.mark.parametrize("bits", range(2, 9))
def test_grid_matches_reference_and_error_bound(bits):
    torch.manual_seed(bits)
    w = torch.cat([torch.randn(24, 96) * 0.02, adversarial()[:, :1].expand(-1, 96).contiguous()])
    q, s = quantize_rows(w, bits)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (w.shape[0],)
    qm = qmax(bits)
    assert int(q.abs().max()) <= qm
    assert bool((s.float() >= FP16_MIN_NORMAL).all()) and bool(torch.isfinite(s).all())
    ref_q, ref_s = reference_quantize(w, bits)
    np.testing.assert_array_equal(q.numpy(), ref_q)
    np.testing.assert_array_equal(s.numpy(), ref_s)
    # entries inside the clip are within half a step of their grid point, exactly (float64)
    w64, s64 = w.double(), s.double().unsqueeze(1)
    deq = q.double() * s64
    inside = w64.abs() <= qm * s64
    assert bool(((w64 - deq).abs() <= s64 / 2)[inside].all())


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_clip_search_never_worse_than_row_max(bits):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(64, 1)
    w[::7, 5] *= 20  # outlier rows, where clipping matters
    qm = qmax(bits)
    q, s = quantize_rows(w, bits)
    err = ((q.double() * s.double().unsqueeze(1) - w.double()) ** 2).sum(1)
    s1 = (w.abs().amax(1) * torch.tensor(1.0 / qm)).clamp(FP16_MIN_NORMAL, 65504).half()
    err1 = ((_grid(w, s1, qm).double() * s1.double().unsqueeze(1) - w.double()) ** 2).sum(1)
    assert bool((err <= err1).all())
    if bits <= 6:
        assert bool((err < err1).any())  # and the search does pick smaller clips somewhere


def test_ties_round_half_to_even():
    s = torch.full((1,), 0.25, dtype=torch.float16)
    w = torch.tensor([[0.125, 0.375, 0.625, -0.125, -0.375, -0.625, 0.3750001]])
    assert _grid(w, s, 31).tolist() == [[0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 2.0]]


def test_row_scales_any_dtype_and_shape_checks():
    w = adversarial()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(row_scales(w.to(dtype), 6), row_scales(w.to(dtype).float(), 6))
    for bad in (torch.zeros(4), torch.zeros(2, 0), torch.zeros(2, 3, 4), torch.zeros(3, 3, dtype=torch.int64)):
        with pytest.raises(ValueError):
            row_scales(bad, 6)


# ----------------------------------------------------------------------------- sdclip

def reference_sdclip(w: torch.Tensor, bits: int, k: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 numpy SDClip: s = fp16(fp32(std_row, N - 1) * fp32(k / qmax)), clamped to the normal
    fp16 range; q = round-half-even(w / s) clamped to the grid."""
    qm = qmax(bits)
    w64 = w.float().double().numpy()
    std = np.float32(np.std(w64, axis=1, ddof=1))
    s = np.clip(std * np.float32(k / qm), np.float32(FP16_MIN_NORMAL), np.float32(65504.0)).astype(np.float16)
    q = np.clip(np.round(w64 / s.astype(np.float64)[:, None]), -qm, qm)
    return q.astype(np.int8), s


def test_sdclip_hand_cases():
    """Row [0, 0, 0, 4]: mean 1, squared deviations 1 + 1 + 1 + 9 = 12, std = sqrt(12 / 3) = 2.
    k = 15.5 at int6: s = 15.5 · 2 / 31 = 1, q = w. Row [0, 0, 0, -40]: std 20, s = 10, q = -4.
    k = 1.55: s = fp16(0.1) and 4 / 0.1 = 40 clamps to 31. A constant row has std 0: floor scale."""
    w = torch.tensor([[0.0, 0.0, 0.0, 4.0], [0.0, 0.0, 0.0, -40.0], [0.5, 0.5, 0.5, 0.5]])
    q, s = quantize_rows(w, 6, clip="sdclip", sd_k=15.5)
    assert s.tolist() == [1.0, 10.0, FP16_MIN_NORMAL]
    assert q.tolist() == [[0, 0, 0, 4], [0, 0, 0, -4], [31, 31, 31, 31]]
    q, s = quantize_rows(w[:1], 6, clip="sdclip", sd_k=1.55)
    assert s.tolist() == [float(np.float16(0.1))] and q.tolist() == [[0, 0, 0, 31]]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [3.0, 12.85, 20.0])
def test_sdclip_matches_float64_reference(bits, k):
    torch.manual_seed(bits)
    w = torch.cat([torch.randn(24, 96) * 0.02, adversarial().repeat(1, 3)[:, :96]])
    w[30, 7] = 1.0  # an outlier far beyond k·std: clamped to the grid edge
    q, s = quantize_rows(w, bits, clip="sdclip", sd_k=k)
    ref_q, ref_s = reference_sdclip(w, bits, k)
    np.testing.assert_array_equal(s.numpy(), ref_s)
    np.testing.assert_array_equal(q.numpy(), ref_q)
    assert int(q.abs().max()) <= qmax(bits) and torch.equal(s, row_scales(w, bits, "sdclip", k))
    exact = k * w.double().std(dim=1) / qmax(bits)  # the real-number formula, within fp16 rounding
    free = (exact > 2 * FP16_MIN_NORMAL) & (exact < 60000)
    torch.testing.assert_close(s.double()[free], exact[free], rtol=2.0 ** -11, atol=0)


def empirical_entropy(q: torch.Tensor) -> float:
    _, counts = torch.unique(q, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum())


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_sdclip_larger_k_lowers_entropy(bits):
    """The reason SDClip exists: k trades error for compressed size (≈ bits - log2 k, rec:2026-04-05)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=g) * (0.5 + torch.rand(128, 1, generator=g))
    w += 0.05 * torch.randn(128, 256, generator=g) ** 3  # heavier tails than a Gaussian
    ks = [2.0, 4.0, 8.0, 12.85, 20.0, 40.0]
    entropies = [empirical_entropy(quantize_rows(w, bits, "sdclip", k)[0]) for k in ks]
    assert all(a > b for a, b in zip(entropies, entropies[1:])), entropies
    errors = [float(((dequantize_rows(*quantize_rows(w, bits, "sdclip", k)) - w) ** 2).sum()) for k in ks[2:]]
    assert all(a < b for a, b in zip(errors, errors[1:])), errors  # past the clip regime: steps grow


def test_clip_mode_validation():
    w = torch.randn(4, 8)
    for clip, k in (("max", None), ("sdclip", None), ("sdclip", 0.0), ("sdclip", -1.0),
                    ("sdclip", float("inf")), ("sdclip", float("nan"))):
        with pytest.raises(ValueError):
            row_scales(w, 6, clip, k)
        with pytest.raises(ValueError):
            fake_quant(w, 6, clip, k)
    assert torch.equal(row_scales(w, 6, "mse", 99.0), row_scales(w, 6))  # k is ignored by mse
    one_col = row_scales(torch.tensor([[3.0], [0.0]]), 6, "sdclip", 12.85)
    assert one_col.tolist() == [FP16_MIN_NORMAL, FP16_MIN_NORMAL]  # no spread, no NaN


# ----------------------------------------------------------------------------- fake quant

@pytest.mark.parametrize(("clip", "sd_k"), [("mse", None), ("sdclip", 12.85), ("sdclip", 20.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [5, 6, 8])
def test_fake_quant_forward_is_export_bit_for_bit(dtype, bits, clip, sd_k):
    torch.manual_seed(0)
    for w in (torch.randn(33, 70).to(dtype), adversarial(dtype)):
        expect = dequantize_rows(*quantize_rows(w, bits, clip, sd_k), dtype=dtype)
        out = fake_quant(w, bits, clip, sd_k)
        assert out.dtype == dtype
        assert torch.equal(bits_of(out), bits_of(expect))


@pytest.mark.parametrize(("clip", "sd_k"), [("mse", None), ("sdclip", 12.85)])
def test_fake_quant_gradient_is_identity(clip, sd_k):
    for dtype in (torch.float32, torch.bfloat16):
        w = adversarial(dtype).requires_grad_(True)
        g = torch.randn(w.shape).to(dtype)
        (fake_quant(w, 6, clip, sd_k) * g).sum().backward()
        assert torch.equal(w.grad, g)


SLOW = pytest.mark.skipif(os.environ.get("QUANT_SLOW_TESTS") != "1",
                          reason="another cold CPU compile (~15-25 s); QUANT_SLOW_TESTS=1")


@pytest.mark.parametrize(("dtype", "clip", "sd_k"), [
    (torch.float32, "mse", None),
    pytest.param(torch.bfloat16, "mse", None, marks=SLOW),
    pytest.param(torch.float32, "sdclip", 12.85, marks=SLOW),
])
def test_fake_quant_compiled_matches_eager(dtype, clip, sd_k):
    """Inductor (CPU C++ here) must give the eager bits: this caught inductor eliding the fp16
    rounding of the scales. Forward only, under no_grad: a cold compile costs ~25 s on 2 cores."""
    compiled = torch.compile(fake_quant, fullgraph=True, dynamic=False)
    torch.manual_seed(0)
    w = torch.cat([torch.randn(36, 40) * 0.03, adversarial()]).to(dtype)
    with torch.no_grad():
        assert torch.equal(bits_of(compiled(w, 6, clip, sd_k)), bits_of(fake_quant(w, 6, clip, sd_k)))


# ----------------------------------------------------------------------------- policy

@pytest.mark.parametrize(("name", "shape", "dtype", "expect"), [
    ("tok_emb.weight", (1024, 512), torch.float32, Precision("int", 8)),
    ("bigram.table.weight", (2048, 128), torch.float32, Precision("int", 8)),
    ("ve.table.weight", (1024, 128), torch.float32, Precision("int", 8)),
    ("lm_head.weight", (1024, 512), torch.bfloat16, Precision("int", 8)),
    ("blocks.0.mixer.w_r.weight", (512, 512), torch.float32, Precision("int", 6)),  # "mixer" is not "mix"
    ("blocks.0.mlp.fc.weight", (1536, 512), torch.float32, Precision("int", 6)),
    ("bigram.proj.weight", (512, 128), torch.float32, Precision("int", 6)),
    ("_orig_mod.blocks.3.mixer.c_k.weight", (256, 512), torch.float32, Precision("int", 6)),
    ("blocks.0.mixer.mix_r", (512,), torch.float32, FP32),
    ("blocks.0.resid_mix", (2, 512), torch.float32, FP32),
    ("blocks.0.resid_mixes", (64, 128), torch.float32, FP16),  # control, too big for fp32
    ("skip_weights", (5, 512), torch.float32, FP32),
    ("blocks.3.mixer.q_gain", (8,), torch.float32, FP32),
    ("blocks.9.mixer.ve_scale", (), torch.float32, FP32),
    ("smear.gate", (512,), torch.float32, FP32),
    ("blocks.0.attn_scale", (64, 128), torch.float32, FP16),  # 2-D control tensors are never int
    ("small.weight", (64, 64), torch.float32, FP32),  # numel 4096: not > 4096
    ("thin.weight", (8, 1024), torch.float32, FP16),  # min dim 8 < 16
    ("big_vector", (5000,), torch.float32, FP16),
    ("cube", (16, 16, 32), torch.float32, FP16),
    ("step", (), torch.int64, RAW),
    ("mask", (4, 4), torch.bool, RAW),
])
def test_policy_examples(name, shape, dtype, expect):
    assert tensor_precision(name, torch.zeros(shape, dtype=dtype)) == expect


def test_make_precision_fn_bits():
    fn = make_precision_fn(5, 7)
    assert fn("blocks.0.mlp.fc.weight", torch.zeros(64, 128)) == Precision("int", 5)
    assert fn("tok_emb.weight", torch.zeros(64, 128)) == Precision("int", 7)
    for bad in ((1, 8), (6, 9)):
        with pytest.raises(ValueError):
            make_precision_fn(*bad)


def test_precision_fields_are_backward_compatible():
    p = make_precision_fn(6, 8)("blocks.0.mlp.fc.weight", torch.zeros(64, 128))
    assert p == Precision("int", 6) == ("int", 6, "mse", 0.0) and (p[0], p[1]) == ("int", 6)
    sd = make_precision_fn(6, 8, clip="sdclip")
    assert sd("blocks.0.mlp.fc.weight", torch.zeros(64, 128)) == Precision("int", 6, "sdclip", 12.85)
    assert sd("tok_emb.weight", torch.zeros(64, 128)) == Precision("int", 8, "sdclip", 20.0)
    assert sd("blocks.0.mix_scale", torch.zeros(64)) == FP32  # float kinds carry no clip
    for kwargs in ({"mlp_bits": 9}, {"attn_bits": 1}, {"clip": "max"}, {"clip": "sdclip", "sd_k_embed": 0.0}):
        with pytest.raises(ValueError):
            make_precision_fn(6, 8, **kwargs)


def arch_state(arch: str) -> dict[str, torch.Tensor]:
    """The state dict of a full-size named architecture, on the meta device (no memory, no init)."""
    from hybrid.config import ARCH_DEFAULTS, ModelConfig
    from hybrid.model import HybridGPT

    with torch.device("meta"):
        return HybridGPT(ModelConfig(**ARCH_DEFAULTS[arch])).state_dict()


# (arch, name) -> (group, kind, bits) under make_precision_fn(7, 8, mlp_bits=5, attn_bits=6):
# matrix_bits 7 shows up only where neither group width applies.
GROUP_EXAMPLES = [
    ("hybrid", "tok_emb.weight", "embed", "int", 8),
    ("hybrid", "bigram.table.weight", "embed", "int", 8),
    ("hybrid", "bigram.proj.weight", "other", "int", 7),
    ("hybrid", "ve.proj.weight", "other", "int", 7),
    ("hybrid", "blocks.0.mlp.fc.weight", "mlp", "int", 5),
    ("hybrid", "blocks.0.mlp.proj.weight", "mlp", "int", 5),
    ("hybrid", "blocks.0.mixer.w_r.weight", "mixer", "int", 6),
    ("hybrid", "blocks.3.mixer.c_q.weight", "attn", "int", 6),
    ("hybrid", "blocks.3.mixer.proj.weight", "attn", "int", 6),
    ("hybrid", "blocks.3.mixer.q_gain", "control", "fp32", 32),
    ("hybrid", "blocks.0.resid_mix", "control", "fp32", 32),
    ("hybrid", "smear.gate", "control", "fp32", 32),
    ("gpt", "skip_weights", "control", "fp32", 32),
    ("gpt", "blocks.0.mixer.c_k.weight", "attn", "int", 6),
    ("gpt", "blocks.8.mlp.proj.weight", "mlp", "int", 5),
    ("moe", "blocks.1.mlp.experts.0.fc.weight", "mlp", "int", 5),
    ("moe", "blocks.1.mlp.shared.proj.weight", "mlp", "int", 5),
    ("moe", "blocks.1.mlp.router.weight", "mlp", "fp32", 32),
    ("moe", "blocks.1.mlp.expert_bias", "control", "fp32", 32),
    ("rwkv7", "blocks.0.att.receptance.weight", "mixer", "int", 6),
    ("rwkv7", "blocks.0.att.w1", "mixer", "int", 6),
    ("rwkv7", "blocks.0.att.r_k", "mixer", "fp32", 32),
    ("rwkv7", "blocks.0.ffn.key.weight", "mlp", "int", 5),
    ("rwkv7", "blocks.0.ln1.weight", "control", "fp32", 32),
]


def test_groups_and_mixed_bits_on_real_names():
    fn = make_precision_fn(7, 8, mlp_bits=5, attn_bits=6)
    states = {arch: arch_state(arch) for arch in ("hybrid", "gpt", "moe", "rwkv7")}
    for arch, name, group, kind, bits in GROUP_EXAMPLES:
        t = states[arch][name]
        assert (tensor_group(name, t), *fn(name, t)[:2]) == (group, kind, bits), (arch, name)
        assert tensor_group("_orig_mod." + name, t) == group
    widths = {"embed": {8}, "mlp": {5}, "attn": {6}, "mixer": {6}, "other": {7}}
    for arch, sd in states.items():
        seen = set()
        for name, t in sd.items():
            g, p = tensor_group(name, t), fn(name, t)
            seen.add(g)
            if p.kind == "int":
                assert p.bits in widths[g], (arch, name, g, p)
            if g == "control":
                assert p.kind in ("fp32", "fp16"), (arch, name)
        assert {"embed", "mlp", "control"} <= seen and seen & {"attn", "mixer"}, arch
    default = make_precision_fn(6, 8)  # no group widths: every matrix at matrix_bits, as before
    assert all(default(n, t).bits == 6 for n, t in states["moe"].items()
               if default(n, t).kind == "int" and tensor_group(n, t) != "embed")


# ----------------------------------------------------------------------------- set_qat

class FakeCastedLinear(nn.Module):
    """Duck-typed stand-in for hybrid's CastedLinear: a weight and a `qat_bits` int."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.qat_bits = 0


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(96, 64)  # no qat_bits: untouched
        self.mixer = nn.ModuleDict({"w_r": FakeCastedLinear(128, 64), "w_k": FakeCastedLinear(64, 128)})
        self.tiny = FakeCastedLinear(8, 8)  # fp32 by policy: stays 0
        self.gate_mix = FakeCastedLinear(64, 64)  # control name: stays 0
        self.lm_head = FakeCastedLinear(64, 96)  # embedding bits
        self.norm_gain = nn.Parameter(torch.ones(64))


def test_set_qat_switches_exactly_the_int_modules():
    model = ToyModel()
    fn = make_precision_fn(6, 8)
    assert set_qat(model, True, fn) == 3
    got = {n: m.qat_bits for n, m in model.named_modules() if hasattr(m, "qat_bits")}
    assert got == {"mixer.w_r": 6, "mixer.w_k": 6, "tiny": 0, "gate_mix": 0, "lm_head": 8}
    assert set_qat(model, False, fn) == 0
    assert all(m.qat_bits == 0 for m in model.modules() if hasattr(m, "qat_bits"))
    compiled = torch.compile(model)  # wrapper names carry "_orig_mod."; the policy must not care
    assert set_qat(compiled, True, make_precision_fn(5, 8)) == 3
    assert model.mixer["w_r"].qat_bits == 5 and model.lm_head.qat_bits == 8


def test_default_hybrid_model_policy_and_qat():
    hybrid_model = pytest.importorskip("hybrid.model")
    from hybrid.config import ModelConfig
    from hybrid.layers import CastedLinear

    cfg = ModelConfig(num_layers=4, layer_pattern="TTWF", vocab_size=256, model_dim=128, num_heads=4,
                      num_kv_heads=2, bigram_buckets=256, ve_dim=32)
    model = hybrid_model.HybridGPT(cfg)
    fn = make_precision_fn(6, 8)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, CastedLinear)}
    assert set_qat(model, True, fn) == sum(fn(n + ".weight", m.weight).kind == "int" for n, m in linears.items())
    for n, m in linears.items():
        if n.startswith("blocks.") and min(m.weight.shape) >= 16:
            assert m.qat_bits == 6, n  # every block matrix trains against the int6 grid
    for name, t in model.state_dict().items():
        p = fn(name, t)
        if t.ndim <= 1:
            assert p == FP32, name
        elif name.endswith(".weight") and ("tok_emb" in name or ".table." in name):
            assert p == Precision("int", 8), name
    set_qat(model, False, fn)


def test_qat_forward_equals_the_exported_grid_with_sdclip_and_int5_mlp():
    """Late QAT must train against exactly the grid the exporter writes, whatever the policy: with
    sdclip scales and int5 MLPs, the QAT forward equals the forward of the model whose matrices
    were replaced by their exported (quantized, dequantized) values."""
    hybrid_model = pytest.importorskip("hybrid.model")
    from hybrid.config import ModelConfig
    from quant.int6 import dequantize_rows, quantize_rows

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, layer_pattern="TF", vocab_size=64, model_dim=96, num_heads=2,
                      num_kv_heads=1, bigram_buckets=0, ve_layers="none", mlp_mult=2.0)
    model = hybrid_model.HybridGPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fn = make_precision_fn(6, 8, mlp_bits=5, clip="sdclip", sd_k_matrix=6.0)
    ids = torch.randint(0, 64, (2, 16))
    n = set_qat(model, True, fn)
    assert n > 0 and model.blocks[0].mlp.fc.qat_bits == 5 and model.blocks[0].mixer.w_r.qat_bits == 6
    assert model.blocks[0].mlp.fc.qat_clip == "sdclip"
    with torch.no_grad():
        qat_logits = model.forward_logits(ids)
    set_qat(model, False, fn)
    exported = {}
    for name, t in model.state_dict().items():
        p = fn(name, t)
        if p.kind == "int" and ".blocks." in "." + name:
            exported[name] = dequantize_rows(*quantize_rows(t, p.bits, p.clip, p.sd_k))
    assert len(exported) == n
    model.load_state_dict(exported, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_logits(ids), qat_logits, rtol=0, atol=1e-6)
