"""hybrid/training/optim.py: Newton–Schulz (batched, compiled), Muon (the hand formula, banks, the balanced
rank plan, two gloo ranks against one, bit for bit), EMA, and the optimizer parameter groups: the
generic rules for every architecture, and the RWKV-7 recipe of BlinkDL RWKV-LM / modded-nanogpt-rwkv
(docs/TECHNIQUES.md, "RWKV-7 optimizer recipe") for RWKV-7 modules only.

The recipe, as written down here independently of the implementation:
- Muon (matrix_lr, muon_wd): receptance, key, value, output and the channel-mix key/value matrices;
- Adam, no weight decay, scalar_lr: the LoRA factors w1 w2 a1 a2 v1 v2 g1 g2, the per-channel vectors,
  r_k, ln_x and the block LayerNorms; w0 likewise but at 2 x scalar_lr;
- the tied embedding keeps its own Adam group (tied_embed_lr, adam_wd).
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT

from hybrid.config import ARCH_DEFAULTS, ModelConfig
from hybrid.model import HybridGPT
from hybrid.training.optim import EMA, Muon, build_optimizers, split_params, zeropower_via_newtonschulz5


# --- Newton–Schulz and Muon --------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_newton_schulz_is_nearly_orthogonal(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x = zeropower_via_newtonschulz5(g, steps=5).double()
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    # NS acts on each singular value separately: x ≈ U f(S) Vᵀ. The quintic sends every singular
    # value that is not tiny (relative to the largest) into roughly [0.7, 1.2], by design not to 1.
    f = torch.diagonal(u.T @ x @ vh.T)
    big = s / s.max() > 0.1
    assert f[big].min() > 0.5 and f.max() < 1.3
    off = u.T @ x @ vh.T - torch.diag(f)
    assert off.abs().max() < 1e-2  # singular vectors preserved
    cos = (x * (u @ vh)).sum() / (x.norm() * (u @ vh).norm())
    assert cos > 0.95


def test_muon_step_matches_hand_formula():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 64))
    p0 = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.9, weight_decay=0.5)
    g1, g2 = torch.randn(32, 64), torch.randn(32, 64)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
    buf = g1.clone()
    w = p0 * (1 - 0.1 * 0.5) - 0.1 * zeropower_via_newtonschulz5(g1 + 0.9 * buf)
    buf = 0.9 * buf + g2
    w = w * (1 - 0.1 * 0.5) - 0.1 * zeropower_via_newtonschulz5(g2 + 0.9 * buf)
    torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)


def test_batched_newton_schulz_equals_one_matrix_at_a_time():
    g = torch.randn(5, 48, 80, generator=torch.Generator().manual_seed(1))
    for gg in (g, g.mT):  # wide and tall stacks
        batched = zeropower_via_newtonschulz5(gg)
        for i in range(gg.size(0)):
            torch.testing.assert_close(batched[i], zeropower_via_newtonschulz5(gg[i]), rtol=1e-5, atol=1e-6)


def test_compiled_newton_schulz_equals_eager():
    from hybrid.training.optim import compiled_zeropower

    g = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(compiled_zeropower()(g), zeropower_via_newtonschulz5(g), rtol=1e-5, atol=1e-5)


def test_banked_muon_matches_per_matrix_reference():
    """Mixed shapes (two banks), interleaved in the param list, one matrix without a gradient:
    every matrix moves exactly as a plain per-matrix Muon would move it."""
    torch.manual_seed(0)
    shapes = [(32, 64), (48, 16), (32, 64), (32, 64), (48, 16)]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    start = [p.detach().clone() for p in params]
    opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    assert [len(ps) for ps, _ in opt.banks(opt.param_groups[0])] == [3, 2]
    grads = [[torch.randn(*s) for s in shapes] for _ in range(3)]
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = None if i == 3 else g.clone()
        opt.step()
    for i, (w, s) in enumerate(zip(start, shapes)):
        buf = torch.zeros(s)
        for step_grads in grads:
            w = w * (1 - 0.05 * 0.1)
            if i == 3:
                continue
            g = step_grads[i]
            buf = 0.9 * buf + g
            u = zeropower_via_newtonschulz5(g + 0.9 * buf) * max(1.0, s[0] / s[1]) ** 0.5
            w = w - 0.05 * u
        torch.testing.assert_close(params[i].detach(), w, rtol=1e-5, atol=1e-6)


def _default_muon(world_size: int, cfg=None):
    """Muon over the default model's matrices (built on the meta device), at rank 0 of `world_size`."""
    from hybrid.config import ModelConfig
    from hybrid.model import HybridGPT

    with torch.device("meta"):
        model = HybridGPT(cfg or ModelConfig())
    _, mat, _ = split_params(model)
    return Muon([p for _, p in mat], lr=0.1, momentum=0.9, world_size=world_size)


def _rank_loads(opt) -> list[int]:
    from hybrid.training.optim import ns_cost

    load = [0] * opt.world_size
    for _, params, _, counts in opt.plan():
        for r in opt.owners(counts):
            load[r] += ns_cost(params[0].shape)
    return load


def test_muon_shards_balance_newton_schulz_over_8_ranks():
    """The default hybrid on 8 ranks: the old contiguous ceil(n/8) split gave the MLP banks of 12 to
    ranks 0-5 only (max/min Newton–Schulz load 3.85); the balanced plan is within 0.5%."""
    from hybrid.training.optim import ns_cost

    opt = _default_muon(8)
    load = _rank_loads(opt)
    assert min(load) > 0 and max(load) / min(load) < 1.01  # measured 1.0047
    old = [0] * 8
    for params, per_rank in opt.banks(opt.param_groups[0]):
        for i, p in enumerate(params):
            old[i // per_rank] += ns_cost(p.shape)
    assert max(old) / min(old) > 3.8 and sum(old) == sum(load)  # measured 3.846: ranks 6-7 idle on the MLPs


@pytest.mark.parametrize("arch", ["hybrid", "gpt", "rwkv7", "moe"])
@pytest.mark.parametrize("world", [1, 2, 3, 5, 8, 16])
def test_muon_plan_runs_every_matrix_once(arch, world):
    """Every matrix is run by exactly one rank, at most ceil(n / W) per rank and bank (the all-gather
    slots of a plain split), and the plan is a function of the shapes alone (the same on every rank)."""
    from hybrid.config import ARCH_DEFAULTS, ModelConfig
    from hybrid.training.optim import balance_banks

    opt = _default_muon(world, ModelConfig(**ARCH_DEFAULTS[arch]))
    seen = []
    for _, params, per_rank, counts in opt.plan():
        assert len(counts) == world and sum(counts) == len(params) and max(counts) == per_rank
        owners = opt.owners(counts)
        for r in range(world):
            start = sum(counts[:r])
            mine = params[start:start + counts[r]]  # what Muon.step runs on rank r
            assert all(owners[start + j] == r for j in range(len(mine)))
            seen += [id(p) for p in mine]
    assert sorted(seen) == sorted(id(p) for p in opt.param_groups[0]["params"])
    again = Muon(opt.param_groups[0]["params"], lr=0.1, momentum=0.9, rank=world - 1, world_size=world)
    assert [c for *_, c in again.plan()] == [c for *_, c in opt.plan()]
    if world == 8 and arch != "hybrid":  # the other archs' balance on 8 ranks, measured
        load = _rank_loads(opt)
        assert max(load) / min(load) < {"gpt": 1.12, "rwkv7": 1.0001, "moe": 1.16}[arch]
    assert balance_banks([(12, 5), (12, 5)], 8) == [[2, 2, 2, 2, 1, 1, 1, 1], [1, 1, 1, 1, 2, 2, 2, 2]]


MUON_WORKER = r"""
import sys, torch, torch.distributed as dist
from hybrid.training.optim import Muon
rank, world, out, init = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if world > 1:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
shapes = [(32, 64), (48, 16), (32, 64), (32, 64), (48, 16), (16, 16), (48, 16), (48, 16), (48, 16), (64, 32)]
g = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1, rank=rank, world_size=world)
for step in range(3):
    for i, (p, s) in enumerate(zip(params, shapes)):
        grad = torch.randn(*s, generator=g)
        p.grad = None if i == 3 else grad  # one matrix never gets a gradient
    opt.step()
opt.gather_state()  # what write_checkpoint does before saving
torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, f"{out}/rank{rank}.pt")
if world > 1:
    # Both ranks leave the last collective before either tears the group down: a rank that destroys
    # it while the other still talks to it aborts gloo's threads ("terminate called without an
    # active exception"), as train_gpt.main guards against too.
    dist.barrier()
    del opt
    import gc
    gc.collect()
    dist.destroy_process_group()
"""


def _run_muon_worker(tmp_path, world: int) -> list[dict]:
    out = tmp_path / f"w{world}"
    out.mkdir()
    script = tmp_path / "muon_worker.py"
    script.write_text(MUON_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(out), str(tmp_path / f"pg{world}")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def test_muon_two_ranks_equal_one_rank_bit_for_bit(tmp_path):
    """gloo, 2 processes: banks of 3, 5, 1 and 1 matrices (uneven over 2 ranks, one rank idle on the
    small banks, one matrix without a gradient). After 3 steps every rank holds exactly the 1-process
    weights, and after gather_state exactly its momentum buffers (the checkpointed state)."""
    [single] = _run_muon_worker(tmp_path, 1)
    ranks = _run_muon_worker(tmp_path, 2)
    ref_state = single["opt"]["state"]
    assert sorted(ref_state) == [0, 1, 2, 4, 5, 6, 7, 8, 9]  # index 3 never had a gradient
    for out in ranks:
        for a, b in zip(out["params"], single["params"]):
            assert torch.equal(a, b)
        for i, st in out["opt"]["state"].items():
            want = ref_state[i]["momentum_buffer"] if i in ref_state else torch.zeros_like(single["params"][i])
            assert torch.equal(st["momentum_buffer"], want), i
        assert sorted(out["opt"]["state"]) == list(range(10))


# --- EMA ---------------------------------------------------------------------------------------

def test_ema_math():
    m = torch.nn.Linear(3, 2)
    ema = EMA(m, decay=0.9)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    torch.testing.assert_close(ema.state_dict()["weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))
    ema.copy_to(m)
    torch.testing.assert_close(m.weight.detach(), 0.9 * w0 + 0.1 * (w0 + 1.0))


# --- parameter groups --------------------------------------------------------------------------

def test_param_groups_cover_every_parameter_once():
    from hybrid.config import ARCH_DEFAULTS, ModelConfig
    from hybrid.model import HybridGPT

    for arch in ("hybrid", "gpt"):
        cfg = ModelConfig(**dict(ARCH_DEFAULTS[arch], model_dim=64, num_heads=4, num_kv_heads=2))
        model = HybridGPT(cfg)
        emb, mat, sca = split_params(model)
        names = [n for n, _ in emb + mat + sca]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())
        assert any(n.endswith("tok_emb.weight") for n, _ in emb)
        assert all(p.ndim == 2 for _, p in mat) and len(mat) > 0
        assert not any("resid_mix" in n or "skip_weights" in n for n, _ in mat)


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


# Captured with hybrid/training/optim.py before the RWKV-7 recipe existed (same H and SMALL): these
# architectures have no RWKV-7 module and no LayerNorm, so their groups must not move. (The hybrid's T
# mixers hold conv taps conv_mix_r/k since issue 11 made "conv" the default: the same group as mix_r/k.)
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
            "blocks.#.mixer.conv_mix_k": 8, "blocks.#.mixer.conv_mix_r": 8, "blocks.#.mixer.q_gain": 4,
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
    from hybrid import rwkv7
    from hybrid.training import optim

    assert optim.RWKV7_LORA_PARAMS == rwkv7.RWKV7_LORA_NAMES
    tm = make_model("rwkv7").blocks[1].att
    assert {n for n, p in tm.named_parameters(recurse=False) if p.ndim == 2 and n != "r_k"} == set(LORA)
