"""The trainer's parts in isolation: window plans, the bpb evaluation against a float64 hand
computation, Newton–Schulz, Muon, EMA, parameter groups, schedules, and hyperparameter resolution."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hybrid.evaluate import evaluate, window_plan
from hybrid.optim import EMA, Muon, split_params, zeropower_via_newtonschulz5
from hybrid.schedule import lr_scale, muon_momentum, qat_should_enable

ROOT = Path(__file__).resolve().parents[1]


# --- evaluation --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 200, 1000, 1023])
@pytest.mark.parametrize("seq_len,stride", [(64, 64), (64, 16), (64, 7), (64, 1), (32, 100)])
def test_window_plan_scores_every_target_once(n, seq_len, stride):
    counts = [0] * n
    for start, length, scored_from in window_plan(n, seq_len, stride):
        assert 0 <= start and start + length <= n and length <= seq_len
        for i in range(start + scored_from, start + length):
            counts[i] += 1
        if stride < seq_len and start > 0:  # later windows keep at least seq_len - stride context
            assert scored_from >= seq_len - stride
    assert counts == [1] * n


class BigramLM(torch.nn.Module):
    """A model whose logit at t depends on tokens t and t-1 only; enough to check the plumbing."""

    def __init__(self, vocab):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.b = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))

    def forward_logits(self, x):
        prev = torch.cat([x[:, :1], x[:, :-1]], dim=1)
        first = torch.zeros_like(x, dtype=torch.bool)
        first[:, 0] = True  # at a window's first position there is no previous token
        return self.a[x] + torch.where(first[..., None], 0.0, self.b[prev])


def test_evaluate_matches_float64_hand_computation():
    vocab = 11
    luts = SimpleNamespace(base_bytes=torch.randint(0, 4, (vocab,), dtype=torch.int16),
                           has_leading_space=torch.rand(vocab) < 0.5,
                           is_boundary=torch.arange(vocab) < 2)
    tokens = torch.randint(0, vocab, (301,), generator=torch.Generator().manual_seed(1))
    model = BigramLM(vocab)
    for seq_len, stride in [(32, 32), (32, 8), (50, 3)]:
        res = evaluate(model.forward_logits, tokens, seq_len, stride, luts, 4, torch.device("cpu"))
        nll, nbytes = 0.0, 0
        for start, length, scored_from in window_plan(300, seq_len, stride):
            x = tokens[start:start + length]
            logits = model.forward_logits(x[None])[0].double()
            for j in range(scored_from, length):
                y = int(tokens[start + j + 1])
                nll -= torch.log_softmax(logits[j], -1)[y].item()
                p = int(x[j])
                nbytes += int(luts.base_bytes[y]) + int(bool(luts.has_leading_space[y]) and not bool(luts.is_boundary[p]))
        assert res.tokens == 300 and res.bytes == nbytes
        assert res.val_loss == pytest.approx(nll / 300, rel=1e-6)
        assert res.val_bpb == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-6)


# --- optimizer ---------------------------------------------------------------------------------

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
    from hybrid.optim import compiled_zeropower

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
    from hybrid.optim import ns_cost

    load = [0] * opt.world_size
    for _, params, _, counts in opt.plan():
        for r in opt.owners(counts):
            load[r] += ns_cost(params[0].shape)
    return load


def test_muon_shards_balance_newton_schulz_over_8_ranks():
    """The default hybrid on 8 ranks: the old contiguous ceil(n/8) split gave the MLP banks of 12 to
    ranks 0-5 only (max/min Newton–Schulz load 3.85); the balanced plan is within 0.5%."""
    from hybrid.optim import ns_cost

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
    from hybrid.optim import balance_banks

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
from hybrid.optim import Muon
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


# --- schedules ---------------------------------------------------------------------------------

def test_lr_schedule_iteration_and_wallclock():
    assert lr_scale(0, 0, 100, 20, 0) == 1.0
    assert lr_scale(79, 0, 100, 20, 0) == 1.0
    assert lr_scale(80, 0, 100, 20, 0) == 1.0
    assert lr_scale(90, 0, 100, 20, 0) == pytest.approx(0.5)
    assert lr_scale(100, 0, 100, 20, 0) == 0.0
    # 10 ms per step, 20-step warmdown = 200 ms before a 1000 ms cap
    assert lr_scale(50, 500.0, 10**6, 20, 1000.0) == 1.0
    assert lr_scale(90, 900.0, 10**6, 20, 1000.0) == pytest.approx(0.5)
    assert lr_scale(100, 1000.0, 10**6, 20, 1000.0) == 0.0
    assert muon_momentum(0, 0.85, 0.95, 500) == pytest.approx(0.85)
    assert muon_momentum(250, 0.85, 0.95, 500) == pytest.approx(0.90)
    assert muon_momentum(10**4, 0.85, 0.95, 500) == pytest.approx(0.95)
    assert not qat_should_enable(0.1, 0.0) and qat_should_enable(0.1, 0.15) and not qat_should_enable(0.2, 0.15)


# --- hyperparameters ---------------------------------------------------------------------------

def test_hyperparameter_precedence():
    from train_gpt import resolve_hyperparameters

    h = resolve_hyperparameters([], env={})
    assert h.arch == "hybrid" and h.model_config().layer_pattern == "TTTWTTWTTWTF"
    h = resolve_hyperparameters(["--arch", "gpt"], env={"MATRIX_LR": "0.03"})
    assert h.matrix_lr == 0.03 and h.matrix_bits == 8 and h.model_config().num_layers == 9
    h = resolve_hyperparameters(["--matrix-lr", "0.01"], env={"MATRIX_LR": "0.03", "PRESET": "smoke"})
    assert h.matrix_lr == 0.01 and h.model_config().model_dim == 128
    with pytest.raises(ValueError, match="arch"):
        resolve_hyperparameters(["--arch", "nope"], env={})
    with pytest.raises(ValueError, match="[Pp]attern|layer"):
        resolve_hyperparameters(["--layer-pattern", "TTX"], env={})


def test_help_lists_env_names():
    out = subprocess.run([sys.executable, "train_gpt.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ), timeout=120)
    assert out.returncode == 0
    assert "--matrix-lr" in out.stdout and "MATRIX_LR" in out.stdout and "LAYER_PATTERN" in out.stdout


def test_code_bytes_count_the_modules_a_run_imports():
    """Code bytes = train_gpt.py + the project modules the run imported, summed from disk."""
    script = ("import train_gpt, sys; from quant.budget import loaded_source_files, code_bytes; "
              "fs = loaded_source_files(train_gpt.ROOT); print(code_bytes(fs)); "
              "print('\\n'.join(str(f.relative_to(train_gpt.ROOT)) for f in fs))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    total, *names = out.stdout.split()
    assert "train_gpt.py" in names and "hybrid/model.py" in names and "quant/artifact.py" in names
    assert "hybrid/rwkv7.py" not in names and "data/download.py" not in names  # not imported by a hybrid run
    assert int(total) == sum((ROOT / n).stat().st_size for n in names)
