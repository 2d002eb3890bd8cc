"""HybridGPT and ModelConfig on CPU: parameter counts, config validation, causality, init, training.

Run: python -m pytest -q tests/test_model.py
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_
from hybrid.config import ARCH_DEFAULTS, ModelConfig, parse_layer_pattern
from hybrid.layers import CastedLinear, CausalAttention, TokenShiftMix
from hybrid.model import HybridGPT, count_params


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_cfg(**kw) -> ModelConfig:
    """Every hybrid feature on (T/W/F layers, XSA, VE, smear, bigram, LN scale) at toy size."""
    base = {"vocab_size": 96, "num_layers": 4, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2,
            "layer_pattern": "TTWF", "attn_window": 4, "rope_dims": 8, "xsa_last": 2, "ve_dim": 16,
            "bigram_buckets": 64, "bigram_dim": 16}
    return ModelConfig(**{**base, **kw})


def tiny_gpt_cfg(**kw) -> ModelConfig:
    base = {**ARCH_DEFAULTS["gpt"], "vocab_size": 96, "num_layers": 5, "model_dim": 64, "num_heads": 4,
            "num_kv_heads": 2, "layer_pattern": "FFFFF"}
    return ModelConfig(**{**base, **kw})


def expected_params(cfg: ModelConfig) -> int:
    """The parameter count written out from the architecture description."""
    C, V, L, H = cfg.model_dim, cfg.vocab_size, cfg.num_layers, cfg.num_heads
    D = C // H
    kv = cfg.num_kv_heads * D
    hidden = int(cfg.mlp_mult * C)
    per_block = 2 * C * hidden + 2 * C + 2 * C  # MLP fc+proj, mix/mlp scales, resid_mix
    K, R = cfg.token_mix_kernel, min(32, max(1, C // 4))
    taps = {"shift": 2 * C, "shift_silu_gate": 2 * C,  # mix_r, mix_k
            "conv": 2 * K * C, "shiftk": 2 * K * C,  # [K, C] per branch
            "ddlerp": 3 * C + C * 2 * R + 2 * R * C}[cfg.token_mix]  # μ_x, μ_r, μ_k, A, B_r, B_k
    token_shift = 3 * C * C + taps  # W_r, W_k, W_v and the token mixing
    attn = 2 * C * C + 2 * C * kv + H + (2 * D if cfg.qk_norm_gain else 0)  # c_q, proj, c_k, c_v, gains
    n_t = cfg.layer_pattern.count("T")
    total = V * C + n_t * (token_shift + per_block) + (L - n_t) * (attn + per_block)
    if cfg.bigram_buckets:
        total += cfg.bigram_buckets * cfg.bigram_dim + cfg.bigram_dim * C + 1
    if cfg.smear:
        total += C
    n_ve = len(cfg.ve_layer_ids)
    if n_ve:
        total += V * cfg.ve_dim + cfg.ve_dim * kv + 1 + n_ve  # table, proj, shared scale, per-layer scales
    if cfg.unet_skips:
        total += (L // 2) * C
    return total


# ---- parameter counts ----------------------------------------------------------------------------

def test_gpt_arch_is_the_naive_baseline_exactly():
    cfg = ModelConfig(**ARCH_DEFAULTS["gpt"])
    with torch.device("meta"):
        model = HybridGPT(cfg)
    assert count_params(model) == 17_059_912  # the baseline's logged model_params (rec:2026-03-17_NaiveBaseline)
    assert expected_params(cfg) == 17_059_912
    assert all(b.kind == "F" for b in model.blocks) and model.skip_weights.shape == (4, 512)
    assert cfg.rotary_dims == cfg.head_dim == 64  # full RoPE
    assert model.bigram is None and model.smear is None and model.ve is None


def test_hybrid_default_param_count_matches_formula():
    cfg = ModelConfig()
    assert cfg == ModelConfig(**ARCH_DEFAULTS["hybrid"])
    with torch.device("meta"):
        model = HybridGPT(cfg)
    # MLP3x (hidden 1536): 21,496,868 at hidden 896 plus 12 layers × 2 × 512 × (1536 − 896) = 29,361,188
    # with the one-token lerp; the conv mixer's taps add 8 T layers × 2 × (4 − 1) × 512
    assert count_params(model) == expected_params(cfg) == 29_361_188 + 24_576
    assert cfg.attn_layers == [3, 6, 9, 11] and cfg.xsa_layer_ids == [] and cfg.ve_layer_ids == [9, 11]
    assert ModelConfig(xsa_last=4).xsa_layer_ids == [3, 6, 9, 11]
    for mix in ("shift", "ddlerp", "shiftk", "shift_silu_gate"):
        other = ModelConfig(token_mix=mix)
        with torch.device("meta"):
            assert count_params(HybridGPT(other)) == expected_params(other), mix
    assert [b.mixer.window for b in model.blocks if b.kind != "T"] == [128, 128, 128, None]


@pytest.mark.parametrize("mlp_mult", [2.0, 2.5, 3.0])
def test_param_formula_across_mlp_widths(mlp_mult):
    cfg = ModelConfig(mlp_mult=mlp_mult)
    with torch.device("meta"):
        assert count_params(HybridGPT(cfg)) == expected_params(cfg)
    assert cfg.mlp_hidden == int(mlp_mult * 512)


# ---- config validation ---------------------------------------------------------------------------------

def test_saved_settings_keep_the_defaults_of_their_day():
    """Issue 11 changed two defaults (T mixer shift -> conv, the hybrid's XSA 4 -> 0). A saved run that lacks
    the field, or holds the old unset mark, is read with the former value; a resolved value is kept."""
    from hybrid.config import FORMER_DEFAULTS, as_saved, model_config_from

    assert FORMER_DEFAULTS["hybrid"] == {"token_mix": "shift", "xsa_last": 4}
    old = {"arch": "hybrid", "xsa_last": -1}  # a log from before the resolved values were stored
    assert as_saved(old) == {"arch": "hybrid", "xsa_last": 4, "token_mix": "shift"}
    cfg = model_config_from("hybrid", as_saved(old))
    assert (cfg.token_mix, cfg.xsa_layer_ids) == ("shift", [3, 6, 9, 11])
    new = {"token_mix": "conv", "xsa_last": 0}
    assert as_saved(new) == new and as_saved({**new, "arch": "gpt"}) == {**new, "arch": "gpt"}
    gpt_old = {"arch": "gpt", "xsa_last": ""}  # gpt pins its own XSA: only the T mixer is restored
    assert as_saved(gpt_old) == {**gpt_old, "token_mix": "shift"}
    # a record's logged model_config from before TOKEN_MIX rebuilds the shift model it holds, strictly
    from records.verify import build_model

    logged = dataclasses.asdict(tiny_cfg(token_mix="shift"))
    state = HybridGPT(tiny_cfg(token_mix="shift")).state_dict()
    del logged["token_mix"]
    assert isinstance(build_model(logged, state).blocks[0].mixer, TokenShiftMix)


def test_parse_layer_pattern():
    assert parse_layer_pattern("TWF", 3) == ["T", "W", "F"]
    with pytest.raises(ValueError, match=r"invalid letter.*\['X'\].*T = token-shift"):
        parse_layer_pattern("TXF", 3)
    with pytest.raises(ValueError, match=r"has 3 letters but num_layers is 4"):
        parse_layer_pattern("TWF", 4)
    with pytest.raises(ValueError, match="invalid letter"):
        parse_layer_pattern("twf", 3)


@pytest.mark.parametrize("kw,match", [
    ({"layer_pattern": "TTW"}, "num_layers is 4"),
    ({"layer_pattern": "TTWQ"}, "allowed letters"),
    ({"model_dim": 66}, "divisible by num_heads"),
    ({"num_kv_heads": 3}, "divisible by num_kv_heads"),
    ({"rope_dims": 7}, "rope_dims"),
    ({"rope_dims": 32}, "rope_dims"),
    ({"mlp_mult": 2.01}, "whole number"),
    ({"mlp_act": "gelu"}, "mlp_act"),
    ({"ve_layers": "0"}, "not an attention layer"),
    ({"ve_layers": "2,2"}, "repeats"),
    ({"ve_layers": "a,b"}, "comma list"),
    ({"attn_window": 0}, "attn_window"),
    ({"bigram_buckets": 1}, "bigram_buckets"),
    ({"xsa_last": -1}, "xsa_last"),
])
def test_invalid_config_raises_helpful_error(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_cfg(**kw)


def test_config_layer_selection():
    cfg = tiny_cfg(xsa_last=10, ve_layers="2")
    assert cfg.xsa_layer_ids == [2, 3] and cfg.ve_layer_ids == [2]
    assert tiny_cfg(xsa_last=0).xsa_layer_ids == [] and tiny_cfg(ve_layers="none").ve_layer_ids == []
    assert tiny_cfg(layer_pattern="TTTT", ve_layers="").ve_layer_ids == []


# ---- behaviour ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make_cfg", [tiny_cfg, tiny_gpt_cfg], ids=["hybrid", "gpt"])
def test_model_causality(make_cfg):
    """Changing token t never changes the logits at positions < t (windowed layers, bigram, smear, VE,
    U-Net skips included), and does change the logits at t."""
    torch.manual_seed(0)
    model = randomize_(HybridGPT(make_cfg()), std=0.2)
    T = 24
    ids = torch.randint(2, 96, (2, T))
    base = model.forward_logits(ids)
    for t in (0, 1, 5, T // 2, T - 1):
        ids2 = ids.clone()
        ids2[:, t] = (ids2[:, t] + 7) % 96
        out = model.forward_logits(ids2)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-5, rtol=0)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-4


@pytest.mark.parametrize("make_cfg", [tiny_cfg, tiny_gpt_cfg], ids=["hybrid", "gpt"])
def test_loss_at_init_is_log_vocab_and_matches_logits(make_cfg):
    torch.manual_seed(0)
    model = HybridGPT(make_cfg())
    ids, tgt = torch.randint(0, 96, (4, 32)), torch.randint(0, 96, (4, 32))
    loss = model(ids, tgt)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - math.log(96)) < 0.05
    logits = model.forward_logits(ids)
    assert logits.shape == (4, 32, 96) and logits.dtype == torch.float32
    assert logits.abs().max() <= model.cfg.logit_softcap
    torch.testing.assert_close(F.cross_entropy(logits.reshape(-1, 96), tgt.reshape(-1)), loss)


@pytest.mark.parametrize("make_cfg", [tiny_cfg, tiny_gpt_cfg], ids=["hybrid", "gpt"])
def test_overfits_one_batch(make_cfg):
    torch.manual_seed(0)
    model = HybridGPT(make_cfg())
    ids = torch.randint(0, 96, (4, 32))
    tgt = torch.roll(ids, -1, dims=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = model(ids, tgt)
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())


def test_every_parameter_gets_a_gradient():
    model = randomize_(HybridGPT(tiny_cfg()), std=0.2)
    ids = torch.randint(0, 96, (2, 16))
    model(ids, torch.roll(ids, -1, 1)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


# ---- init ----------------------------------------------------------------------------------------

def test_init_weights_sets_every_parameter_per_the_table():
    cfg = tiny_cfg()
    with torch.device("meta"):
        model = HybridGPT(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert abs(model.tok_emb.weight.std().item() - cfg.tied_embed_init_std) < 0.001
    for name, m in model.named_modules():
        if not isinstance(m, CastedLinear):
            continue
        w = m.weight
        if m._zero_init:
            assert torch.all(w == 0), name
        elif min(w.shape) < 64:  # c_k/c_v (32 wide here), bigram/VE proj (16): PyTorch default
            assert w.abs().max() <= 1 / math.sqrt(w.shape[1]), name
        else:  # orthogonal: the smaller Gram matrix is the identity
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-4, rtol=0)
    blk = model.blocks[0]
    sig = 1 / (1 + math.exp(-0.5))  # the conv taps start as the lerp: σ(0.5) now, 1 − σ(0.5) one token back
    assert type(blk.mixer).__name__ == "ConvShiftMix"
    for w in (blk.mixer.conv_mix_r, blk.mixer.conv_mix_k):
        torch.testing.assert_close(w, torch.tensor([sig, 1 - sig, 0.0, 0.0]).unsqueeze(1).expand(4, 64))
    shift_blk = HybridGPT(tiny_cfg(token_mix="shift")).blocks[0]
    assert isinstance(shift_blk.mixer, TokenShiftMix) and torch.all(shift_blk.mixer.mix_r == 0.5)
    assert torch.equal(blk.resid_mix, torch.stack((torch.ones(64), torch.zeros(64))))
    attn = model.blocks[3].mixer
    assert isinstance(attn, CausalAttention) and cfg.qk_gain_init == 4.0 and torch.all(attn.q_gain == 4.0) and attn.ve_scale.item() == 1.0
    assert torch.all(model.bigram.table.weight == 0) and torch.all(model.smear.gate == 0)
    # with 64-wide side tables the records' scaled orthogonal init applies
    wide = HybridGPT(tiny_cfg(bigram_dim=64, ve_dim=64))
    p = wide.bigram.proj.weight  # (64, 64)
    torch.testing.assert_close(p @ p.T, torch.eye(64) / (2 * 4), atol=1e-4, rtol=0)


def test_gpt_init_is_pytorch_default_with_zero_outputs():
    model = HybridGPT(tiny_gpt_cfg())
    fc = model.blocks[0].mlp.fc.weight  # kaiming-uniform(a=√5): U(-1/sqrt(in), 1/sqrt(in))
    assert fc.abs().max() <= 1 / math.sqrt(64) and fc.std() > 0.5 / math.sqrt(3 * 64)
    assert torch.all(model.blocks[0].mixer.proj.weight == 0) and torch.all(model.blocks[0].mlp.proj.weight == 0)
    assert torch.all(model.skip_weights == 1)


# ---- compile and QAT ----------------------------------------------------------------------------------

def test_compiles_fullgraph_and_matches_eager():
    """No graph breaks (fullgraph=True, dynamic=False); aot_eager keeps the CPU test fast."""
    torch.manual_seed(0)
    model = randomize_(HybridGPT(tiny_cfg()), std=0.2)
    ids = torch.randint(0, 96, (2, 16))
    tgt = torch.roll(ids, -1, 1)
    eager = model(ids, tgt)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    out = compiled(ids, tgt)
    out.backward()
    torch.testing.assert_close(out, eager)


def test_qat_path_changes_little_and_keeps_gradients():
    if importlib.util.find_spec("quant") is None or importlib.util.find_spec("quant.int6") is None:
        pytest.skip("quant.int6 not written yet")
    torch.manual_seed(0)
    model = randomize_(HybridGPT(tiny_cfg()), std=0.05)
    ids = torch.randint(0, 96, (2, 16))
    tgt = torch.roll(ids, -1, 1)
    ref = model.forward_logits(ids).detach()
    for m in model.modules():
        if isinstance(m, CastedLinear):
            m.qat_bits = 6
    logits = model.forward_logits(ids)
    assert not torch.equal(logits, ref)
    assert (logits - ref).abs().max() < 0.1 * ref.abs().max()
    F.cross_entropy(logits.reshape(-1, 96), tgt.reshape(-1)).backward()
    for name, m in model.named_modules():
        if isinstance(m, CastedLinear):
            assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, name


def test_config_replace_revalidates():
    with pytest.raises(ValueError, match="num_layers"):
        dataclasses.replace(tiny_cfg(), num_layers=5)
