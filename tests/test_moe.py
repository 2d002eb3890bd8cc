"""MoE layer (hybrid/moe.py) and the MoE presets (hybrid/moe_presets.py), on CPU.

Dispatch vs the dense reference, droplessness, bias balancing, aux losses by hand, no cross-token
leakage, parity with Hugging Face transformers' Mixtral / Qwen2-MoE / DeepSeek-V3 MoE blocks, and
the seed presets' parameter counts built on the meta device.

Run: python -m pytest -q tests/test_moe.py
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from hybrid.moe import MoEConfig, MoEFFN, grouped_mm_available, moe_ref, update_expert_biases
from hybrid.moe_presets import (
    MoELMConfig,
    MoETransformer,
    count_active_params,
    count_total_params,
    estimate_artifact_bytes,
    moe_preset,
    ntk_rope_base,
    param_breakdown,
)


def _cpu_grouped_mm_works() -> bool:
    """torch._grouped_mm exists and runs on CPU fp32 (torch 2.13 has a CPU fallback; older CUDA
    builds may only run it on GPU)."""
    if not grouped_mm_available():
        return False
    try:
        a, b = torch.randn(4, 8), torch.randn(2, 8, 8)
        torch._grouped_mm(a, b, offs=torch.tensor([1, 4], dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


CPU_GROUPED = _cpu_grouped_mm_works()
NO_CPU_GROUPED = f"torch {torch.__version__}: torch._grouped_mm is missing or does not run on CPU"

QUIET = {"aux_loss_coef": 0.0, "z_loss_coef": 0.0, "bias_balancing": False}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_moe(dim: int = 16, dtype=torch.float32, std: float = 0.3, **kw) -> MoEFFN:
    """MoEFFN with every parameter random (zero-init projections included), so no path is off."""
    cfg = {"num_experts": 6, "top_k": 2, "expert_hidden": 12, "num_shared_experts": 0, "activation": "swiglu"}
    cfg.update(kw)
    moe = MoEFFN(dim, MoEConfig(**cfg)).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, std)
    return moe


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


# ---- dispatch vs reference ------------------------------------------------------------------

DISPATCH_CASES = [("loop", torch.float64), ("grouped", torch.float32)]


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("mode,dtype", DISPATCH_CASES)
def test_dispatch_matches_dense_reference(router, shared, mode, dtype):
    if mode == "grouped" and not CPU_GROUPED:
        pytest.skip(NO_CPU_GROUPED)
    moe = make_moe(dtype=dtype, router=router, num_shared_experts=shared, shared_hidden=10, shared_gate=shared > 0,
                   norm_topk_prob=True, routed_scaling_factor=1.7, dispatch=mode, balance_loss="sequence",
                   aux_loss_coef=0.01, z_loss_coef=1e-3)
    with torch.no_grad():
        moe.expert_bias[4:] = -100.0  # experts 4 and 5 receive zero tokens
    x = torch.randn(3, 7, 16, dtype=dtype, requires_grad=True)  # 21 tokens: odd count
    g = torch.randn(3, 7, 16, dtype=dtype)

    y, aux = moe(x)
    (y * g).sum().add(aux["loss"]).backward()
    gx, gp = x.grad.clone(), grads(moe)
    x.grad = None
    moe.zero_grad(set_to_none=True)
    y_ref, aux_ref = moe_ref(moe, x)
    (y_ref * g).sum().add(aux_ref["loss"]).backward()

    assert aux["tokens_per_expert"][4:].sum() == 0 and aux["tokens_per_expert"].sum() == 21 * 2
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, x.grad, **tol)
    for name, p in moe.named_parameters():
        torch.testing.assert_close(gp[name], p.grad, **tol, msg=lambda m, name=name: f"{name}: {m}")
    # Experts that got no token still get a defined, zero gradient (DDP sees every parameter).
    for e in (4, 5):
        assert torch.count_nonzero(gp[f"experts.{e}.fc.weight"]) == 0


def test_dropless_every_token_gets_its_k_experts():
    moe = make_moe(num_experts=5, top_k=3, num_shared_experts=1, shared_hidden=8, router="softmax",
                   dispatch="loop", **QUIET)
    with torch.no_grad():  # heavy skew: expert 0 first for everyone; no capacity, so nobody is dropped
        moe.router.weight[0] += 3.0 * moe.router.weight[0].sign()
    x = torch.randn(37, 16)
    r = moe.route(x)
    assert r.idx.shape == (37, 3)
    assert all(len(set(row)) == 3 for row in r.idx.tolist())
    y, aux = moe(x)
    assert aux["tokens_per_expert"].sum() == 37 * 3
    expected = torch.stack([
        moe.shared(x[t]) + sum(r.gates[t, j] * moe.experts[int(r.idx[t, j])](x[t]) for j in range(3))
        for t in range(37)
    ])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_no_cross_token_leakage():
    moe = make_moe(router="sigmoid", num_shared_experts=1, shared_hidden=8, dispatch="loop", **QUIET)
    x = torch.randn(2, 9, 16, requires_grad=True)
    y, _ = moe(x)
    for t in (0, 4, 8):
        (gx,) = torch.autograd.grad(y[:, t].sum(), x, retain_graph=True)
        others = torch.cat([gx[:, :t], gx[:, t + 1:]], dim=1)
        assert torch.count_nonzero(others) == 0 and torch.count_nonzero(gx[:, t]) > 0
    # Moving one token (and therefore its experts and the sort order) leaves the others unchanged.
    x2 = x.detach().clone()
    x2[:, 3] = 5.0 * torch.randn(2, 16)
    y2, _ = moe(x2)
    keep = [t for t in range(9) if t != 3]
    torch.testing.assert_close(y2[:, keep], y.detach()[:, keep], rtol=1e-6, atol=1e-6)


# ---- bias-based (aux-loss-free) balancing ---------------------------------------------------

def test_bias_changes_selection_not_gates_or_their_gradient():
    moe = make_moe(router="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, dispatch="loop", **QUIET)
    assert "expert_bias" not in dict(moe.named_parameters()) and not moe.expert_bias.requires_grad
    x = torch.randn(40, 16)
    free = moe.route(x).idx
    results = []
    for b in (20.0, 40.0):  # both force expert 3 into every top-2
        with torch.no_grad():
            moe.expert_bias.zero_()
            moe.expert_bias[3] = b
        r = moe.route(x)
        assert (r.idx == 3).any(dim=1).all() and not (free == 3).any(dim=1).all()
        s = torch.sigmoid(x @ moe.router.weight.T).gather(1, r.idx)  # unbiased scores
        torch.testing.assert_close(r.gates, 2.5 * s / s.sum(-1, keepdim=True))
        moe.zero_grad(set_to_none=True)
        moe(x)[0].square().sum().backward()
        results.append((r.idx, r.gates.detach(), moe.router.weight.grad.clone()))
    (i1, g1, w1), (i2, g2, w2) = results
    assert torch.equal(i1, i2) and torch.equal(g1, g2) and torch.equal(w1, w2)


def test_bias_updates_move_skewed_load_toward_uniform():
    moe = make_moe(num_experts=4, top_k=1, router="sigmoid", aux_loss_coef=0.0, z_loss_coef=0.0,
                   bias_balancing=True, bias_update_rate=0.02, dispatch="loop")
    u = torch.nn.functional.normalize(torch.randn(16), dim=0)
    with torch.no_grad():
        moe.router.weight.mul_(0.3)
        moe.router.weight[0] += 2.0 * u
    x = torch.randn(512, 16) + 2.0 * u  # expert 0 wins almost everywhere
    moe.train()
    history = []
    for _ in range(60):
        with torch.no_grad():
            _, aux = moe(x)
        history.append(float(aux["load_max_mean"]))
        assert torch.equal(moe.load_accum, aux["tokens_per_expert"])
        assert update_expert_biases(moe) == 1
        assert moe.load_accum.sum() == 0 and abs(float(moe.expert_bias.sum())) < 1e-5  # cleared, centred
    assert history[0] > 3.0, history[0]
    assert max(history[-10:]) < 1.5, history[-10:]
    moe.eval()  # no accumulation outside training
    moe(x)
    assert moe.load_accum.sum() == 0


def test_experts_quantize_and_fake_quantize_like_any_matrix():
    pytest.importorskip("quant.qat", reason="the quant package is not in this checkout")
    from quant.policy import make_precision_fn
    from quant.qat import set_qat

    precision = make_precision_fn(6, 8)
    moe = make_moe(dim=128, std=0.1, expert_hidden=48, num_shared_experts=1, shared_hidden=48, dispatch="loop",
                   **QUIET)
    for name, t in moe.state_dict().items():  # experts: int6 per row; router and bias: float
        assert precision(name, t).kind == ("int" if "experts" in name or "shared." in name else "fp32"), name
    assert set_qat(moe, True, precision) == 2 * 6 + 2  # fc and proj of 6 routed + 1 shared expert
    x = torch.randn(2, 5, 128)
    y_loop, _ = moe(x)
    torch.testing.assert_close(y_loop, moe_ref(moe, x)[0], rtol=1e-5, atol=1e-5)
    if CPU_GROUPED:  # the grouped path fake-quantizes the stacked weights itself
        moe.cfg.dispatch = "grouped"
        torch.testing.assert_close(moe(x)[0], y_loop, rtol=1e-5, atol=1e-5)
    set_qat(moe, False, precision)
    assert not torch.allclose(moe(x)[0], y_loop)


# ---- aux losses -------------------------------------------------------------------------------

def _identity_router_moe(router: str, balance: str) -> MoEFFN:
    moe = make_moe(dim=3, num_experts=3, top_k=1, router=router, balance_loss=balance, aux_loss_coef=0.1,
                   z_loss_coef=0.01, dispatch="loop")
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(3))  # logits = x
    return moe


LOGITS = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]]  # choices 0, 1, 2, 0


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_aux_losses_by_hand_softmax():
    p = [_softmax(z) for z in LOGITS]
    P = [sum(row[e] for row in p) / 4 for e in range(3)]
    batch = 3 * sum(f * q for f, q in zip([2 / 4, 1 / 4, 1 / 4], P))  # f = count / N (HF scale)
    seq = []
    for rows, counts in ((p[:2], [1, 1, 0]), (p[2:], [1, 0, 1])):  # two sequences of T = 2
        Ps = [sum(r[e] for r in rows) / 2 for e in range(3)]
        seq.append(sum(c * 3 / (1 * 2) * q for c, q in zip(counts, Ps)))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in LOGITS) / 4
    x = torch.tensor(LOGITS).view(2, 2, 3)
    for balance, expected in (("batch", batch), ("sequence", sum(seq) / 2)):
        _, aux = _identity_router_moe("softmax", balance)(x)
        assert aux["balance_loss"].item() == pytest.approx(expected, rel=1e-6)
        assert aux["z_loss"].item() == pytest.approx(z, rel=1e-6)
        assert aux["loss"].item() == pytest.approx(0.1 * expected + 0.01 * z, rel=1e-6)
        assert aux["expert_frac"].tolist() == [0.5, 0.25, 0.25] and aux["load_max_mean"].item() == 1.5


def test_aux_losses_by_hand_sigmoid_sequence():
    s = [[1 / (1 + math.exp(-v)) for v in z] for z in LOGITS]
    sn = [[v / sum(row) for v in row] for row in s]  # DeepSeek-V3: s' = s / Σ s
    seq = []
    for rows, counts in ((sn[:2], [1, 1, 0]), (sn[2:], [1, 0, 1])):
        Ps = [sum(r[e] for r in rows) / 2 for e in range(3)]
        seq.append(sum(c * 1.5 * q for c, q in zip(counts, Ps)))
    _, aux = _identity_router_moe("sigmoid", "sequence")(torch.tensor(LOGITS).view(2, 2, 3))
    assert aux["balance_loss"].item() == pytest.approx(sum(seq) / 2, rel=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="norm_topk_prob"):
        MoEConfig(top_k=1, norm_topk_prob=True)
    with pytest.raises(ValueError, match="n_group"):
        MoEConfig(num_experts=6, n_group=4)
    with pytest.raises(ValueError, match="router"):
        MoEConfig(router="tanh")


# ---- parity with Hugging Face transformers ----------------------------------------------------

def _hf():
    return pytest.importorskip("transformers", reason="pip install transformers to run the HF parity tests")


def _randomize_hf(block: torch.nn.Module, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _hf_expert(experts, e: int, C: int):
    """(gate [I, C], up [I, C], down [C, I]) of HF expert e, for the fused 3-D layout of
    transformers 5 (gate_up_proj [E, 2I, C] = gate rows then up rows) or the per-expert modules of 4.x."""
    if hasattr(experts, "gate_up_proj"):
        gu, dn = experts.gate_up_proj[e], experts.down_proj[e]
        gu = gu if gu.shape[-1] == C else gu.T
        dn = dn if dn.shape[0] == C else dn.T
        half = gu.shape[0] // 2
        return gu[:half], gu[half:], dn
    m = experts[e]
    if hasattr(m, "w1"):  # Mixtral 4.x: w1 gate, w3 up, w2 down
        return m.w1.weight, m.w3.weight, m.w2.weight
    return m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight


def _copy_mlp(ours, gate, up, down) -> None:
    ours.fc.weight.copy_(torch.cat([gate, up], dim=0))
    ours.proj.weight.copy_(down)


@torch.no_grad()
def _load_from_hf(moe: MoEFFN, block, C: int, shared=None) -> None:
    moe.router.weight.copy_(block.gate.weight)
    for e, expert in enumerate(moe.experts):
        _copy_mlp(expert, *_hf_expert(block.experts, e, C))
    if shared is not None:
        _copy_mlp(moe.shared, shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)


def _hf_out(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


def _hf_router_logits(block, x2):
    out = block.gate(x2)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("mode", ["loop", "grouped"])
def test_parity_hf_mixtral(mode):
    if mode == "grouped" and not CPU_GROUPED:
        pytest.skip(NO_CPU_GROUPED)
    transformers = _hf()
    from transformers.models.mixtral import modeling_mixtral

    C, E, k = 24, 6, 2
    conf = transformers.MixtralConfig(hidden_size=C, intermediate_size=20, num_local_experts=E,
                                      num_experts_per_tok=k, router_jitter_noise=0.0)
    block = modeling_mixtral.MixtralSparseMoeBlock(conf).eval()
    _randomize_hf(block)
    moe = MoEFFN(C, MoEConfig(num_experts=E, top_k=k, expert_hidden=20, num_shared_experts=0, router="softmax",
                              norm_topk_prob=True, activation="swiglu", balance_loss="batch", aux_loss_coef=0.02,
                              z_loss_coef=0.0, bias_balancing=False, dispatch=mode))
    _load_from_hf(moe, block, C)
    x = torch.randn(2, 13, C)
    with torch.no_grad():
        y, aux = moe(x)
        y_hf = _hf_out(block, x)
        logits = _hf_router_logits(block, x.view(-1, C))
        lb = modeling_mixtral.load_balancing_loss_func((logits,), E, k)
    torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux["balance_loss"], lb.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(aux["loss"], 0.02 * lb.float(), rtol=1e-6, atol=1e-7)


def test_parity_hf_qwen2_moe_shared_gate():
    transformers = _hf()
    from transformers.models.qwen2_moe import modeling_qwen2_moe

    C, E, k = 24, 6, 3
    conf = transformers.Qwen2MoeConfig(hidden_size=C, moe_intermediate_size=12, shared_expert_intermediate_size=20,
                                       num_experts=E, num_experts_per_tok=k, norm_topk_prob=False)
    block = modeling_qwen2_moe.Qwen2MoeSparseMoeBlock(conf).eval()
    _randomize_hf(block)
    moe = MoEFFN(C, MoEConfig(num_experts=E, top_k=k, expert_hidden=12, num_shared_experts=1, shared_hidden=20,
                              shared_gate=True, router="softmax", norm_topk_prob=False, activation="swiglu",
                              dispatch="loop", **QUIET))
    _load_from_hf(moe, block, C, shared=block.shared_expert)
    with torch.no_grad():
        moe.shared_gate.weight.copy_(block.shared_expert_gate.weight)
        x = torch.randn(3, 5, C)
        torch.testing.assert_close(moe(x)[0], _hf_out(block, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["loop", "grouped"])
def test_parity_hf_deepseek_v3(mode):
    if mode == "grouped" and not CPU_GROUPED:
        pytest.skip(NO_CPU_GROUPED)
    transformers = _hf()
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    C, E, k, I = 24, 8, 2, 16
    conf = transformers.DeepseekV3Config(hidden_size=C, moe_intermediate_size=I, n_routed_experts=E,
                                         num_experts_per_tok=k, n_shared_experts=2, n_group=4, topk_group=2,
                                         norm_topk_prob=True, routed_scaling_factor=2.5)
    block = modeling_deepseek_v3.DeepseekV3MoE(conf).eval()
    _randomize_hf(block)
    bias = torch.randn(E) * 0.1
    block.gate.e_score_correction_bias.copy_(bias)
    cfg = MoEConfig(num_experts=E, top_k=k, expert_hidden=I, num_shared_experts=2, shared_hidden=I,
                    router="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, n_group=4, topk_group=2,
                    activation="swiglu", dispatch=mode, **QUIET)
    moe = MoEFFN(C, cfg)
    _load_from_hf(moe, block, C, shared=block.shared_experts)
    moe.expert_bias.copy_(bias)
    x = torch.randn(4, 16, C)
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], _hf_out(block, x), rtol=1e-5, atol=1e-5)
        # The group limit is exercised: plain top-k picks differently for some tokens.
        flat = MoEFFN(C, MoEConfig(**{**cfg.__dict__, "n_group": 1, "topk_group": 1}))
        flat.load_state_dict(moe.state_dict())
        grouped_idx = moe.route(x.view(-1, C)).idx.sort(-1).values
        assert not torch.equal(grouped_idx, flat.route(x.view(-1, C)).idx.sort(-1).values)


def test_dynamic_ntk_rope_matches_hf():
    transformers = _hf()
    from transformers import modeling_rope_utils

    D, max_pos, factor, theta, T = 16, 16, 2.0, 10000.0, 48
    kw = {"hidden_size": 4 * D, "num_attention_heads": 4, "max_position_embeddings": max_pos}
    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:
        kw["rope_parameters"] = {"rope_type": "dynamic", "factor": factor, "rope_theta": theta}
    else:  # transformers 4.x
        kw.update(rope_theta=theta, rope_scaling={"type": "dynamic", "factor": factor})
    inv_hf, _ = modeling_rope_utils.ROPE_INIT_FUNCTIONS["dynamic"](transformers.LlamaConfig(**kw), "cpu", seq_len=T)
    base = ntk_rope_base(theta, D, T, max_pos, factor)
    ours = base ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    torch.testing.assert_close(ours, inv_hf.float(), rtol=1e-5, atol=0)
    assert ntk_rope_base(theta, D, max_pos, max_pos, factor) == theta


# ---- presets and the standalone model ---------------------------------------------------------

def _meta_model(cfg: MoELMConfig) -> MoETransformer:
    with torch.device("meta"):
        return MoETransformer(cfg)


def test_rize_preset_matches_seed_counts():
    cfg = moe_preset("rize")
    total = count_total_params(_meta_model(cfg))
    assert total == param_breakdown(cfg)["total"]
    assert abs(total / 4e9 - 1) < 0.03, total
    assert abs(count_active_params(cfg) / 1e9 - 1) < 0.03, count_active_params(cfg)


def test_rish_preset_matches_counts_from_its_fields():
    cfg = moe_preset("rish")
    V, C, L, E, k, I, kv = 100352, 4096, 32, 7, 5, 11008, 8 * 128
    attn = 2 * C * C + 2 * C * kv
    per_layer_fixed = attn + 2 * C + E * C  # attention, two norm gains, router
    expert = 3 * C * I  # SwiGLU gate, up, down
    fixed = 2 * V * C + C + L * per_layer_fixed  # untied embedding + head, final norm
    total_expected, active_expected = fixed + L * E * expert, fixed + L * k * expert
    total = count_total_params(_meta_model(cfg))
    assert abs(total / total_expected - 1) < 0.03 and abs(count_active_params(cfg) / active_expected - 1) < 0.03
    assert total == total_expected and count_active_params(cfg) == active_expected


def test_golf_preset_fits_artifact_estimate():
    cfg = moe_preset("golf")
    assert count_total_params(_meta_model(cfg)) == param_breakdown(cfg)["total"]
    assert estimate_artifact_bytes(cfg) < 16_000_000 - 500_000  # room for the code


def test_tiny_moe_transformer_trains_and_is_causal():
    cfg = MoELMConfig(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=8, rope_scaling="dynamic", rope_factor=2.0, ffn_pattern="DMM",
                      dense_hidden=48, tie_embeddings=False,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, shared_hidden=16, norm_topk_prob=True))
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    ids = torch.randint(0, 64, (2, 12))  # T = 12 > max positions: the dynamic base is in play
    loss = model(ids[:, :-1], ids[:, 1:])
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(64)) < 0.5
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    logits, _, stats = model.forward_with_aux(ids)
    assert len(stats) == 2 and stats[0]["expert_frac"].sum().item() == pytest.approx(1.0)
    ids2 = ids.clone()
    ids2[:, 7] = (ids2[:, 7] + 1) % 64
    logits2, _, _ = model.forward_with_aux(ids2)
    torch.testing.assert_close(logits2[:, :7], logits[:, :7], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits2[:, 7:], logits[:, 7:])
