"""hybrid/training/evaluate.py on CPU: the fast sliding evaluation against the reference loop, its static batch
shapes and rank split; tail-only logits; the stateful (recurrent) evaluation against one forward over
the whole stream, and its refusal of attention models; the window plan scores every target once, and
evaluate() against a float64 hand computation of the loss and bpb.

Run: python -m pytest -q tests/test_eval.py
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import randomize_

from data.bpb import token_bytes
from hybrid.config import ARCH_DEFAULTS, ModelConfig
from hybrid.training.stateful import stateful_evaluate as evaluate_stateful
from hybrid.training.evaluate import (
    eval_mode_tag,
    evaluate,
    evaluate_ref,
    lane_plan,
    window_batches,
    window_plan,
)
from hybrid.model import HybridGPT

V = 64
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls; avoids oversubscribing a shared machine
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)


def make_luts(vocab: int = V):
    g = torch.Generator().manual_seed(3)
    return SimpleNamespace(base_bytes=torch.randint(0, 4, (vocab,), dtype=torch.int16, generator=g),
                           has_leading_space=torch.rand(vocab, generator=g) < 0.5,
                           is_boundary=torch.arange(vocab) < 2)


def make_tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def tiny(pattern: str, **kw) -> HybridGPT:
    base = {"vocab_size": V, "num_layers": len(pattern), "layer_pattern": pattern, "model_dim": 32, "num_heads": 4,
            "num_kv_heads": 2, "attn_window": 8, "rope_dims": 4, "ve_dim": 8, "bigram_buckets": 32, "bigram_dim": 8,
            "rwkv_head_size": 16, "mlp_mult": 2.0}
    model = HybridGPT(ModelConfig(**{**base, **kw}))
    return randomize_(model, std=0.2).eval()


def tiny_rwkv(**kw) -> HybridGPT:
    small = {"vocab_size": V, "num_layers": 2, "layer_pattern": "RR", "model_dim": 32, "rwkv_head_size": 16,
             "num_heads": 2, "num_kv_heads": 2}
    model = HybridGPT(ModelConfig(**{**ARCH_DEFAULTS["rwkv7"], **small, **kw}))
    return randomize_(model, std=0.2).eval()


def as_sums(res) -> tuple[float, int, int]:
    """(Σ nll, tokens, bytes) back from an EvalResult."""
    return res.val_loss * res.tokens, res.tokens, res.bytes


# --- sliding / non-overlapping -----------------------------------------------------------------

def test_forward_logits_last_is_the_tail():
    model = tiny("TWTF")
    x = make_tokens(40).view(2, 20)
    full = model.forward_logits(x)
    for last in (1, 7, 20):
        tail = model.forward_logits(x, last)
        assert tail.shape == (2, last, V)
        torch.testing.assert_close(tail, full[:, -last:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,seq_len,stride,batch", [
    (300, 32, 8, 4),     # sliding, windows not a multiple of the batch
    (301, 32, 7, 5),     # stride does not divide anything
    (300, 32, 32, 4),    # non-overlapping with a tail window
    (256, 32, 100, 3),   # stride > seq_len: non-overlapping, no tail
    (20, 32, 8, 4),      # stream shorter than one window
])
@pytest.mark.parametrize("tail_logits", [False, True])
def test_evaluate_matches_reference(n, seq_len, stride, batch, tail_logits):
    model, luts, tokens = tiny("TWTF"), make_luts(), make_tokens(n + 1)
    ref = evaluate_ref(model.forward_logits, tokens, seq_len, stride, luts, batch, CPU)
    new = evaluate(model.forward_logits, tokens, seq_len, stride, luts, batch, CPU, tail_logits=tail_logits)
    nbytes = int(token_bytes(tokens[:-1], tokens[1:], luts).sum())
    assert (new.tokens, new.bytes) == (ref.tokens, ref.bytes) == (n, nbytes)
    assert new.val_loss == pytest.approx(ref.val_loss, rel=1e-6)
    assert new.val_bpb == pytest.approx(ref.val_bpb, rel=1e-6)


def test_sliding_changes_the_score():
    """The fast path really uses each window's context: sliding differs from non-overlapping."""
    model, luts, tokens = tiny("TWTF"), make_luts(), make_tokens(301)
    slide = evaluate(model.forward_logits, tokens, 32, 8, luts, 4, CPU, tail_logits=True)
    flat = evaluate(model.forward_logits, tokens, 32, 32, luts, 4, CPU, tail_logits=True)
    assert slide.tokens == flat.tokens and abs(slide.val_loss - flat.val_loss) > 1e-4


@pytest.mark.parametrize("n,stride,shapes", [
    (300, 8, {(1, 32, 32), (4, 32, 8)}),  # the first window alone, then full batches
    (300, 32, {(4, 32, 32)}),  # non-overlapping: one shape, tail window included
])
def test_evaluate_batches_have_static_shapes(n, stride, shapes):
    model, luts, tokens = tiny("TWTF"), make_luts(), make_tokens(n + 1)
    seen = []

    def logits_fn(x, last):
        seen.append((x.size(0), x.size(1), last))
        return model.forward_logits(x, last)

    evaluate(logits_fn, tokens, 32, stride, luts, 4, CPU, tail_logits=True)
    assert set(seen) == shapes
    windows = len(window_plan(n, 32, stride))
    assert len(seen) == (1 if stride < 32 else 0) + math.ceil((windows - (1 if stride < 32 else 0)) / 4)


def test_window_batches_pad_with_unscored_windows():
    plan = window_plan(100, 16, 4)
    groups = window_batches(plan, 4, 5)
    assert [(length, last) for length, last, _ in groups] == [(16, 16), (16, 4)]
    scored = [(s, f) for _, _, batches in groups for b in batches for s, f in b if f < 16]
    assert sorted(scored) == sorted((s, f) for s, _, f in plan)
    assert all(len(b) == 5 for b in groups[1][2]) and len(groups[0][2]) == 1


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo group of one process: all_reduce is the identity, so evaluate(rank=r, world_size=w)
    returns rank r's own sums."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_rank_split_covers_the_stream(one_process_group):
    model, luts, tokens = tiny("TWTF"), make_luts(), make_tokens(302)
    whole = as_sums(evaluate(model.forward_logits, tokens, 32, 8, luts, 4, CPU, tail_logits=True))
    parts = [as_sums(evaluate(model.forward_logits, tokens, 32, 8, luts, 4, CPU, rank=r, world_size=3,
                              tail_logits=True)) for r in range(3)]
    assert sum(p[1] for p in parts) == whole[1] == 301 and sum(p[2] for p in parts) == whole[2]
    assert sum(p[0] for p in parts) == pytest.approx(whole[0], rel=1e-6)


# --- stateful ------------------------------------------------------------------------------------

STATEFUL_MODELS = {
    "rwkv7": lambda: tiny_rwkv(),
    "rwkv7-bigram-mlp": lambda: tiny_rwkv(bigram_buckets=32, bigram_dim=8, rwkv_ffn="mlp"),
    "hybrid-TRTR": lambda: tiny("TRTR", rwkv_ffn="cmix", unet_skips=True),  # smear, bigram, token shift
    "moe-TrRt": lambda: tiny("TrRt", moe_num_experts=2, moe_top_k=1, moe_expert_hidden=16, moe_shared_hidden=16),
}


@pytest.mark.parametrize("name", list(STATEFUL_MODELS))
def test_stateful_chunks_equal_one_forward(name):
    model = STATEFUL_MODELS[name]()
    x = make_tokens(2 * 50).view(2, 50)
    x[0, 20] = 1  # a BOS inside the stream: SmearGate's cut must survive the chunk boundary
    full = model.forward_logits(x)
    state, parts = None, []
    for a, b in [(0, 7), (7, 20), (20, 21), (21, 50)]:
        logits, state = model.forward_logits_stateful(x[:, a:b], state)
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_stateful_state_matters():
    """A fresh state per chunk gives different logits: the carried state is what makes them equal."""
    model = tiny_rwkv()
    x = make_tokens(40).view(1, 40)
    fresh = model.forward_logits_stateful(x[:, 20:], None)[0]
    assert (fresh - model.forward_logits(x)[:, 20:]).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_evaluate_stateful_one_lane_is_one_forward(chunk):
    model, luts, tokens = tiny_rwkv(), make_luts(), make_tokens(62)
    res = evaluate_stateful(model.forward_logits_stateful, tokens, chunk, luts, 1, CPU)
    logits = model.forward_logits(tokens[None, :-1])[0]
    nll = F.cross_entropy(logits.double(), tokens[1:], reduction="sum").item()
    nbytes = int(token_bytes(tokens[:-1], tokens[1:], luts).sum())
    assert (res.tokens, res.bytes) == (61, nbytes)
    assert res.val_loss == pytest.approx(nll / 61, rel=1e-5)
    assert res.val_bpb == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-5)


@pytest.mark.parametrize("warmup", [0, 5, 100])
def test_evaluate_stateful_lanes_score_their_spans(warmup):
    """Three lanes: each span scored from a fresh state `warmup` tokens before it, nothing twice."""
    model, luts, tokens = tiny("TRTR"), make_luts(), make_tokens(71)
    res = evaluate_stateful(model.forward_logits_stateful, tokens, 9, luts, 3, CPU, warmup=warmup)
    nll = 0.0
    for row_start, first, end in lane_plan(70, 3, warmup):
        logits = model.forward_logits(tokens[None, row_start:end])[0].double()
        nll += F.cross_entropy(logits[first - row_start:], tokens[first + 1:end + 1], reduction="sum").item()
    assert res.tokens == 70 and res.bytes == int(token_bytes(tokens[:-1], tokens[1:], luts).sum())
    assert res.val_loss == pytest.approx(nll / 70, rel=1e-5)


def test_stateful_rank_split_equals_more_lanes(one_process_group):
    """world_size × lanes spans: 2 ranks × 2 lanes is the 4-lane single-rank plan, split in two."""
    model, luts, tokens = tiny_rwkv(), make_luts(), make_tokens(90)
    whole = as_sums(evaluate_stateful(model.forward_logits_stateful, tokens, 8, luts, 4, CPU, warmup=3))
    parts = [as_sums(evaluate_stateful(model.forward_logits_stateful, tokens, 8, luts, 2, CPU, rank=r,
                                       world_size=2, warmup=3)) for r in range(2)]
    assert sum(p[1] for p in parts) == whole[1] == 89 and sum(p[2] for p in parts) == whole[2]
    assert sum(p[0] for p in parts) == pytest.approx(whole[0], rel=1e-6)


def test_lane_plan_partitions_targets():
    for n, k, w in [(70, 3, 0), (10, 4, 3), (2, 4, 1), (0, 2, 0)]:
        plan = lane_plan(n, k, w)
        assert len(plan) == k and [a for _, a, _ in plan] + [n] == [plan[0][1]] + [b for _, _, b in plan]
        assert all(max(0, a - w) == r and b - a in (n // k, n // k + 1) for r, a, b in plan)


@pytest.mark.parametrize("pattern", ["TWTF", "RRRF", "RWRR"])
def test_stateful_refuses_attention(pattern):
    model = tiny(pattern)
    with pytest.raises(ValueError, match="attention layers") as err:
        model.forward_logits_stateful(make_tokens(8).view(1, 8))
    assert all(k in str(err.value) for k in set(pattern) - {"R", "T"})
    with pytest.raises(ValueError):
        model.check_stateful()
    tiny_rwkv().check_stateful()  # pure RWKV-7 passes


def test_eval_mode_tag():
    assert eval_mode_tag("sliding", 1024, 64) == "sliding_stride64"
    assert eval_mode_tag("sliding", 1024, 1024) == "non_overlapping"
    assert eval_mode_tag("stateful", 2048, 64) == "stateful_chunk2048"
    with pytest.raises(ValueError, match="sliding"):
        eval_mode_tag("window", 1024, 64)


# --- window plan; evaluate() against a float64 hand computation --------------------------------

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


def test_progress_reports_every_window_once_and_ends_complete():
    model, tokens, luts = tiny("TWTF"), make_tokens(300), make_luts()
    calls = []
    plain = evaluate(model.forward_logits, tokens, 32, 8, luts, 4, CPU, tail_logits=True)
    res = evaluate(model.forward_logits, tokens, 32, 8, luts, 4, CPU, tail_logits=True,
                   progress=lambda done, total: calls.append((done, total)))
    assert res.val_loss == plain.val_loss  # the callback changes nothing
    total = len(window_plan(tokens.numel() - 1, 32, 8))
    assert calls[-1] == (total, total) and all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and len(calls) > 2
