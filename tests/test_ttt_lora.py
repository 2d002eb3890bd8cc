"""hybrid/training/ttt_lora.py: per-document LoRA score-first TTT on CPU. Without updates it is a plain causal
scoring of every target inside its document (float64 reference), with evaluate's token and byte
counts; a chunk is scored before the adapters learn from it; scores are causal (a later BOS moves no
earlier score either); the adapters are reset per document; scores are full-softmax; batching does
not change them; the adapters really learn a repetitive document; the base model is left untouched;
2 gloo processes give one process's result.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_ttt_lora.py
(this file is also the worker of the 2-process test: python tests/test_ttt_lora.py RANK WORLD OUT INIT)
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

import hybrid.training.ttt_lora as ttt_lora  # noqa: E402
from data.bpb import token_bytes  # noqa: E402
from hybrid.config import ModelConfig  # noqa: E402
from hybrid.model import HybridGPT  # noqa: E402
from hybrid.training.ttt_lora import (adapter_targets, evaluate_ttt_lora, find_documents, phase_groups,  # noqa: E402
                                      split_documents)
from tests.test_eval import _one_thread, make_luts, make_tokens  # noqa: E402,F401  (V = 64; fixture)

V, BOS = 64, 1
CPU = torch.device("cpu")
SEQ, CHUNK = 32, 8
# a prefix without BOS, then documents (lengths in tokens, BOS included): one-token documents, ones
# shorter than a chunk, ones longer than seq_len (the window slides), one not a multiple of the chunk
DOCS = [70, 1, 3, 40, 100, 17, 9, 33, 2, 64]
PREFIX = 5


def tiny(pattern: str = "TWTF", randomize: bool = True) -> HybridGPT:
    cfg = {"vocab_size": V, "num_layers": len(pattern), "layer_pattern": pattern, "model_dim": 32, "num_heads": 4,
           "num_kv_heads": 2, "attn_window": 8, "rope_dims": 4, "ve_dim": 8, "bigram_buckets": 32, "bigram_dim": 8,
           "mlp_mult": 2.0}
    torch.manual_seed(0)
    model = HybridGPT(ModelConfig(**cfg))
    return (randomize_(model, std=0.2) if randomize else model).eval()


def doc_stream(docs=DOCS, prefix=PREFIX, seed=1) -> tuple[torch.Tensor, list[int]]:
    """(tokens, BOS positions): random non-BOS tokens, a BOS at the start of each document, one final
    token after the last document (its last target)."""
    tokens = make_tokens(prefix + sum(docs) + 1, seed=seed)
    tokens[tokens == BOS] = 2
    starts = [prefix + sum(docs[:i]) for i in range(len(docs))]
    tokens[starts] = BOS
    return tokens, starts


def bump(t: torch.Tensor) -> torch.Tensor:
    """Another token, never BOS (documents keep their bounds)."""
    u = (t + 7) % V
    return torch.where(u == BOS, torch.full_like(u, 8), u)


def run(model, tokens, seq_len=SEQ, chunk=CHUNK, **kw):
    kw.setdefault("lr", 0.01)
    kw.setdefault("docs_per_batch", 4)
    return evaluate_ttt_lora(model, tokens, seq_len, make_luts(), CPU, chunk=chunk, per_token=True, **kw)


def reference(model, tokens, seq_len=SEQ, chunk=CHUNK) -> torch.Tensor:
    """float64 nll of every target: documents from the BOS positions, each chunk [a, b) of a document
    scored by one causal forward over the document's tokens [max(0, a + chunk − seq_len), b)."""
    m64 = copy.deepcopy(model).double()
    n = tokens.numel() - 1
    starts = [0] + [p for p in range(1, n) if tokens[p] == BOS]
    nll = torch.full((n,), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        for s, e in zip(starts, starts[1:] + [n]):
            for a in range(0, e - s, chunk):
                b, w = min(a + chunk, e - s), max(0, a + chunk - seq_len)
                lp = F.log_softmax(m64.forward_logits(tokens[s + w:s + b][None])[0], dim=-1)
                for j in range(a, b):
                    nll[s + j] = -lp[j - w, tokens[s + j + 1]]
    return nll


# --- documents and ranks ------------------------------------------------------------------------------

def test_documents_partition_the_targets():
    tokens, starts = doc_stream()
    docs = find_documents(tokens, BOS)
    assert [s for s, _ in docs] == [0] + starts and sum(n for _, n in docs) == tokens.numel() - 1
    assert all(e == s + n for (s, n), (e, _) in zip(docs, docs[1:]))
    assert find_documents(torch.tensor([BOS, 5, 6, BOS]), BOS) == [(0, 3)]  # a final BOS is a target only
    assert find_documents(torch.tensor([BOS, BOS, BOS]), BOS) == [(0, 1), (1, 1)]
    assert find_documents(torch.tensor([5]), BOS) == []
    lengths = [n for _, n in docs]
    for world in (1, 2, 3, 8, 20):
        cuts = split_documents(lengths, world)
        assert cuts[0] == 0 and cuts[-1] == len(lengths) and cuts == sorted(cuts) and len(cuts) == world + 1
    assert split_documents([10] * 8, 4) == [0, 2, 4, 6, 8]


# --- 1. no update = plain causal scoring inside each document -------------------------------------------

@pytest.mark.parametrize("seq_len,chunk,batch", [(SEQ, CHUNK, 3), (24, 24, 4), (20, 7, 1)])
def test_without_updates_equals_causal_reference(seq_len, chunk, batch):
    model, (tokens, _) = tiny(), doc_stream()
    ref = reference(model, tokens, seq_len, chunk)
    res, stats = run(model, tokens, seq_len, chunk, lr=0.0, docs_per_batch=batch)
    n = tokens.numel() - 1
    assert not torch.isnan(ref).any()
    torch.testing.assert_close(stats["per_token"], ref, rtol=1e-5, atol=1e-5)
    assert res.val_loss * res.tokens == pytest.approx(ref.sum().item(), rel=1e-6)
    nbytes = int(token_bytes(tokens[:-1], tokens[1:], make_luts()).sum())
    assert (res.tokens, res.bytes) == (n, nbytes)
    assert res.val_bpb == pytest.approx(ref.sum().item() / (math.log(2) * nbytes), rel=1e-6)
    lengths = [PREFIX] + DOCS
    assert stats["docs"] == len(DOCS) + 1 and stats["steps"] == 0
    assert stats["chunks"] == sum(math.ceil(m / chunk) for m in lengths)


# --- 2. score before update ------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 2, 5])
def test_chunk_is_scored_before_the_adapters_learn_it(k):
    """Perturb the second half of chunk k's targets in the 100-token document: every target before them
    (its own earlier targets, chunk k's first half included) and every target of every other document
    keeps its score bit for bit; its later chunks change (the adapters learned the perturbed tokens)."""
    model, (tokens, starts) = tiny(), doc_stream()
    s, n = starts[4], DOCS[4]
    _, base = run(copy.deepcopy(model), tokens)
    first = s + k * CHUNK + CHUNK // 2  # the first perturbed target: token first + 1
    bad = tokens.clone()
    bad[first + 1:s + (k + 1) * CHUNK + 1] = bump(bad[first + 1:s + (k + 1) * CHUNK + 1])
    _, pert = run(copy.deepcopy(model), bad)
    assert torch.equal(pert["per_token"][:first], base["per_token"][:first])
    assert torch.equal(pert["per_token"][s + n:], base["per_token"][s + n:])  # the other documents
    later = slice(s + (k + 1) * CHUNK + SEQ, s + n)  # beyond the perturbed tokens' reach as context
    assert not torch.equal(pert["per_token"][later], base["per_token"][later])


# --- 3. causality --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pos", [3, 80, 131, 180, 181, 250])  # prefix, documents 1 and 5, chunk bounds, window slid
def test_perturbing_a_token_changes_no_earlier_target(pos):
    """Token pos is target pos − 1: no target before it may change, with TTT on."""
    model, (tokens, starts) = tiny(), doc_stream()
    assert pos not in starts
    _, base = run(copy.deepcopy(model), tokens)
    bad = tokens.clone()
    bad[pos] = bump(bad[pos])
    _, pert = run(copy.deepcopy(model), bad)
    assert torch.equal(pert["per_token"][:pos - 1], base["per_token"][:pos - 1])
    assert not torch.equal(pert["per_token"][pos - 1:], base["per_token"][pos - 1:])


@pytest.mark.parametrize("pos", [30, 131, 190])
def test_a_later_document_bound_moves_no_earlier_score(pos):
    """A BOS inserted at token pos (a document split in two) or one removed (two documents merged)
    changes no target before pos − 1: a chunk's window does not depend on where its document ends.
    (Up to float rounding: the batches' shapes change with the documents' lengths.)"""
    model, (tokens, starts) = tiny(), doc_stream()
    _, base = run(copy.deepcopy(model), tokens)
    for p, new in ((pos, BOS), (starts[5], 9)):
        bad = tokens.clone()
        bad[p] = new
        _, pert = run(copy.deepcopy(model), bad)
        torch.testing.assert_close(pert["per_token"][:p - 1], base["per_token"][:p - 1], rtol=0, atol=1e-6)
        assert (pert["per_token"][p - 1:] - base["per_token"][p - 1:]).abs().max() > 1e-3


# --- 4. adapters reset per document ------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 4, 5, 8])
def test_document_does_not_depend_on_the_previous_one(d):
    """Every non-BOS token of document d − 1 perturbed: document d (and every other one) unchanged bit for bit."""
    model, (tokens, starts) = tiny(), doc_stream()
    lo, hi = starts[d - 1] + 1, starts[d]
    if hi - lo < 1:
        pytest.skip("a one-token document has nothing but its BOS")
    _, base = run(copy.deepcopy(model), tokens, lr=0.05)
    bad = tokens.clone()
    bad[lo:hi] = bump(bad[lo:hi])
    _, pert = run(copy.deepcopy(model), bad, lr=0.05)
    assert torch.equal(pert["per_token"][starts[d]:], base["per_token"][starts[d]:])
    assert torch.equal(pert["per_token"][:lo - 1], base["per_token"][:lo - 1])
    assert not torch.equal(pert["per_token"][lo - 1:hi], base["per_token"][lo - 1:hi])


# --- 5. full softmax -------------------------------------------------------------------------------------

def test_scores_are_full_vocabulary_log_softmax(monkeypatch):
    model, (tokens, starts) = tiny(), doc_stream()
    seen, real = [], ttt_lora._masked_sums

    def spy(logits, x, y, mask, luts):
        seen.append((logits.double(), y, mask))
        return real(logits, x, y, mask, luts)

    monkeypatch.setattr(ttt_lora, "_masked_sums", spy)
    res, stats = run(copy.deepcopy(model), tokens, lr=0.05)
    total = 0.0
    for logits, y, mask in seen:  # adapted chunks too: logsumexp over all V logits minus the target's
        assert logits.size(-1) == V
        by_hand = torch.logsumexp(logits, -1) - logits.gather(-1, y[..., None])[..., 0]
        total += by_hand[mask].sum().item()
    # the scorer's cross-entropy is fp32 per token (summed in fp64): a few fp32 ulps (6e-8) of the sum,
    # where a softmax over part of the vocabulary would be off by whole percent
    assert total == pytest.approx(res.val_loss * res.tokens, rel=2e-7)
    assert stats["per_token"].sum().item() == pytest.approx(total, rel=1e-6)
    with torch.no_grad():  # a document's first chunk: adapters fresh (B = 0), the base model by hand
        for s, n in zip(starts[:5], DOCS):
            logits = model.forward_logits(tokens[s:s + CHUNK][None])[0].double()
            for j in range(min(n, 3)):  # the document's own targets
                want = (torch.logsumexp(logits[j], 0) - logits[j, tokens[s + j + 1]]).item()
                assert stats["per_token"][s + j].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


# --- 6. batching ------------------------------------------------------------------------------------------

def test_batching_changes_nothing():
    model, (tokens, _) = tiny(), doc_stream()
    results = [run(copy.deepcopy(model), tokens, lr=0.02, docs_per_batch=b, targets=("attn", "mixer", "head"))
               for b in (1, 4, 3, 16)]
    for res, stats in results[1:]:
        torch.testing.assert_close(stats["per_token"], results[0][1]["per_token"], rtol=0, atol=1e-5)
        assert (res.tokens, res.bytes) == (results[0][0].tokens, results[0][0].bytes)
    assert results[0][1]["batch_steps"] > results[1][1]["batch_steps"]
    assert results[1][1]["steps"] == results[0][1]["steps"] == results[0][1]["chunks"] - results[0][1]["docs"]


# --- 7. the adapters learn ----------------------------------------------------------------------------------

def test_repetitive_document_gets_cheaper():
    """One document: a 64-token segment 6 times. seq_len 32 cannot see the previous repeat, so only the
    adapters can make the later repeats cheaper."""
    model = tiny()
    seg = make_tokens(64, seed=5)
    seg[seg == BOS] = 2
    tokens = torch.cat([torch.tensor([BOS]), seg.repeat(6), seg[:1]])
    kw = dict(chunk=16, docs_per_batch=1, targets=("attn", "head"))
    plain, p0 = run(model, tokens, lr=0.0, **kw)
    adapted, p1 = run(model, tokens, lr=0.03, **kw)
    assert torch.equal(p1["per_token"][:16], p0["per_token"][:16])  # chunk 0: nothing learned yet
    late0, late1 = p0["per_token"][256:].mean().item(), p1["per_token"][256:].mean().item()
    assert late1 < late0 - 0.5, (late0, late1)
    assert adapted.val_bpb < plain.val_bpb and (adapted.tokens, adapted.bytes) == (plain.tokens, plain.bytes)


# --- 8. the base model is untouched ---------------------------------------------------------------------------

def test_base_model_unchanged_and_stats():
    model, (tokens, _) = tiny(), doc_stream()
    model.train()
    snapshot = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    calls = []
    res, stats = run(model, tokens, lr=0.05, targets=("attn", "mixer", "head"),
                     progress=lambda d, t: calls.append((d, t)))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), snapshot.values()))
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert not any(m._forward_hooks for m in model.modules())  # the adapters' hooks are gone
    names = [n for n, _ in adapter_targets(model, ("attn", "mixer"))]
    per_layer = ((0, "w_r w_k w_v"), (1, "c_q c_k c_v proj"), (2, "w_r w_k w_v"), (3, "c_q c_k c_v proj"))
    assert names == [f"blocks.{i}.mixer.{p}" for i, ps in per_layer for p in ps.split()]
    # rank 8 × (in + out): 6 mixer 32→32, c_q and proj 32→32, c_k and c_v 32→16 (2 KV heads of 8), head 32→V
    assert stats["adapter_params"] == 8 * (6 * 64 + 4 * 64 + 4 * 48 + (32 + V))
    n = tokens.numel() - 1
    assert calls[-1] == (n, n) and len(calls) == math.ceil((len(DOCS) + 1) / 4)
    assert stats["seconds"] > 0 and math.isfinite(res.val_loss)
    # the same model afterwards scores as before
    after = run(model, tokens, lr=0.0)[1]["per_token"]
    torch.testing.assert_close(after, reference(model, tokens), rtol=1e-5, atol=1e-5)


def test_static_shapes_and_steps():
    """Forwards of shape [docs_per_batch, min(c·chunk + chunk, seq_len)] only (a short last batch padded);
    one batched Adam step per chunk index that some document of the batch continues after."""
    model, (tokens, _) = tiny(), doc_stream()
    shapes, trunk = set(), model._trunk

    def spy(x, *a, **kw):
        shapes.add(tuple(x.shape))
        return trunk(x, *a, **kw)

    model._trunk = spy
    _, stats = run(model, tokens, lr=0.05, docs_per_batch=4)
    assert shapes <= {(4, min(c * CHUNK + CHUNK, SEQ)) for c in range(SEQ // CHUNK + 1)}
    lengths = sorted([PREFIX] + DOCS, reverse=True)
    longest = [lengths[i] for i in range(0, len(lengths), 4)]  # each batch's first (longest) document
    assert stats["batch_steps"] == sum(math.ceil(n / CHUNK) - 1 for n in longest)
    assert stats["steps"] == sum(math.ceil(n / CHUNK) - 1 for n in lengths)


def test_targets_and_refusals():
    model, (tokens, _) = tiny(), doc_stream()
    heads = run(copy.deepcopy(model), tokens, lr=0.05, targets=("head",))[1]["per_token"]
    attn = run(copy.deepcopy(model), tokens, lr=0.05, targets=("attn",))[1]["per_token"]
    assert not torch.equal(heads, attn)
    with pytest.raises(ValueError, match="chunk"):
        run(model, tokens, seq_len=16, chunk=32)
    with pytest.raises(ValueError, match="subset"):
        run(model, tokens, targets=("mlp",))
    with pytest.raises(ValueError, match="match no module"):
        run(tiny("TTTT"), tokens, targets=("attn",))
    res, stats = run(model, tokens[:1])
    assert (res.tokens, stats["docs"]) == (0, 0)


# --- 10. phases: global SGD of the base on scored groups of documents -------------------------------------------

def test_phase_groups():
    assert phase_groups(10, 0, 2000) == [(0, 10)]
    assert phase_groups(10, 2, 6) == [(0, 3), (3, 6), (6, 10)]
    assert phase_groups(10, 3, 2000) == [(0, 3), (3, 7), (7, 10)]  # every document in a phase: no rest
    assert phase_groups(2, 3, 2000) == [(0, 1), (1, 2)]  # empty groups dropped


def test_phases_score_before_training_the_base():
    """2 phases over the first 6 documents (groups: prefix + 2 docs, 3 docs, the rest): group 1 is
    read by the untrained base (bit for bit the phase_lr = 0 run), every later score moves; a token
    perturbed in a later group changes no earlier target bit for bit; the caller's model is untouched."""
    model, (tokens, starts) = tiny(), doc_stream()
    snapshot = copy.deepcopy(model.state_dict())
    kw = dict(lr=0.02, phases=2, phase_docs=6, phase_chunk=64, phase_seqs=2)
    _, off = run(model, tokens, **dict(kw, phase_lr=0.0))
    _, on = run(model, tokens, **dict(kw, phase_lr=0.05))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), snapshot.values()))
    g1, g2 = starts[2], starts[5]  # group 1 = the prefix and documents 0-1 (targets < g1), group 2 = 2-4
    assert torch.equal(on["per_token"][:g1], off["per_token"][:g1])
    assert (on["per_token"][g1:] - off["per_token"][g1:]).abs().max() > 1e-4
    assert on["phases"] == 2 and on["phase_steps"] > 0 and off["phases"] == 0
    for pos in (g1 + 3, g2 + 2, starts[8] + 1):  # in groups 2 and 3
        bad = tokens.clone()
        bad[pos] = bump(bad[pos])
        _, pert = run(model, bad, **dict(kw, phase_lr=0.05))
        assert torch.equal(pert["per_token"][:pos - 1], on["per_token"][:pos - 1]), pos
        assert not torch.equal(pert["per_token"][pos - 1:], on["per_token"][pos - 1:]), pos
    # the base trained on group 1 changes group 2's scores only through what group 1 holds
    bad = tokens.clone()
    bad[starts[0] + 5] = bump(bad[starts[0] + 5])  # a token of document 0 (group 1)
    _, pert = run(model, bad, **dict(kw, phase_lr=0.05))
    assert not torch.equal(pert["per_token"][g2:], on["per_token"][g2:])
    _, pert_off = run(model, bad, **dict(kw, phase_lr=0.0))
    assert torch.equal(pert_off["per_token"][g1:], off["per_token"][g1:])  # without the SGD: documents stay apart


def test_phases_refusals():
    model, (tokens, _) = tiny(), doc_stream()
    for bad in (dict(phases=-1), dict(phases=2, phase_docs=0), dict(phases=2, phase_lr=-1.0),
                dict(phases=1, phase_chunk=0)):
        with pytest.raises(ValueError, match="phase"):
            run(model, tokens, **bad)


# --- 9. two gloo processes -------------------------------------------------------------------------------------

PHASED = dict(phases=2, phase_docs=6, phase_lr=0.05, phase_chunk=64, phase_seqs=2)


def _worker(rank: int, world: int, out: str, init: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    tokens, _ = doc_stream()
    runs = []
    for _ in range(2):
        res, stats = evaluate_ttt_lora(tiny(), tokens, SEQ, make_luts(), CPU, rank=rank, world_size=world, lr=0.02,
                                       chunk=CHUNK, docs_per_batch=3, per_token=True)
        runs.append({"res": (res.val_loss, res.val_bpb, res.tokens, res.bytes), "per_token": stats["per_token"]})
    res, stats = evaluate_ttt_lora(tiny(), tokens, SEQ, make_luts(), CPU, rank=rank, world_size=world, lr=0.02,
                                   chunk=CHUNK, docs_per_batch=3, per_token=True, **PHASED)
    runs.append({"res": (res.val_loss, res.val_bpb, res.tokens, res.bytes), "per_token": stats["per_token"]})
    torch.save(runs, f"{out}/rank{rank}.pt")
    dist.barrier()  # no rank tears the group down while another still talks to it (gloo abort)
    dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    """2 gloo ranks: identical results on both, deterministic, equal to one process up to rounding, and
    bit for bit to one process that batches the documents as the 2 ranks do (layout_world_size=2)."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(out), str(tmp_path / "pg")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        tokens, _ = doc_stream()
        res, stats = run(tiny(), tokens, lr=0.02, docs_per_batch=3)
        same, same_stats = run(tiny(), tokens, lr=0.02, docs_per_batch=3, layout_world_size=2)
        phased, phased_stats = run(tiny(), tokens, lr=0.02, docs_per_batch=3, layout_world_size=2, **PHASED)
    finally:
        for p in procs:
            log, _ = p.communicate(timeout=180)
            assert p.returncode == 0, log[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    for run_ in (0, 1):
        assert ranks[0][run_]["res"] == ranks[1][run_]["res"]
        assert torch.equal(ranks[0][run_]["per_token"], ranks[1][run_]["per_token"])
    assert ranks[0][0]["res"] == ranks[0][1]["res"] and torch.equal(ranks[0][0]["per_token"], ranks[0][1]["per_token"])
    assert ranks[0][0]["res"][2:] == (res.tokens, res.bytes)
    assert ranks[0][0]["res"][0] == pytest.approx(res.val_loss, rel=1e-6)
    torch.testing.assert_close(ranks[0][0]["per_token"], stats["per_token"], rtol=0, atol=1e-5)
    # one process batching as 2 ranks would: the ranks' scores bit for bit
    assert torch.equal(same_stats["per_token"], ranks[0][0]["per_token"])
    assert same.val_loss == pytest.approx(ranks[0][0]["res"][0], rel=1e-12)
    assert (same.tokens, same.bytes) == ranks[0][0]["res"][2:]
    # phases: the global SGD's gradients are summed over the ranks: both ranks equal, one process close
    assert ranks[0][2]["res"] == ranks[1][2]["res"] and torch.equal(ranks[0][2]["per_token"], ranks[1][2]["per_token"])
    torch.testing.assert_close(ranks[0][2]["per_token"], phased_stats["per_token"], rtol=0, atol=1e-4)
    assert not torch.equal(ranks[0][2]["per_token"], ranks[0][0]["per_token"])
    with pytest.raises(ValueError, match="layout_world_size"):
        evaluate_ttt_lora(tiny(), tokens, SEQ, make_luts(), CPU, rank=0, world_size=2, layout_world_size=4)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
