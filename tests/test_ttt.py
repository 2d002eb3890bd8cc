"""hybrid/training/ttt.py: legal score-first test-time training on CPU. Without updates it is evaluate's single
pass exactly; every target is scored once, with the same token and byte counts, for any chunk size;
a token is scored before any update that has seen it; scores are causal and full-softmax; training
really adapts the model (a repeated stream gets much cheaper); the model given is trained, a copy is
not, the last chunk never is; 2 gloo processes are deterministic and keep identical replicas.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_ttt.py
(this file is also the worker of the 2-process test: python tests/test_ttt.py RANK WORLD OUT INIT)
"""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from conftest import randomize_  # noqa: E402

from data.bpb import token_bytes  # noqa: E402
from hybrid.config import ModelConfig  # noqa: E402
from hybrid.training.evaluate import evaluate, window_plan  # noqa: E402
from hybrid.model import HybridGPT  # noqa: E402
from hybrid.training.ttt import chunk_bounds, chunk_lr, chunk_windows, evaluate_ttt, train_windows  # noqa: E402

V = 64
CPU = torch.device("cpu")
SEQ, STRIDE, BATCH = 32, 8, 4


from tests.test_eval import _one_thread, make_luts, make_tokens  # noqa: E402,F401  (the same V = 64; fixture)


def tiny(pattern: str = "TWTF", randomize: bool = True, **kw) -> HybridGPT:
    base = {"vocab_size": V, "num_layers": len(pattern), "layer_pattern": pattern, "model_dim": 32, "num_heads": 4,
            "num_kv_heads": 2, "attn_window": 8, "rope_dims": 4, "ve_dim": 8, "bigram_buckets": 32, "bigram_dim": 8,
            "mlp_mult": 2.0}
    torch.manual_seed(0)
    model = HybridGPT(ModelConfig(**{**base, **kw}))
    return (randomize_(model, std=0.2) if randomize else model).eval()


def ttt(model, tokens, chunk, seq_len=SEQ, stride=STRIDE, batch=BATCH, **kw):
    kw.setdefault("lr", 0.05)
    kw.setdefault("epochs", 1)
    return evaluate_ttt(model, tokens, seq_len, stride, make_luts(), batch, CPU, chunk_tokens=chunk,
                        per_token=True, **kw)


def reference_per_target(model, tokens, seq_len, stride):
    """(nll [N], times scored [N]): window_plan scored by hand, one window at a time, full logits."""
    n = tokens.numel() - 1
    nll, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.int64)
    with torch.no_grad():
        for s, length, f in window_plan(n, seq_len, stride):
            logits = model.forward_logits(tokens[s:s + length][None])[0]
            lp = -F.log_softmax(logits.float(), dim=-1)[torch.arange(length), tokens[s + 1:s + length + 1]]
            nll[s + f:s + length] += lp[f:].double()
            count[s + f:s + length] += 1
    return nll, count


# --- 1. no update = evaluate's single pass, exactly ----------------------------------------------

@pytest.mark.parametrize("n,seq_len,stride,batch,chunk", [
    (600, 32, 8, 4, 100),    # sliding, windows straddle chunk boundaries
    (300, 32, 8, 3, 7),      # chunk < stride < seq_len: the first window spans many chunks
    (600, 32, 32, 4, 50),    # non-overlapping with a tail window, chunk not dividing the stream
    (600, 32, 8, 4, 5000),   # one chunk
    (20, 32, 8, 4, 6),       # stream shorter than one window
])
@pytest.mark.parametrize("no_update", [{"epochs": 0}, {"epochs": 1, "lr": 0.0}])
def test_without_updates_equals_evaluate(n, seq_len, stride, batch, chunk, no_update):
    model, luts, tokens = tiny(), make_luts(), make_tokens(n + 1)
    ref_shapes, shapes = set(), set()

    def spy(seen):
        def fn(x, last):
            seen.add((x.size(0), x.size(1), last))
            return model.forward_logits(x, last)
        return fn

    ref = evaluate(spy(ref_shapes), tokens, seq_len, stride, luts, batch, CPU, tail_logits=True)
    res, stats = evaluate_ttt(model, tokens, seq_len, stride, luts, batch, CPU, chunk_tokens=chunk,
                              logits_fn=spy(shapes), **no_update)
    nbytes = int(token_bytes(tokens[:-1], tokens[1:], luts).sum())
    assert (res.tokens, res.bytes) == (ref.tokens, ref.bytes) == (n, nbytes)
    assert abs(res.val_loss - ref.val_loss) <= 1e-12 and abs(res.val_bpb - ref.val_bpb) <= 1e-12
    assert shapes <= ref_shapes or n <= seq_len  # evaluate's static batch shapes (torch.compile: no new graph)
    assert stats["chunks"] == math.ceil(n / chunk)


# --- 2. every target scored exactly once, same counts, for any chunk size --------------------------

@pytest.mark.parametrize("chunk", [5, 13, 32, 100, 250])  # < stride, < seq_len, = seq_len, not dividing, one
@pytest.mark.parametrize("stride", [8, 32])
def test_counts_equal_evaluate_for_any_chunk(chunk, stride):
    model, luts, tokens = tiny(), make_luts(), make_tokens(202)
    ref = evaluate(model.forward_logits, tokens, SEQ, stride, luts, BATCH, CPU, tail_logits=True)
    ref_nll, ref_count = reference_per_target(model, tokens, SEQ, stride)
    assert (ref_count == 1).all()
    # the chunk plan: the chunks' windows score every target once between them
    scored = torch.zeros(201, dtype=torch.int64)
    bounds = chunk_bounds(201, chunk)
    for (a, b), wins in zip(bounds, chunk_windows(window_plan(201, SEQ, stride), bounds)):
        for s, n, f in wins:
            lo, hi = max(s + f, a), min(s + n, b)
            assert lo < hi  # no window without a target in its chunk
            scored[lo:hi] += 1
    assert (scored == 1).all()
    _, frozen = ttt(copy.deepcopy(model), tokens, chunk, stride=stride, epochs=0)
    torch.testing.assert_close(frozen["per_token"], ref_nll, rtol=1e-5, atol=1e-6)
    res, stats = ttt(model, tokens, chunk, stride=stride, epochs=1, lr=0.05)
    assert (res.tokens, res.bytes) == (ref.tokens, ref.bytes)
    assert stats["chunks"] == math.ceil(201 / chunk) and stats["trained_chunks"] == stats["chunks"] - 1
    assert res.val_loss == pytest.approx(stats["per_token"].mean().item(), rel=1e-9)


# --- 3. score before update ------------------------------------------------------------------------

def test_chunk_is_scored_before_training_on_it():
    """Perturb the second half of chunk k's targets: every target before them, chunk k's first half
    included, keeps its score bit for bit, which would fail if chunk k were trained on before being
    scored; later chunks change (chunk k's training read the perturbed tokens)."""
    model, tokens, chunk = tiny(), make_tokens(601), 100
    _, base = ttt(copy.deepcopy(model), tokens, chunk, lr=0.1)
    for k in (1, 3):
        first = k * chunk + chunk // 2  # first perturbed target of chunk k: token index first + 1
        bad = tokens.clone()
        bad[first + 1:(k + 1) * chunk + 1] = (bad[first + 1:(k + 1) * chunk + 1] + 7) % V
        _, pert = ttt(copy.deepcopy(model), bad, chunk, lr=0.1)
        assert torch.equal(pert["per_token"][:first], base["per_token"][:first])
        assert not torch.equal(pert["per_token"][(k + 1) * chunk + SEQ:], base["per_token"][(k + 1) * chunk + SEQ:])


# --- 4. causality --------------------------------------------------------------------------------

@pytest.mark.parametrize("pos", [5, 99, 100, 101, 150, 333])  # inside, at and after a chunk boundary
def test_perturbing_a_token_changes_no_earlier_target(pos):
    """Token `pos` is target pos − 1; with TTT on, no target before it may change (later ones may,
    through the context and through training: that is legal)."""
    model, tokens = tiny(), make_tokens(401)
    _, base = ttt(copy.deepcopy(model), tokens, 100, lr=0.1)
    bad = tokens.clone()
    bad[pos] = (bad[pos] + 1) % V
    _, pert = ttt(copy.deepcopy(model), bad, 100, lr=0.1)
    assert torch.equal(pert["per_token"][:pos - 1], base["per_token"][:pos - 1])
    assert not torch.equal(pert["per_token"][pos - 1:], base["per_token"][pos - 1:])


# --- 5. TTT adapts the model ------------------------------------------------------------------------

def test_ttt_learns_a_repeated_stream():
    """One random 500-token segment four times, one chunk per repeat: the seq_len-64 context cannot
    see the previous repeat, so only the updates make later chunks cheaper."""
    model, seg = tiny(randomize=False), make_tokens(500, seed=5)
    tokens = torch.cat([seg] * 4 + [seg[:1]])
    kw = dict(seq_len=64, stride=32, batch=8, epochs=4, train_seqs=2)
    plain, p0 = ttt(copy.deepcopy(model), tokens, 500, lr=0.0, **kw)
    adapted, p1 = ttt(copy.deepcopy(model), tokens, 500, lr=1.0, **kw)
    assert torch.equal(p1["per_token"][:500], p0["per_token"][:500])  # chunk 0: nothing trained yet
    last0, last1 = p0["per_token"][1500:].mean().item(), p1["per_token"][1500:].mean().item()
    assert last1 < 0.5 * last0, (last0, last1)
    assert adapted.val_loss < plain.val_loss - 0.5 and adapted.val_bpb < plain.val_bpb
    assert (adapted.tokens, adapted.bytes) == (plain.tokens, plain.bytes)


# --- 6. full softmax --------------------------------------------------------------------------------

def test_scores_are_full_vocabulary_log_softmax():
    model, tokens = tiny(), make_tokens(401)
    before = copy.deepcopy(model)
    _, stats = ttt(model, tokens, 100, lr=0.1)
    plan = window_plan(400, SEQ, STRIDE)
    with torch.no_grad():
        for j in (0, 1, 17, 31, 32, 45, 99):  # first chunk: scored before any update
            s, length, _ = next(w for w in plan if w[0] + w[2] <= j < w[0] + w[1])
            logits = before.forward_logits(tokens[s:s + length][None])[0, j - s].double()
            assert logits.numel() == V
            want = -(logits[tokens[j + 1]] - torch.logsumexp(logits, 0)).item()
            assert stats["per_token"][j].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


# --- 7. what is trained ------------------------------------------------------------------------------

def test_model_is_trained_copy_is_not_last_chunk_never():
    model, tokens, chunk = tiny(), make_tokens(451), 100  # chunks 100, 100, 100, 100, 50
    snapshot = copy.deepcopy(model)
    work = copy.deepcopy(model)
    calls = []
    res, stats = ttt(work, tokens, chunk, epochs=2, train_seqs=3, progress=lambda d, t: calls.append((d, t)))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), snapshot.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(work.state_dict().values(), snapshot.state_dict().values()))
    assert not work.training  # the training flag is restored
    assert stats["chunks"] == 5 and stats["trained_chunks"] == 4
    assert stats["steps"] == 4 * 2 * math.ceil(len(train_windows(0, 100, SEQ)) / 3)  # 4 windows (32, 32, 32, 4)
    assert calls == [(100, 450), (200, 450), (300, 450), (400, 450), (450, 450)]
    assert stats["seconds"] >= stats["score_seconds"] + stats["train_seconds"] > 0

    def final_weights(toks):
        m = copy.deepcopy(model)
        ttt(m, toks, chunk, epochs=2, train_seqs=3)
        return list(m.state_dict().values())

    trained = []  # every training window, located in the stream: (start, length)

    def spy_loss(x, y):
        for row_x, row_y in zip(x, y):
            row = torch.cat((row_x[:1], row_y))
            hits = [s for s in range(tokens.numel() - row.numel() + 1) if torch.equal(tokens[s:s + row.numel()], row)]
            assert len(hits) == 1
            trained.append((hits[0], row_y.numel()))
        return work2(x, y)

    work2 = copy.deepcopy(model)
    ttt(work2, tokens, chunk, epochs=2, train_seqs=3, loss_fn=spy_loss)
    assert all(torch.equal(a, b) for a, b in zip(work2.state_dict().values(), work.state_dict().values()))
    per_chunk = [train_windows(a, b, SEQ) for a, b in chunk_bounds(450, chunk)[:-1]]
    assert trained == [w for wins in per_chunk for w in wins * 2]  # each trained chunk's own targets, twice

    last = tokens.clone()
    last[401:] = (last[401:] + 1) % V  # every target of the last chunk (400..449)
    assert all(torch.equal(a, b) for a, b in zip(final_weights(last), work.state_dict().values()))
    prev = tokens.clone()
    prev[350] = (prev[350] + 1) % V  # a target of chunk 3, the last trained one
    assert not all(torch.equal(a, b) for a, b in zip(final_weights(prev), work.state_dict().values()))


def test_lr_schedule_and_refusals():
    assert chunk_lr(0, 10, 0.002) == 0.002 and chunk_lr(9, 10, 0.002) == pytest.approx(0.0, abs=1e-18)
    lrs = [chunk_lr(c, 10, 0.002) for c in range(10)]
    assert all(x > y for x, y in zip(lrs, lrs[1:])) and lrs[8] > 0  # the last trained chunk still moves
    assert chunk_lr(0, 1, 0.5) == 0.5
    model = tiny()
    with pytest.raises(ValueError, match="stateful"):
        ttt(model, make_tokens(101), 50, eval_mode="stateful")
    with pytest.raises(ValueError, match="chunk_tokens"):
        ttt(model, make_tokens(101), 0)


def test_moe_and_gpt_models_run():
    for model in (tiny("TtWf", moe_num_experts=2, moe_top_k=1, moe_expert_hidden=16, moe_shared_hidden=16),
                  tiny("FFFF")):
        tokens = make_tokens(201)
        ref = evaluate(model.forward_logits, tokens, SEQ, STRIDE, make_luts(), BATCH, CPU, tail_logits=True)
        res, stats = ttt(model, tokens, 64, lr=0.05)
        assert (res.tokens, res.bytes) == (ref.tokens, ref.bytes) and math.isfinite(res.val_loss)
        assert res.val_loss != ref.val_loss and stats["trained_chunks"] == 3


# --- 8. two gloo processes ----------------------------------------------------------------------------

# steps of 3 windows of (32, 32, 32, 4): the 4-token window alone, one rank idle; no clipping, so a
# gradient summed instead of averaged over ranks would show against one process
DIST_KW = dict(chunk=100, lr=0.3, epochs=2, train_seqs=3, grad_clip=0.0)


def _worker(rank: int, world: int, out: str, init: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    runs = []
    for _ in range(2):  # twice from scratch: the same process group, fresh model and optimizer
        model, tokens = tiny(), make_tokens(451)
        kw = dict(DIST_KW)
        res, stats = evaluate_ttt(model, tokens, SEQ, STRIDE, make_luts(), BATCH, CPU, rank=rank, world_size=world,
                                  chunk_tokens=kw.pop("chunk"), per_token=True, **kw)
        runs.append({"res": (res.val_loss, res.val_bpb, res.tokens, res.bytes), "per_token": stats["per_token"],
                     "weights": model.state_dict()})
    torch.save(runs, f"{out}/rank{rank}.pt")
    if world > 1:
        dist.barrier()  # no rank tears the group down while another still talks to it (gloo abort)
        dist.destroy_process_group()


def _start_two_ranks(tmp_path) -> tuple[list, Path]:
    """Launch the 2 gloo processes (each runs evaluate_ttt twice); `_results` collects them."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(out), str(tmp_path / "pg")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    return procs, out


def _results(procs, out: Path) -> list[list[dict]]:
    """[rank][run] results."""
    for p in procs:
        log, _ = p.communicate(timeout=180)
        assert p.returncode == 0, log[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_two_ranks_deterministic_identical_replicas(tmp_path):
    procs, out = _start_two_ranks(tmp_path)
    try:  # meanwhile, one process: the same math (token-weighted mean gradient per step) up to rounding
        model = tiny()
        kw = dict(DIST_KW)
        res, stats = ttt(model, make_tokens(451), kw.pop("chunk"), **kw)
        frozen = ttt(tiny(), make_tokens(451), 100, epochs=0)[1]["per_token"]
    finally:
        ranks = _results(procs, out)
    first, again = [r[0] for r in ranks], [r[1] for r in ranks]
    for run in (first, again):
        assert run[0]["res"] == run[1]["res"] and torch.equal(run[0]["per_token"], run[1]["per_token"])
        for a, b in zip(run[0]["weights"].values(), run[1]["weights"].values()):
            assert torch.equal(a, b)  # every rank ends with the same weights
    assert first[0]["res"] == again[0]["res"] and torch.equal(first[0]["per_token"], again[0]["per_token"])
    assert all(torch.equal(a, b) for a, b in zip(first[0]["weights"].values(), again[0]["weights"].values()))
    assert first[0]["res"][2:] == (res.tokens, res.bytes)
    assert first[0]["res"][0] == pytest.approx(res.val_loss, rel=1e-5)
    torch.testing.assert_close(first[0]["per_token"], stats["per_token"], rtol=1e-4, atol=1e-4)
    for a, b in zip(first[0]["weights"].values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (stats["per_token"][100:] - frozen[100:]).abs().max() > 1e-2  # the training did something


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
