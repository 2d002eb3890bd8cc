"""Optimizer parameter groups (hybrid/optim.py): the generic rules for every architecture, and the
RWKV-7 recipe of BlinkDL RWKV-LM / modded-nanogpt-rwkv (docs/TECHNIQUES.md, "RWKV-7 optimizer recipe")
for RWKV-7 modules only.

The recipe, as written down here independently of the implementation:
- Muon (matrix_lr, muon_wd): receptance, key, value, output and the channel-mix key/value matrices;
- Adam, no weight decay, scalar_lr: the LoRA factors w1 w2 a1 a2 v1 v2 g1 g2, the per-channel vectors,
  r_k, ln_x and the block LayerNorms; w0 likewise but at 2 x scalar_lr;
- the tied embedding keeps its own Adam group (tied_embed_lr, adam_wd).
"""
from __future__ import annotations

import collections
import re
from types import SimpleNamespace

import pytest
import torch

from hybrid.config import ARCH_DEFAULTS, ModelConfig
from hybrid.model import HybridGPT
from hybrid.optim import build_optimizers, split_params

# Distinct values, so a parameter in the wrong group shows up in its lr or weight decay.
H = SimpleNamespace(beta1=0.9, beta2=0.95, adam_eps=1e-8, adam_wd=0.03, muon_wd=0.05, tied_embed_lr=0.07,
                    embed_lr=0.11, matrix_lr=0.13, scalar_lr=0.17, muon_momentum=0.95, muon_backend_steps=5)
SMALL = dict(model_dim=64, num_heads=4, num_kv_heads=2)
LORA = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
RWKV_MATRICES = ("receptance.weight", "key.weight", "value.weight", "output.weight")


def make_model(arch: str, **overrides) -> HybridGPT:
    torch.manual_seed(0)
    return HybridGPT(ModelConfig(**{**ARCH_DEFAULTS[arch], **SMALL, **overrides}))


def groups_by_param(model, optimizers) -> dict[str, list[tuple[str, float, float, float]]]:
    """{parameter name: [(optimizer class, lr, base_lr, weight_decay) of every group holding it]}."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    found = collections.defaultdict(list)
    for opt in optimizers:
        for g in opt.param_groups:
            for p in g["params"]:
                found[name_of[id(p)]].append((type(opt).__name__, g["lr"], g["base_lr"], g["weight_decay"]))
    return found


def signature(model, optimizers) -> list[tuple]:
    """Per group in order: (optimizer, lr, base_lr, weight_decay, {name with layer/expert index as #: count})."""
    collapsed = {id(p): re.sub(r"\.\d+\.", ".#.", n) for n, p in model.named_parameters()}
    out = []
    for opt in optimizers:
        for g in opt.param_groups:
            counts = collections.Counter(collapsed[id(p)] for p in g["params"])
            out.append((type(opt).__name__, g["lr"], g["base_lr"], g["weight_decay"], dict(counts)))
    return out


# Captured with hybrid/optim.py before the RWKV-7 recipe existed (same H and SMALL): these
# architectures have no RWKV-7 module and no LayerNorm, so their groups must not move.
TODAY = {
    "hybrid": [
        ("AdamW", 0.07, 0.07, 0.03, {"tok_emb.weight": 1}),
        ("AdamW", 0.11, 0.11, 0.03, {"bigram.table.weight": 1}),
        ("AdamW", 0.11, 0.11, 0.03, {"ve.table.weight": 1}),
        ("Muon", 0.13, 0.13, 0.05, {
            "bigram.proj.weight": 1, "blocks.#.mixer.c_k.weight": 4, "blocks.#.mixer.c_q.weight": 4,
            "blocks.#.mixer.c_v.weight": 4, "blocks.#.mixer.proj.weight": 4, "blocks.#.mixer.w_k.weight": 8,
            "blocks.#.mixer.w_r.weight": 8, "blocks.#.mixer.w_v.weight": 8, "blocks.#.mlp.fc.weight": 12,
            "blocks.#.mlp.proj.weight": 12, "ve.proj.weight": 1}),
        ("AdamW", 0.17, 0.17, 0.03, {
            "bigram.bigram_scale": 1, "blocks.#.mix_scale": 12, "blocks.#.mixer.k_norm_gain": 4,
            "blocks.#.mixer.mix_k": 8, "blocks.#.mixer.mix_r": 8, "blocks.#.mixer.q_gain": 4,
            "blocks.#.mixer.q_norm_gain": 4, "blocks.#.mixer.ve_scale": 2, "blocks.#.mlp_scale": 12,
            "blocks.#.resid_mix": 12, "smear.gate": 1, "ve.shared_scale": 1}),
    ],
    "gpt": [
        ("AdamW", 0.07, 0.07, 0.03, {"tok_emb.weight": 1}),
        ("Muon", 0.13, 0.13, 0.05, {
            "blocks.#.mixer.c_k.weight": 9, "blocks.#.mixer.c_q.weight": 9, "blocks.#.mixer.c_v.weight": 9,
            "blocks.#.mixer.proj.weight": 9, "blocks.#.mlp.fc.weight": 9, "blocks.#.mlp.proj.weight": 9}),
        ("AdamW", 0.17, 0.17, 0.03, {
            "blocks.#.mix_scale": 9, "blocks.#.mixer.q_gain": 9, "blocks.#.mlp_scale": 9,
            "blocks.#.resid_mix": 9, "skip_weights": 1}),
    ],
    "moe": [
        ("AdamW", 0.07, 0.07, 0.03, {"tok_emb.weight": 1}),
        ("Muon", 0.13, 0.13, 0.05, {
            "blocks.#.mixer.c_k.weight": 4, "blocks.#.mixer.c_q.weight": 4, "blocks.#.mixer.c_v.weight": 4,
            "blocks.#.mixer.proj.weight": 4, "blocks.#.mixer.w_k.weight": 7, "blocks.#.mixer.w_r.weight": 7,
            "blocks.#.mixer.w_v.weight": 7, "blocks.#.mlp.experts.#.fc.weight": 40,
            "blocks.#.mlp.experts.#.proj.weight": 40, "blocks.#.mlp.fc.weight": 1, "blocks.#.mlp.proj.weight": 1,
            "blocks.#.mlp.shared.fc.weight": 10, "blocks.#.mlp.shared.proj.weight": 10}),
        ("AdamW", 0.17, 0.17, 0.03, {
            "blocks.#.mix_scale": 11, "blocks.#.mixer.k_norm_gain": 4, "blocks.#.mixer.mix_k": 7,
            "blocks.#.mixer.mix_r": 7, "blocks.#.mixer.q_gain": 4, "blocks.#.mixer.q_norm_gain": 4,
            "blocks.#.mlp.router.weight": 10, "blocks.#.mlp_scale": 11, "blocks.#.resid_mix": 11,
            "smear.gate": 1}),
    ],
}


@pytest.mark.parametrize("arch", sorted(TODAY))
def test_groups_of_non_rwkv_archs_are_unchanged(arch):
    model = make_model(arch)
    optimizers = build_optimizers(model, H)
    assert signature(model, optimizers) == TODAY[arch]
    order = [n for n, _ in model.named_parameters()]
    name_of = {id(p): n for n, p in model.named_parameters()}
    for opt in optimizers:  # each group lists its parameters in model order, as before
        for g in opt.param_groups:
            names = [name_of[id(p)] for p in g["params"]]
            assert names == sorted(names, key=order.index)


@pytest.mark.parametrize("arch", [*ARCH_DEFAULTS, "hybrid+R"])
def test_every_trainable_parameter_in_exactly_one_group(arch):
    model = make_model("hybrid", layer_pattern="TWRF", num_layers=4) if arch == "hybrid+R" else make_model(arch)
    frozen = next(n for n, _ in model.named_parameters() if n.endswith("mlp_scale") or n.endswith("ffn.x_k"))
    model.get_parameter(frozen).requires_grad_(False)
    found = groups_by_param(model, build_optimizers(model, H))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(found) == sorted(trainable)
    assert all(len(where) == 1 for where in found.values()), {n: w for n, w in found.items() if len(w) > 1}
    emb, mat, sca = split_params(model)
    assert sorted(n for n, _ in emb + mat + sca) == sorted(trainable)


def rwkv7_recipe(leaf: str) -> tuple[str, float, float, float]:
    """(optimizer, lr, base_lr, weight decay) of an RWKV-7 module's parameter, by the RWKV-LM recipe."""
    if leaf in LORA:
        return ("AdamW", H.scalar_lr, H.scalar_lr, 0.0)
    if leaf == "w0":
        return ("AdamW", 2 * H.scalar_lr, 2 * H.scalar_lr, 0.0)
    return ("AdamW", H.scalar_lr, H.scalar_lr, 0.0)  # vectors, r_k, ln_x, LayerNorms


def test_rwkv7_arch_follows_the_recipe():
    model = make_model("rwkv7", model_dim=128)
    found = groups_by_param(model, build_optimizers(model, H))
    seen = collections.Counter()
    for name, [where] in found.items():
        if name == "tok_emb.weight":
            assert where == ("AdamW", H.tied_embed_lr, H.tied_embed_lr, H.adam_wd)
        elif name.endswith(RWKV_MATRICES):
            assert where == ("Muon", H.matrix_lr, H.matrix_lr, H.muon_wd), name
        else:
            assert re.fullmatch(r"(blocks\.\d+\.(att|ffn|ln[012])|ln_out)\..*", name), name
            assert where == rwkv7_recipe(name.rsplit(".", 1)[-1]), name
        seen[where[0], where[3]] += 1
    leaves = {n.rsplit(".", 1)[-1] for n in found}
    assert set(LORA) <= leaves and {"w0", "x_r", "k_k", "r_k", "x_k"} <= leaves
    assert ".ln_x." in " ".join(found) and "ln_out.weight" in found and "blocks.0.ln0.weight" in found
    assert seen["Muon", H.muon_wd] == 8 * 6  # 4 time-mix + 2 channel-mix matrices per layer


def test_rwkv7_recipe_reaches_r_layers_of_the_hybrid_and_nothing_else():
    model = make_model("hybrid", layer_pattern="TWRF", num_layers=4)
    found = groups_by_param(model, build_optimizers(model, H))
    r_mixer = "blocks.2.mixer."
    names = dict(model.named_parameters())
    assert any(n.startswith(r_mixer + "w1") for n in found)
    for name, [where] in found.items():
        p = names[name]
        if name.startswith(r_mixer) and not name.endswith(RWKV_MATRICES):
            assert where == rwkv7_recipe(name[len(r_mixer):]), name
        elif name in ("tok_emb.weight",) or name.endswith(".table.weight"):
            assert where[0] == "AdamW" and where[3] == H.adam_wd, name
        elif p.ndim == 2 and min(p.shape) >= 16:
            assert where == ("Muon", H.matrix_lr, H.matrix_lr, H.muon_wd), name
        else:  # the hybrid's own gains and mixes keep scalar_lr with weight decay
            assert where == ("AdamW", H.scalar_lr, H.scalar_lr, H.adam_wd), name


def test_recipe_needs_an_rwkv7_module_not_just_a_name():
    class Toy(torch.nn.Module):  # LoRA-like names outside RWKV-7: the generic rules apply
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Parameter(torch.randn(32, 32))
            self.w0 = torch.nn.Parameter(torch.randn(32))

    toy = Toy()
    found = groups_by_param(toy, build_optimizers(toy, H))
    assert found["w1"] == [("Muon", H.matrix_lr, H.matrix_lr, H.muon_wd)]
    assert found["w0"] == [("AdamW", H.scalar_lr, H.scalar_lr, H.adam_wd)]
    Toy.optim_recipe = "rwkv7"
    found = groups_by_param(toy, build_optimizers(toy, H))
    assert found["w1"] == [rwkv7_recipe("w1")] and found["w0"] == [rwkv7_recipe("w0")]


def test_adam_step_decays_nothing_in_rwkv7_and_moves_w0_twice_as_far():
    model = make_model("rwkv7")
    optimizers = build_optimizers(model, H)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    for opt in optimizers:
        if isinstance(opt, torch.optim.AdamW):  # first Adam step with unit gradients: m̂/√v̂ = 1
            opt.step()
    step = 1 / (1 + H.adam_eps)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name == "tok_emb.weight":
            want = before[name] * (1 - H.tied_embed_lr * H.adam_wd) - H.tied_embed_lr * step
        elif name.endswith(RWKV_MATRICES):
            want = before[name]  # Muon, not stepped here
        else:
            want = before[name] - (2 if leaf == "w0" else 1) * H.scalar_lr * step
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7, msg=name)


def test_trainer_hyperparameters_suffice():
    from train_gpt import Hyperparameters

    h = Hyperparameters()
    model = make_model("rwkv7")
    found = groups_by_param(model, build_optimizers(model, h))
    assert found["blocks.1.att.w0"] == [("AdamW", 2 * h.scalar_lr, 2 * h.scalar_lr, 0.0)]
    assert found["blocks.1.att.g2"] == [("AdamW", h.scalar_lr, h.scalar_lr, 0.0)]
    h.rwkv_lora_lr = 0.003  # RWKV_LORA_LR moves the LoRA factors only
    found = groups_by_param(model, build_optimizers(model, h))
    assert found["blocks.1.att.g2"] == [("AdamW", 0.003, 0.003, 0.0)]
    assert found["blocks.1.att.w0"] == [("AdamW", 2 * h.scalar_lr, 2 * h.scalar_lr, 0.0)]


def test_lora_names_agree_with_the_model():
    from hybrid import optim, rwkv7

    assert optim.RWKV7_LORA_PARAMS == rwkv7.RWKV7_LORA_NAMES
    tm = make_model("rwkv7").blocks[1].att
    assert {n for n, p in tm.named_parameters(recurse=False) if p.ndim == 2 and n != "r_k"} == set(LORA)
