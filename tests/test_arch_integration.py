"""RWKV-7 (R) and MoE (lower-case) layers inside HybridGPT, and the rwkv7 / moe arch defaults, on CPU.

Tiny configs (dim 64, vocab 128, seq 32; dim 128/256 where a matrix must be big enough for the int
grid). Run: python -m pytest -q tests/test_arch_integration.py
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybrid.config import ARCH_DEFAULTS, ModelConfig, parse_layer_pattern
from hybrid.layers import CastedLinear
from hybrid.model import Block, HybridGPT, RWKVBlock, expert_load_summary
from hybrid.presets import model_preset_report as named_model_preset
from hybrid.moe import MoEFFN
from hybrid.moe_presets import MOE_PRESETS, count_active_params, param_breakdown
from hybrid.training.optim import split_params
from hybrid.rwkv7 import (RWKV7_PRESETS, RWKV7LM, RWKV7ChannelMix, RWKV7LoRAQAT, RWKV7TimeMix,
                           rwkv7_param_count)
from quant.artifact import pack_model, unpack_model
from quant.int6 import dequantize_rows, quantize_rows
from quant.policy import make_precision_fn
from quant.qat import set_qat

ROOT = Path(__file__).resolve().parents[1]
V = 128
PRECISION = make_precision_fn(6, 8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls are ~1000x slower with 2 threads on a busy 2-core box than with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TINY = {"vocab_size": V, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2, "attn_window": 8, "rope_dims": 8,
        "ve_dim": 16, "bigram_buckets": 64, "bigram_dim": 16, "rwkv_head_size": 16, "moe_num_experts": 4,
        "moe_top_k": 2, "moe_expert_hidden": 32, "moe_shared_hidden": 32}


def pattern_cfg(pattern: str, **kw) -> ModelConfig:
    return ModelConfig(**{**TINY, "num_layers": len(pattern), "layer_pattern": pattern, **kw})


def arch_cfg(arch: str, **kw) -> ModelConfig:
    """An arch default at toy size (same layer pattern and switches, narrow and with a small vocab)."""
    small = {"vocab_size": V, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2, "rwkv_head_size": 16,
             "moe_expert_hidden": 32, "moe_shared_hidden": 32, "attn_window": 8, "rope_dims": 8}
    return ModelConfig(**{**ARCH_DEFAULTS[arch], **small, **kw})


CONFIGS = {
    "TRWF": lambda **kw: pattern_cfg("TRWF", **kw),  # R between token shift and attention, dense FFNs
    "tWRf": lambda **kw: pattern_cfg("tWRf", **kw),  # MoE in the first and last layers
    "RtRr-cmix": lambda **kw: pattern_cfg("RtRr", rwkv_ffn="cmix", **kw),  # channel-mix FFN in R layers
    "rwkv7": lambda **kw: arch_cfg("rwkv7", **kw),
    "rwkv7-moe": lambda **kw: arch_cfg("rwkv7", num_layers=3, layer_pattern="RrR", moe_num_experts=4,
                                       moe_top_k=2, **kw),
    "moe": lambda **kw: arch_cfg("moe", **kw),
}


def randomize_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (zero-init projections included) so that no path is switched off; the
    RWKV decay base w0 stays in its working range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (-1.0 if name.endswith(".w0") else 0.0))
    return model


def ce(logits: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1))


# ---- config: grammar, validation, arch defaults -------------------------------------------------------

def test_pattern_grammar():
    assert parse_layer_pattern("TRWF", 4) == ["T", "R", "W", "F"]
    assert parse_layer_pattern("tWRf", 4, moe=True) == ["t", "W", "R", "f"]
    with pytest.raises(ValueError, match=r"invalid letter.*\['r', 't'\].*need.*moe_num_experts > 0"):
        parse_layer_pattern("tRr", 3)
    cfg = pattern_cfg("TtRrWF")
    assert cfg.layer_kinds == list("TtRrWF") and cfg.mixer_kinds == list("TTRRWF")
    assert cfg.moe_layer_ids == [1, 3] and cfg.rwkv_layer_ids == [2, 3] and cfg.attn_layers == [4, 5]
    assert cfg.moe_config.num_experts == 4 and cfg.moe_config.top_k == 2
    assert pattern_cfg("TRWF").moe_config is None  # experts configured but no lower-case layer: unused


@pytest.mark.parametrize("kw,match", [
    ({"layer_pattern": "tWRf", "moe_num_experts": 0}, r"lower-case letter.*moe_num_experts > 0"),
    ({"layer_pattern": "TRWF", "moe_num_experts": -1}, "moe_num_experts"),
    ({"layer_pattern": "tWRf", "moe_top_k": 5}, "moe_top_k"),
    ({"layer_pattern": "tWRf", "moe_router": "relu"}, "moe_router"),
    ({"layer_pattern": "tWRf", "moe_act": "gelu"}, "moe_act"),
    ({"layer_pattern": "tWRf", "moe_dispatch": "fast"}, "moe_dispatch"),
    ({"layer_pattern": "tWRf", "moe_top_k": 1, "moe_norm_topk": True}, "moe_norm_topk"),
    ({"layer_pattern": "tWRf", "moe_aux_coef": -1.0}, "moe_aux_coef"),
    ({"layer_pattern": "tWRf", "moe_expert_hidden": 0}, "moe_expert_hidden"),
    ({"layer_pattern": "TRWF", "rwkv_head_size": 24}, "rwkv_head_size"),
    ({"layer_pattern": "TRWF", "rwkv_chunk": 0}, "rwkv_chunk"),
    ({"layer_pattern": "TRWF", "rwkv_chunk": 256}, "rwkv_chunk"),
    ({"layer_pattern": "TRWF", "rwkv_impl": "cuda"}, "rwkv_impl"),
    ({"layer_pattern": "TRWF", "rwkv_ffn": "swiglu"}, "rwkv_ffn"),
    ({"layer_pattern": "TRWF", "block_style": "rwkv", "smear": False, "ln_scale": False}, "only R"),
    ({"layer_pattern": "RRRR", "block_style": "rwkv", "ln_scale": False}, "smear"),
    ({"layer_pattern": "RRRR", "block_style": "rwkv", "smear": False}, "ln_scale"),
    ({"layer_pattern": "TRWF", "block_style": "rnn"}, "block_style"),
    ({"layer_pattern": "TRWF", "ve_layers": "1"}, "not an attention layer"),
])
def test_invalid_config_raises_helpful_error(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**TINY, "num_layers": 4, **kw})


def test_arch_defaults_match_the_presets():
    g = RWKV7_PRESETS["golf"]
    r = ModelConfig(**ARCH_DEFAULTS["rwkv7"])
    assert (r.vocab_size, r.model_dim, r.num_layers, r.rwkv_head_size, r.mlp_hidden, r.logit_softcap) == (
        g["vocab_size"], g["dim"], g["num_layers"], g["head_size"], g["ffn_hidden"], g["logit_softcap"])
    assert g["tie"] and r.layer_pattern == "R" * g["num_layers"] and r.block_style == "rwkv" and r.rwkv_ffn == "cmix"
    m, mc = MOE_PRESETS["golf"], ModelConfig(**ARCH_DEFAULTS["moe"])
    assert (mc.vocab_size, mc.model_dim, mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.mlp_hidden, mc.mlp_act) == (
        m.vocab_size, m.model_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.dense_hidden, m.dense_activation)
    assert m.tie_embeddings and "".join("M" if k.islower() else "D" for k in mc.layer_kinds) == m.ffn_kinds
    assert mc.moe_config == m.moe  # every routing field, one by one
    assert mc.layer_pattern == "Tttwttwttwf" and mc.attn_layers == [3, 6, 9, 10]


def test_arch_default_param_counts_on_meta():
    with torch.device("meta"):
        rwkv = HybridGPT(ModelConfig(**ARCH_DEFAULTS["rwkv7"]))
        ref = RWKV7LM(**RWKV7_PRESETS["golf"])
        moe = HybridGPT(ModelConfig(**ARCH_DEFAULTS["moe"]))
    assert rwkv.param_counts() == (21_804_544, 21_804_544)
    assert sum(p.numel() for p in ref.parameters()) == rwkv7_param_count(**RWKV7_PRESETS["golf"]) == 21_804_544
    assert moe.param_counts() == (21_284_896, 15_386_656)
    # the same FFNs as MoETransformer's golf preset: equal counts after swapping the mixers and extras
    b = param_breakdown(MOE_PRESETS["golf"])
    ours = {"routed": 0, "shared": 0, "dense": 0, "routers": 0}
    for name, p in moe.named_parameters():
        key = ("routed" if ".experts." in name else "shared" if ".shared." in name else
               "routers" if name.endswith("router.weight") else "dense" if ".mlp." in name else None)
        if key:
            ours[key] += p.numel()
    assert (ours["routed"], ours["shared"], ours["dense"], ours["routers"]) == (
        b["routed_experts"], b["shared_experts"], b["dense_ffn"], b["routers"])


def test_named_model_presets():
    rize = named_model_preset("rize")
    assert abs(rize.total_params / 4e9 - 1) < 0.03 and abs(rize.active_params / 1e9 - 1) < 0.03
    rish = named_model_preset("rish")
    b = param_breakdown(MOE_PRESETS["rish"])
    assert (rish.total_params, rish.active_params) == (b["total"], count_active_params(MOE_PRESETS["rish"]))
    r191 = named_model_preset("rwkv7-191m")
    assert abs(r191.total_params / 191e6 - 1) < 0.03 and r191.active_params == r191.total_params
    assert "65536" in r191.description and "64 routed experts top-4" in rize.description
    assert named_model_preset("gpt").total_params == 17_059_912
    assert named_model_preset("moe")[2:] == (21_284_896, 15_386_656)
    with pytest.raises(ValueError, match="unknown model preset"):
        named_model_preset("gpt5")


def test_hybrid_run_does_not_load_the_rwkv_and_moe_modules():
    """A run's code bytes are the modules it imports: the hybrid must not pull in rwkv7/moe (it does load
    hybrid/token_mix.py, the home of its default conv mixer)."""
    script = ("import sys, torch; from hybrid.model import HybridGPT; from hybrid.config import ARCH_DEFAULTS, "
              "ModelConfig\nwith torch.device('meta'): HybridGPT(ModelConfig(**ARCH_DEFAULTS['hybrid']))\n"
              "print(sorted(m for m in sys.modules if m.startswith('hybrid')))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout
    for mod in ("hybrid.rwkv7", "hybrid.kernels.wkv7", "hybrid.moe", "hybrid.moe_presets"):
        assert f"'{mod}'" not in loaded, loaded
    assert "'hybrid.token_mix'" in loaded


# ---- structure and init ---------------------------------------------------------------------------

def test_blocks_mixers_and_ffns():
    model = HybridGPT(pattern_cfg("TtRrWF"))
    kinds = [(b.kind, b.is_moe, type(b.mixer).__name__, type(b.mlp).__name__) for b in model.blocks]
    assert kinds == [("T", False, "ConvShiftMix", "MLP"), ("T", True, "ConvShiftMix", "MoEFFN"),
                     ("R", False, "RWKV7TimeMix", "MLP"), ("R", True, "RWKV7TimeMix", "MoEFFN"),
                     ("W", False, "CausalAttention", "MLP"), ("F", False, "CausalAttention", "MLP")]
    # v_first comes from the first R layer (not layer 0); later R layers carry the value-residual LoRA
    assert model.blocks[2].mixer.first and not hasattr(model.blocks[2].mixer, "v1")
    assert not model.blocks[3].mixer.first and model.blocks[3].mixer.v1.shape == (64, 32)
    cmix = HybridGPT(pattern_cfg("TRWF", rwkv_ffn="cmix"))
    assert isinstance(cmix.blocks[1].mlp, RWKV7ChannelMix) and cmix.blocks[1].mlp.key.weight.shape == (cmix.cfg.mlp_hidden, 64)
    assert type(cmix.blocks[0].mlp).__name__ == "MLP"  # channel-mix only for R layers
    rwkv = HybridGPT(arch_cfg("rwkv7"))
    assert all(isinstance(b, RWKVBlock) for b in rwkv.blocks) and rwkv.blocks[0].ln0 is not None
    assert rwkv.blocks[1].ln0 is None and rwkv.ln_out is not None and rwkv.bigram is None


def test_value_residual_is_threaded_across_other_layers():
    """With layer 0's time-mix output zeroed, its value projection reaches the logits only through
    v_first, which layer 2 (past a token-shift layer) mixes in."""
    model = randomize_(HybridGPT(pattern_cfg("RTR", bigram_buckets=0)))
    with torch.no_grad():
        model.blocks[0].mixer.output.weight.zero_()
    ids = torch.randint(0, V, (2, 16))
    base = model.forward_logits(ids)
    with torch.no_grad():
        model.blocks[0].mixer.value.weight.mul_(-1.0)
    assert (model.forward_logits(ids) - base).abs().max() > 1e-3


def test_rwkv_layers_keep_the_reference_init_and_meta_build_matches():
    cfg = pattern_cfg("TRWR")
    model = HybridGPT(cfg)
    for i in (1, 3):
        tm = model.blocks[i].mixer
        fresh = RWKV7TimeMix(64, 16, i, 4, first=i == 1)
        for name in ("w0", "a0", "k_k", "x_r", "x_g"):
            torch.testing.assert_close(getattr(tm, name), getattr(fresh, name), rtol=0, atol=0)
        assert torch.all(tm.output.weight == 0) and torch.all(tm.w1 == 0)
        assert tm.key.weight.abs().max() <= 0.05 / 8 and tm.receptance.weight.abs().max() <= 0.5 / 8
        torch.testing.assert_close(tm.ln_x.weight, torch.full((64,), ((i + 1) / 4) ** 0.7))
    with torch.device("meta"):
        meta = HybridGPT(pattern_cfg("tWRf"))
    meta.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(meta.parameters()) + list(meta.buffers()):
            t.fill_(float("nan"))
    meta.init_weights()
    assert all(torch.isfinite(t).all() for t in list(meta.parameters()) + list(meta.buffers()))
    assert torch.all(meta.blocks[0].mlp.expert_bias == 0) and torch.all(meta.blocks[0].moe_stats.expert_frac == 0)
    assert torch.all(meta.blocks[0].mlp.experts[1].proj.weight == 0)  # expert outputs start at zero


# ---- behaviour ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_causality(name):
    """Changing token t never changes the logits before t (and does change them at t)."""
    model = randomize_(HybridGPT(CONFIGS[name]()), std=0.1)
    T = 32
    ids = torch.randint(2, V, (2, T))
    base = model.forward_logits(ids)
    for t in (0, 5, 17, T - 1):
        ids2 = ids.clone()
        ids2[:, t] = (ids2[:, t] + 7) % V
        out = model.forward_logits(ids2)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-5, rtol=0)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_init_loss_aux_and_training(name):
    cfg = CONFIGS[name]()
    model = HybridGPT(cfg)
    ids = torch.randint(0, V, (4, 32))
    tgt = torch.roll(ids, -1, dims=1)
    loss = model(ids, tgt)
    assert loss.shape == () and loss.dtype == torch.float32
    assert abs(loss.item() - math.log(V)) < 0.05, loss.item()
    logits = model.forward_logits(ids)
    assert logits.shape == (4, 32, V) and logits.dtype == torch.float32
    stats = model.expert_load_stats()
    aux = sum(s["aux_loss"] for s in stats) if stats else torch.zeros(())
    assert len(stats) == len(cfg.moe_layer_ids)
    torch.testing.assert_close(loss, ce(logits, tgt) + aux)  # forward = CE + weighted MoE aux losses
    if stats:
        assert aux > 0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(25):
        loss = model(ids, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.after_optimizer_step()
    assert loss.item() < 0.7 * first, (first, loss.item())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_parameter_gets_a_gradient(name):
    model = randomize_(HybridGPT(CONFIGS[name]()), std=0.1)
    ids = torch.randint(0, V, (2, 32))
    model(ids, torch.roll(ids, -1, 1)).backward()
    assert all(p.grad is not None for p in model.parameters())  # even experts that got no token
    idle = {f"blocks.{s['layer']}.{'mlp' if isinstance(model.blocks[s['layer']], Block) else 'ffn'}.experts.{e}."
            for s in model.expert_load_stats() for e in range(len(s["expert_frac"])) if s["expert_frac"][e] == 0}
    missing = [n for n, p in model.named_parameters()
               if not p.grad.abs().sum() > 0 and not any(n.startswith(i) for i in idle)]
    assert not missing, missing


def test_rwkv7_arch_matches_rwkv7lm_logits():
    """block_style "rwkv" + channel-mix is RWKV7LM(tie=True): same parameters under the same names
    (tok_emb ↔ emb), so the same weights give the same logits."""
    cfg = arch_cfg("rwkv7", num_layers=3, layer_pattern="RRR")
    ours = randomize_(HybridGPT(cfg), std=0.1)
    ref = RWKV7LM(V, 64, 3, head_size=16, ffn_hidden=cfg.mlp_hidden, tie=True, logit_softcap=cfg.logit_softcap)
    sd = {("emb.weight" if k == "tok_emb.weight" else k): v for k, v in ours.state_dict().items()}
    assert sorted(sd) == sorted(ref.state_dict())
    ref.load_state_dict(sd, strict=True)
    ids = torch.randint(0, V, (2, 32))
    torch.testing.assert_close(ours.forward_logits(ids), ref.forward_logits(ids), rtol=0, atol=0)
    tgt = torch.roll(ids, -1, 1)
    torch.testing.assert_close(ours(ids, tgt), ref(ids, tgt), rtol=0, atol=0)


def test_expert_load_stats_and_bias_update():
    model = randomize_(HybridGPT(pattern_cfg("tWRf")), std=0.3)
    assert model.after_optimizer_step() == 2  # nothing seen yet: sign(0) leaves the biases at 0
    assert all(torch.all(s["expert_bias"] == 0) for s in model.expert_load_stats())
    ids = torch.randint(0, V, (4, 32))
    model(ids, torch.roll(ids, -1, 1)).backward()
    stats = model.expert_load_stats()
    assert [s["layer"] for s in stats] == [0, 3]
    for s in stats:
        assert s["expert_frac"].shape == (4,) and not s["expert_frac"].requires_grad
        torch.testing.assert_close(s["expert_frac"].sum(), torch.tensor(1.0))
        torch.testing.assert_close(s["load_max_mean"], s["expert_frac"].max() * 4)
        assert s["load_max_mean"] >= 1.0 and s["z_loss"] > 0 and s["balance_loss"] > 0
    line = expert_load_summary(stats)
    assert line.startswith("moe_load L0:max/mean=") and " L3:" in line
    skewed = [s["expert_frac"].max() > s["expert_frac"].min() for s in stats]
    assert model.after_optimizer_step() == 2
    after = model.expert_load_stats()
    for s, a, moved in zip(stats, after, skewed):
        assert torch.equal(s["expert_frac"], a["expert_frac"])  # stats are from the last forward
        if moved:  # the most loaded expert's selection bias went down, the least loaded one's up
            assert a["expert_bias"][s["expert_frac"].argmax()] < 0 < a["expert_bias"][s["expert_frac"].argmin()]
    # forward_logits in eval mode refreshes the stats but never the bias accumulator
    model.eval()
    model.forward_logits(ids[:1])
    assert all(torch.all(b.mlp.load_accum == 0) for _, b in model.moe_blocks())
    dense = HybridGPT(pattern_cfg("TRWF"))
    assert dense.expert_load_stats() == [] and dense.after_optimizer_step() == 0


def test_compiles_fullgraph_and_matches_eager():
    """R + MoE layers trace without graph breaks under bf16 autocast, as the trainer runs them on a GPU
    (aot_eager keeps it fast on CPU). Under autocast the MoE input is cast to bf16, which is what the
    grouped-mm dispatch takes (the CPU loop dispatch reads the counts on the host, so "auto", which
    picks the loop on CPU, is forced to "grouped" here)."""
    model = randomize_(HybridGPT(pattern_cfg("tWRf", moe_dispatch="grouped")), std=0.1)
    ids = torch.randint(0, V, (2, 32))
    tgt = torch.roll(ids, -1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(ids, tgt)
    eager_frac = model.expert_load_stats()[0]["expert_frac"]
    with torch.no_grad():
        for _, b in model.moe_blocks():
            b.moe_stats.reset_parameters()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(ids, tgt)
    out.backward()
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(model.expert_load_stats()[0]["expert_frac"], eager_frac)  # buffers written
    assert model.blocks[0].mlp.router.weight.grad is not None
    assert model.blocks[0].mlp.experts[0].fc.weight.grad is not None


def test_runs_under_cpu_autocast():
    model = randomize_(HybridGPT(pattern_cfg("tWRf")), std=0.1)
    ids = torch.randint(0, V, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, torch.roll(ids, -1, 1))
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[2].mixer.receptance.weight.grad is not None


# ---- quantization, QAT, optimizer groups ------------------------------------------------------

def quant_cfg(name: str) -> ModelConfig:
    """Wide enough that R matrices, LoRAs (C=256: rank 32, 8192 values) and experts are int6."""
    wide = {"model_dim": 256, "rwkv_head_size": 64, "moe_expert_hidden": 64, "moe_shared_hidden": 64,
            "num_heads": 4, "num_kv_heads": 2, "rope_dims": 16}
    if name == "rwkv7-moe":
        return arch_cfg("rwkv7", num_layers=2, layer_pattern="Rr", moe_num_experts=4, **wide)
    return pattern_cfg("tWRf", **wide)


def expected_precision_kinds(model: HybridGPT) -> dict[str, str]:
    return {n: PRECISION(n, t).kind for n, t in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["rwkv7", "moe"])
def test_policy_classifies_golf_rwkv_and_expert_tensors(arch):
    with torch.device("meta"):
        model = HybridGPT(ModelConfig(**ARCH_DEFAULTS[arch]))
    kinds = expected_precision_kinds(model)
    for name, kind in kinds.items():
        leaf = name.rsplit(".", 1)[-1]
        if name == "tok_emb.weight":
            assert PRECISION(name, model.state_dict()[name]).bits == 8
        elif leaf in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2") or (
                ".att." in name or ".mixer." in name or ".ffn." in name or ".mlp." in name) and (
                name.endswith(("receptance.weight", "key.weight", "value.weight", "output.weight", "fc.weight",
                               "proj.weight", "c_q.weight", "c_k.weight", "c_v.weight", "w_r.weight",
                               "w_k.weight", "w_v.weight"))):
            assert kind == "int", name  # big matrices and the LoRA factors: int6 (budget)
        elif name.endswith("router.weight") or name.endswith("expert_bias") or ".ln" in name or leaf in (
                "x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a", "r_k"):
            assert kind == "fp32", name  # routers, balancing bias, norms and RWKV vectors stay float
    if arch == "moe":
        assert sum(k == "int" for n, k in kinds.items() if ".experts." in n) == 10 * 4 * 2


@pytest.mark.parametrize("name", ["tWRf", "rwkv7-moe"])
def test_artifact_round_trip_equals_dequantized_model(name):
    cfg = quant_cfg(name)
    model = randomize_(HybridGPT(cfg), std=0.05)
    with torch.no_grad():
        for _, b in model.moe_blocks():
            moe = b.mlp if isinstance(b, Block) else b.ffn
            moe.expert_bias.copy_(torch.tensor([0.3, -0.1, 0.0, -0.2]))  # must survive the artifact
    sd = model.state_dict()
    kinds = expected_precision_kinds(model)
    int_names = [n for n, k in kinds.items() if k == "int"]
    assert any(".experts." in n for n in int_names) and any(n.endswith(".w1") for n in int_names)
    assert any(n.endswith("receptance.weight") for n in int_names)
    blob = pack_model(sd, PRECISION, compressor="zlib")
    loaded = HybridGPT(cfg)
    loaded.load_state_dict(unpack_model(blob), strict=True)
    deq = {}
    for n, t in sd.items():
        p = PRECISION(n, t)
        if p.kind == "int":
            deq[n] = dequantize_rows(*quantize_rows(t, p.bits), dtype=t.dtype)
        elif p.kind == "fp16":
            deq[n] = t.half().to(t.dtype)
        else:
            deq[n] = t.clone()
    reference = HybridGPT(cfg)
    reference.load_state_dict(deq, strict=True)
    loaded.eval()
    reference.eval()
    ids = torch.randint(0, V, (2, 32))
    out = loaded.forward_logits(ids)
    torch.testing.assert_close(out, reference.forward_logits(ids), rtol=0, atol=0)
    assert not torch.equal(out, model.eval().forward_logits(ids))  # quantization did something
    for _, b in loaded.moe_blocks():
        moe = b.mlp if isinstance(b, Block) else b.ffn
        torch.testing.assert_close(moe.expert_bias, torch.tensor([0.3, -0.1, 0.0, -0.2]), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tWRf", "rwkv7-moe"])
def test_set_qat_switches_rwkv_and_expert_matrices(name):
    model = randomize_(HybridGPT(quant_cfg(name)), std=0.05)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, CastedLinear)}
    want = {n for n, m in linears.items() if PRECISION(n + ".weight", m.weight).kind == "int"}
    loras = {n: m for n, m in model.named_modules() if isinstance(m, RWKV7LoRAQAT)}  # C=256: all int6
    assert loras and all(PRECISION(n + ".weight", m.weight).kind == "int" for n, m in loras.items())
    assert set_qat(model, True, PRECISION) == len(want) + len(loras)
    on = {n for n, m in linears.items() if m.qat_bits == 6}
    assert on == want and all(m.qat_bits == 6 for m in loras.values())
    assert any(".experts." in n for n in on) and any(".shared." in n for n in on)
    assert any(n.endswith(("att.receptance", "mixer.receptance")) for n in on)
    assert any(n.endswith(("att.output", "mixer.output")) for n in on)
    assert all(not hasattr(m, "qat_bits") for n, m in model.named_modules() if n.endswith("router"))
    ids = torch.randint(0, V, (2, 32))
    model(ids, torch.roll(ids, -1, 1)).backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for n, m in linears.items() if n in on)
    assert set_qat(model, False, PRECISION) == 0 and all(m.qat_bits == 0 for m in linears.values())
    assert all(m.qat_bits == 0 for m in loras.values())


@pytest.mark.parametrize("name", list(CONFIGS) + ["many-experts"])
def test_param_groups_cover_every_parameter_once_and_keep_routers_off_muon(name):
    cfg = (pattern_cfg("tWRf", moe_num_experts=16) if name == "many-experts" else CONFIGS[name]())
    model = HybridGPT(cfg)
    emb, mat, sca = split_params(model)
    names = [n for n, _ in emb + mat + sca]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    routers = [n for n, _ in model.named_parameters() if n.endswith("router.weight")]
    assert len(routers) == len(cfg.moe_layer_ids)
    assert not any(n.endswith("router.weight") for n, _ in mat)
    assert all(n in dict(sca) for n in routers)
    if name == "many-experts":
        assert model.blocks[0].mlp.router.weight.shape == (16, 64)  # big enough that the shape rule would say Muon
    assert any(".experts." in n for n, _ in mat) == bool(cfg.moe_layer_ids)
    if cfg.rwkv_layer_ids:
        assert any(n.endswith("receptance.weight") for n, _ in mat)


def test_config_replace_revalidates_new_fields():
    with pytest.raises(ValueError, match="moe_num_experts"):
        dataclasses.replace(pattern_cfg("tWRf"), moe_num_experts=0)
    assert isinstance(HybridGPT(pattern_cfg("tWRf")).blocks[0].mlp, MoEFFN)
