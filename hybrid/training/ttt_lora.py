"""Per-document LoRA score-first test-time training (TTT=lora; golf PR #1787, the 2026-04-23 record's
recipe, about −0.013 bpb there): every document of the validation stream gets its own fresh low-rank
adapters, which learn from the document's already-scored chunks while it is read left to right.

Documents: the spans of the stream that start at each BOS token (the tokens before the first BOS, if
any, form a document too). In target terms (target j predicts tokens[j + 1] from tokens[..j]) document
d owns the targets j with s_d <= j < s_{d+1} (s_d its first token, s_{d+1} the next document's BOS,
so a document's last target is the next BOS; the stream's final token ends the last document).
Each document is read in chunks of `chunk` targets, c = 0, 1, ... (document-relative targets
[a, b) = [c·chunk, min((c+1)·chunk, n_d))):
    (a) score: one causal forward of the base model + the document's current adapters over the
        document's tokens [w, b) with w = max(0, a + chunk − seq_len) (a window of at most seq_len
        tokens ending at the chunk's end: the sliding window of stride `chunk`); each target of the
        chunk is scored from the window's positions up to it, i.e. with the last seq_len − chunk + 1
        to seq_len tokens of its document (all of them when the document is shorter), and the full
        softmax (`_masked_sums`: F.cross_entropy over the whole vocabulary, the challenge's bytes);
    (b) train (not after the document's last chunk, which no later score could use): one Adam step
        on the adapters with the mean next-token loss of the chunk's targets, computed from the very
        forward of (a) (its logits are the scores: no second forward).
Adapters: rank `rank_r`, output scale alpha / rank_r, on the CastedLinear projections named by
`targets`: "attn" = c_q, c_k, c_v, proj of every CausalAttention (W/F layers), "mixer" = w_r, w_k,
w_v of every token-shift mixer (T layers, any TOKEN_MIX), "head" = the tied LM head (added to the
logits before the softcap). y = W·x + (alpha/r)·B_d·(A_d·x), batched over documents (A [docs, r,
in], B [docs, out, r]); at the start of each document A_d is drawn U(−1/√in, 1/√in) (nn.Linear's
init) from a generator seeded with seed + the document's index in the stream, B_d = 0, and the Adam
moments are zero, so the adapted model starts equal to the base model and a document's scores
depend on nothing but its own tokens (not on batching, rank or the other documents).
The base weights are never modified: the adapters run as forward hooks on the model's modules,
removed before returning, and the gradients are taken with torch.autograd.grad for the adapters only
(no .grad is written on the model). Its training flag is restored; it runs in eval mode.

Legality (the four conditions, docs/TECHNIQUES.md "Score-first test-time training"):
1. causal: the score of target j reads the document's tokens [w, j] (w fixed by j's chunk index
   alone) and adapters trained on the document's earlier chunks, all before j. The window's start
   does not depend on where the document ends (a chunk that the document's end cuts short keeps the
   start of a full one), so not even a later BOS moves an earlier score; a BOS at or before j only
   starts j's document, which is the past;
2. full softmax: F.cross_entropy over the whole vocabulary of the softcapped logits;
3. score before update: chunk c is scored with adapters updated on chunks < c only; the update of
   chunk c reads targets < b, all scored in (a) of chunk c or earlier; adapters are reset per
   document, so no document learns from another;
4. one left-to-right pass: the documents partition the targets and the chunks partition each
   document's, so each target is scored exactly once, with evaluate's token and byte counts.
With lr = 0 the result is the base model's score of these windows (tests/test_ttt_lora.py checks it
against a float64 reference, and the conditions above bit for bit).

Batching: `docs_per_batch` documents (this rank's, longest first, so a batch's lengths are alike)
run in lockstep, chunk c of each in one forward of static shape [docs_per_batch, min(c·chunk + chunk,
seq_len)] (the window's start w depends on c alone): a row whose document ends inside or before
chunk c repeats its last token to the row's end (causal: no scored position reads it) and scores only
its own targets, a short last batch is padded with unscored rows, so a rank runs at most
ceil(seq_len / chunk) shapes (torch.compile and flex attention's per-shape graphs stay few). Rows never
interact, so batching changes the results only by float rounding (GEMM shapes). Adam: per element,
so per document; a document's step count at chunk c is c + 1 in any batch.

Distributed (torch.distributed initialised, every rank holding the same weights): the documents are
split over the ranks in contiguous blocks of about equal target counts (`split_documents`), the
float64 sums are all-reduced once at the end; deterministic for a given world size (on the CPU bit
for bit; on a GPU as far as its kernels are) and equal across world sizes up to float rounding.
One process can reproduce a W-rank run's batches exactly with layout_world_size=W.

Phases (`phases` > 0; the 2026-04-13 and 04-14 records' phased TTT, golf PR #1610 and #1626): the
first `phase_docs` documents of the stream are cut into `phases` equal groups of consecutive
documents, the rest form one last group. The groups are read in order, each exactly as above (its
documents split over the ranks, batched, adapters reset per document); after each of the first
`phases` groups, whose every target is scored by then, the BASE weights take a global SGD pass over
that group's tokens (`phase_sgd`: chunks of `phase_chunk` targets, non-overlapping windows of
seq_len, `phase_epochs` epochs, SGD + momentum with the cosine over its chunks, gradient clip, all
ranks together: hybrid/training/ttt.py's training step), and every later group is read with the
updated base. Legality holds as above: a group's scores depend on its own documents and, through the
base weights, on earlier groups only, all of them scored before any training on them. The base
model the caller passed is never changed: with phases the function trains a deep copy of it.

Cost per chunk: one forward over a window of up to seq_len tokens (as a sliding evaluation of stride
`chunk`) plus, unless it is the last chunk of every document of the batch, one backward; a batch runs
as many chunks as its longest document. Memory: activations of docs_per_batch × seq_len tokens with
autograd. Eager (the adapters are hooks); the base model's weights are shared, not copied.
Models: HybridGPT (its `_trunk` and tied head), the hybrid, gpt and moe archs; `--arch rwkv7` has
no attention and no token-shift mixer, so only "head" applies there.
"""
from __future__ import annotations

import math
import time
from bisect import bisect_right
from contextlib import nullcontext
from itertools import accumulate

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from data.bpb import ByteLuts
from hybrid.training.evaluate import EvalResult, _finish, _masked_sums
from hybrid.training.ttt import chunk_bounds, chunk_lr, train_span
from hybrid.layers import CastedLinear, CausalAttention

LORA_TARGETS = ("attn", "mixer", "head")
ATTN_PROJ = ("c_q", "c_k", "c_v", "proj")
MIXER_PROJ = ("w_r", "w_k", "w_v")


def find_documents(tokens: Tensor, bos_id: int) -> list[tuple[int, int]]:
    """[(first token, number of targets)] of the stream's documents in order: a document starts at
    position 0 and at every BOS that has a target (i.e. not the stream's last token); together they
    own every target 0 .. tokens.numel() − 2 exactly once."""
    n = tokens.numel() - 1
    if n <= 0:
        return []
    bos = torch.nonzero(tokens[:n] == bos_id).flatten().tolist()
    starts = [0] + [p for p in bos if p > 0]
    return [(s, e - s) for s, e in zip(starts, starts[1:] + [n])]


def split_documents(lengths: list[int], world_size: int) -> list[int]:
    """Rank r gets documents [cuts[r], cuts[r+1]): contiguous blocks cut where the running target count
    passes r/world_size of the total (a block may be empty; one long document is never split)."""
    cum = list(accumulate(lengths))
    total = cum[-1] if cum else 0
    return [0] + [bisect_right(cum, total * r // world_size) for r in range(1, world_size)] + [len(lengths)]


def adapter_targets(model: nn.Module, targets) -> list[tuple[str, CastedLinear]]:
    """(name, module) of the CastedLinear projections that `targets` ("attn", "mixer") adapt, in
    model order (the head is not a module: HybridGPT ties it to tok_emb)."""
    out = []
    for i, block in enumerate(getattr(model, "blocks", [])):
        mixer = getattr(block, "mixer", None)
        if mixer is None:
            continue
        if "attn" in targets and isinstance(mixer, CausalAttention):
            names = ATTN_PROJ
        elif "mixer" in targets and getattr(block, "kind", None) == "T":
            names = MIXER_PROJ
        else:
            continue
        for name in names:
            mod = getattr(mixer, name, None)
            if isinstance(mod, CastedLinear):
                out.append((f"blocks.{i}.mixer.{name}", mod))
    return out


def _lora_ctx(autocast):
    return autocast() if autocast is not None else nullcontext()


def _lora_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _init_a(doc_ids: list[int], shapes: list[tuple[int, int]], r: int, seed: int,
            device: torch.device) -> list[Tensor]:
    """Per adapter, A [len(doc_ids), r, in] fp32 on `device`: document g's rows drawn U(−1/√in, 1/√in)
    from torch.Generator().manual_seed(seed + g), whatever the batch it sits in."""
    sizes = [r * fan_in for fan_in, _ in shapes]
    bound = torch.cat([torch.full((n,), 1.0 / math.sqrt(fan_in)) for n, (fan_in, _) in zip(sizes, shapes)])
    rows = [torch.rand(sum(sizes), generator=torch.Generator().manual_seed(seed + g)) for g in doc_ids]
    flat = ((torch.stack(rows) * 2.0 - 1.0) * bound).to(device)
    return [part.reshape(len(doc_ids), r, fan_in).clone()
            for part, (fan_in, _) in zip(flat.split(sizes, dim=1), shapes)]


def _lora_hook(current: list, i: int, scale: float):
    """Forward hook adding scale·B·(A·x) of adapter i (current[i] = (A [k, r, in], B [k, out, r]),
    the batch's k documents) to a CastedLinear's output [k, T, out]."""
    def hook(module, args, out):
        if current[i] is None:  # between groups: the phase's global SGD trains the base alone
            return out
        a, b = current[i]
        x = args[0]
        delta = torch.matmul(torch.matmul(x, a.transpose(1, 2).to(x.dtype)), b.transpose(1, 2).to(x.dtype))
        return out + scale * delta.to(out.dtype)
    return hook


def lora_settings(hp: dict) -> dict:
    """evaluate_ttt_lora's keyword arguments from a run's settings (train_gpt.Hyperparameters as a
    dict, or the hparams its log saved): the one place the TTT_LORA_* settings become arguments. The
    phases' global SGD takes TTT=sgd's momentum, chunk and clip (TTT_MOMENTUM, TTT_CHUNK, TTT_CLIP)
    and EVAL_BATCH_SEQS windows per step; logs from before the phases existed read as phases = 0."""
    return dict(rank_r=int(hp["ttt_lora_rank"]), alpha=float(hp["ttt_lora_alpha"]), lr=float(hp["ttt_lora_lr"]),
                chunk=int(hp["ttt_lora_chunk"]), docs_per_batch=int(hp["ttt_lora_docs"]),
                targets=tuple(str(hp["ttt_lora_targets"]).split(",")), phases=int(hp.get("ttt_lora_phases", 0)),
                phase_docs=int(hp.get("ttt_lora_phase_docs", 2000)), phase_lr=float(hp.get("ttt_lora_phase_lr", 0.001)),
                phase_epochs=int(hp.get("ttt_lora_phase_epochs", 1)), phase_momentum=float(hp["ttt_momentum"]),
                phase_chunk=int(hp["ttt_chunk"]), phase_clip=float(hp["ttt_clip"]),
                phase_seqs=int(hp.get("eval_batch_seqs", 32)))


def phase_groups(num_docs: int, phases: int, phase_docs: int) -> list[tuple[int, int]]:
    """[(first document, end)] of the groups read in order: `phases` equal groups of the first
    min(phase_docs, num_docs) documents (cut at round(k·n / phases)), then the rest; empty groups are
    dropped. phases = 0: one group, every document."""
    n = min(phase_docs, num_docs) if phases > 0 else 0
    cuts = [round(n * k / phases) for k in range(phases + 1)] if phases > 0 else [0]
    cuts.append(num_docs)
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def phase_sgd(model: nn.Module, tokens: Tensor, a: int, b: int, seq_len: int, device: torch.device,
              rank: int, world_size: int, autocast, lr: float, momentum: float, epochs: int, chunk: int,
              grad_clip: float, step_seqs: int) -> int:
    """The global SGD of a phase: train `model`'s weights in place on targets [a, b) of the stream (all
    scored already), chunk by chunk, every rank together; returns the number of SGD steps."""
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    stream = tokens[a:b + 1].to(device=device, dtype=torch.int64)
    bounds = chunk_bounds(b - a, chunk)
    steps = 0
    model.train()
    for c, (ca, cb) in enumerate(bounds):  # cosine over len + 1: its last chunk still gets a small lr
        steps += train_span(model, opt, params, model, stream, 0, ca, cb, seq_len, epochs, step_seqs,
                            chunk_lr(c, len(bounds) + 1, lr), rank, world_size, autocast, grad_clip, device)
    opt.zero_grad(set_to_none=True)
    model.eval()
    return steps


def evaluate_ttt_lora(model: nn.Module, tokens: Tensor, seq_len: int, luts: ByteLuts, device: torch.device,
                      rank: int = 0, world_size: int = 1, autocast=None, bos_id: int = 1, rank_r: int = 8,
                      alpha: float = 16.0, lr: float = 1e-3, chunk: int = 256, docs_per_batch: int = 8,
                      targets=("attn", "head"), progress=None, per_token: bool = False, *,
                      betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                      seed: int = 0, layout_world_size: int | None = None, phases: int = 0,
                      phase_docs: int = 2000, phase_lr: float = 0.001, phase_momentum: float = 0.9,
                      phase_epochs: int = 1, phase_chunk: int = 32768, phase_clip: float = 1.0,
                      phase_seqs: int = 32) -> tuple[EvalResult, dict]:
    """Score-first per-document LoRA TTT evaluation of `tokens` (1-D LongTensor, the validation stream
    as `evaluate` takes it) with `model` (HybridGPT), whose weights it leaves untouched (module
    docstring).

    seq_len: the most tokens a score reads (chunk <= seq_len); luts, device, rank, world_size,
    autocast: as hybrid/evaluate.evaluate. bos_id: the token that starts a document. rank_r, alpha,
    targets (a subset of LORA_TARGETS): the adapters; lr, betas, eps: their Adam; chunk: targets per
    step; docs_per_batch: documents run together (throughput and memory only); seed: A's draws.
    progress(targets_done, targets_total) of this rank, after each batch of documents.
    layout_world_size (world_size 1 only): batch the documents as that many ranks would (each rank's
    block sorted and batched on its own), all in this process: the same batches, so the same scores
    bit for bit on the same device, as a run on that many ranks (records/verify.py re-runs an 8-GPU
    run's TTT on one GPU); the sums then differ from the ranks' all-reduce only in float64 rounding.
    per_token=True adds stats["per_token"]: float64 [num_targets] CPU tensor, each target's nll as
    scored (all ranks'), for tests. phases, phase_docs: the phased global SGD (module docstring; 0 =
    off), with phase_lr, phase_momentum, phase_epochs, phase_chunk (targets per chunk), phase_clip
    and phase_seqs (windows per SGD step over all ranks); phase_lr = 0 reads the groups with the
    untrained base.

    Returns (EvalResult, stats) with stats = {docs, chunks, steps (adapter updates, counted per
    document; all ranks; 0 when lr = 0), batch_steps (this rank's batched Adam steps), adapter_params
    (per document), phases (global SGD passes run), phase_steps, phase_seconds, seconds}."""
    targets = tuple(targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets:
        raise ValueError(f"LoRA TTT targets must be a non-empty subset of {LORA_TARGETS}, got {targets!r}")
    if not (hasattr(model, "_trunk") and hasattr(model, "tok_emb")):
        raise ValueError(f"{type(model).__name__} is not a HybridGPT (needs _trunk and the tied tok_emb head)")
    if layout_world_size is not None and world_size > 1 and layout_world_size != world_size:
        raise ValueError(f"layout_world_size={layout_world_size} is for one process (world_size 1), "
                         f"got world_size={world_size}")
    if seq_len < 1 or not 1 <= chunk <= seq_len or rank_r < 1 or docs_per_batch < 1 or lr < 0:
        raise ValueError(f"need 1 <= chunk <= seq_len, rank_r >= 1, docs_per_batch >= 1 and lr >= 0; got "
                         f"chunk={chunk} seq_len={seq_len} rank_r={rank_r} docs_per_batch={docs_per_batch} lr={lr}")
    if phases < 0 or (phases and (phase_docs < 1 or phase_lr < 0 or phase_epochs < 0 or phase_chunk < 1
                                  or phase_seqs < 1)):
        raise ValueError(f"phases must be >= 0, and with phases: phase_docs, phase_chunk, phase_seqs >= 1, "
                         f"phase_lr, phase_epochs >= 0; got phases={phases} phase_docs={phase_docs} "
                         f"phase_lr={phase_lr} phase_epochs={phase_epochs} phase_chunk={phase_chunk} "
                         f"phase_seqs={phase_seqs}")
    if phases and phase_lr > 0 and phase_epochs > 0:
        import copy

        model = copy.deepcopy(model)  # the global SGD trains the base: never the caller's model
    modules = adapter_targets(model, targets)
    head = "head" in targets
    if not modules and not head:
        raise ValueError(f"LoRA TTT targets {targets!r} match no module of this model (pattern "
                         f"{getattr(getattr(model, 'cfg', None), 'layer_pattern', '?')!r})")
    t0 = time.perf_counter()
    num_targets = tokens.numel() - 1
    docs = find_documents(tokens, bos_id)
    lengths = [n for _, n in docs]
    layout = layout_world_size or world_size
    groups = phase_groups(len(docs), phases, phase_docs)
    plan = []  # per group: (this rank's documents, its batches)
    for g0, g1 in groups:
        cuts = [g0 + k for k in split_documents(lengths[g0:g1], layout)]
        mine = list(range(cuts[rank], cuts[rank + 1])) if world_size > 1 else list(range(g0, g1))
        batches = []  # each (layout) rank's block, longest first (a batch's lengths alike), in batches
        for r in ([rank] if world_size > 1 else range(layout)):
            order = sorted(range(cuts[r], cuts[r + 1]), key=lambda g: (-lengths[g], g))
            batches += [order[k:k + docs_per_batch] for k in range(0, len(order), docs_per_batch)]
        plan.append((mine, batches))
    weight = model.tok_emb.weight
    dim, vocab = weight.shape[1], weight.shape[0]
    softcap = model.cfg.logit_softcap
    shapes = [(m.in_features, m.out_features) for _, m in modules] + ([(dim, vocab)] if head else [])
    scale = alpha / rank_r
    b1, b2 = betas
    n_chunks = [math.ceil(n / chunk) for n in lengths]

    sums = torch.zeros(3, dtype=torch.float64, device=device)
    per_tok = torch.zeros(max(num_targets, 0), dtype=torch.float64, device=device) if per_token else None
    current: list = [None] * len(modules)
    hooks = [m.register_forward_hook(_lora_hook(current, i, scale)) for i, (_, m) in enumerate(modules)]
    was_training = model.training
    model.eval()
    batch_steps, done, mine_total = 0, 0, sum(lengths[g] for mine, _ in plan for g in mine)
    phase_steps, phases_run, phase_s = 0, 0, 0.0
    try:
        for k, ((g0, g1), (mine, batches)) in enumerate(zip(groups, plan)):
            if mine:
                lo = docs[mine[0]][0]
                stream = tokens[lo:docs[mine[-1]][0] + lengths[mine[-1]] + 1].to(device=device, dtype=torch.int64)
            for batch in batches:
                # one static shape per chunk index: a short last batch is padded with unscored copies of its
                # last document, and documents that have finished stay in the batch, unscored (the batch's
                # documents are of similar lengths: longest first); rows never interact
                rows = batch + [batch[-1]] * (docs_per_batch - len(batch))
                first = torch.tensor([docs[g][0] - lo for g in rows], dtype=torch.int64, device=device)
                n_row = torch.tensor([lengths[g] for g in rows], dtype=torch.int64, device=device)
                n_live = torch.tensor([lengths[g] if i < len(batch) else 0 for i, g in enumerate(rows)],
                                      dtype=torch.int64, device=device)  # padding rows score nothing
                params = _init_a(rows, shapes, rank_r, seed, device)
                params += [torch.zeros(len(rows), fan_out, rank_r, device=device) for _, fan_out in shapes]
                for p in params:
                    p.requires_grad_(True)
                moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
                na = len(shapes)
                for i in range(len(modules)):
                    current[i] = (params[i], params[na + i])
                pos = torch.arange(chunk, device=device)
                for c in range(n_chunks[batch[0]]):
                    a = c * chunk
                    w = max(0, a + chunk - seq_len)  # the window [w, a + chunk): the same for every row
                    span = torch.arange(w, a + chunk, device=device)
                    # each row's own tokens, its last one repeated past its end (causal: never read by a score)
                    idx = first[:, None] + torch.minimum(span[None, :], (n_row.clamp(max=a + chunk) - 1)[:, None])
                    x, y = stream[idx], stream[idx + 1]  # (D, a + chunk − w)
                    mask = pos[None, :] < (n_live.clamp(max=a + chunk) - a)[:, None]  # (D, chunk): targets of chunk c
                    going = [i < len(batch) and n_chunks[g] > c + 1 for i, g in enumerate(rows)]  # a chunk c + 1 follows
                    train = lr > 0 and any(going)
                    with torch.enable_grad() if train else torch.no_grad(), _lora_ctx(autocast):
                        hidden = model._trunk(x)[0][:, -chunk:]  # (D, chunk, C): the chunk's positions
                        z = F.linear(hidden, weight.to(hidden.dtype)).float()
                        if head:
                            ha, hb = params[na - 1], params[2 * na - 1]
                            z = z + scale * torch.matmul(torch.matmul(hidden, ha.transpose(1, 2).to(hidden.dtype)),
                                                         hb.transpose(1, 2).to(hidden.dtype)).float()
                        logits = softcap * torch.tanh(z / softcap)  # = HybridGPT._head(hidden) when B_head = 0
                    xs, ys = x[:, -chunk:], y[:, -chunk:]
                    sums += _masked_sums(logits.detach(), xs, ys, mask, luts)
                    if per_tok is not None or train:
                        nll = F.cross_entropy(logits.reshape(-1, vocab), ys.reshape(-1), reduction="none").view_as(ys)
                    if per_tok is not None:
                        tgt = first[:, None] + lo + a + pos[None, :]
                        per_tok[tgt[mask]] = nll.detach()[mask].double()
                    if train:
                        # each continuing document's mean loss over its chunk (a full one: not its last)
                        wt = torch.tensor([1.0 / chunk if g else 0.0 for g in going], device=device)
                        loss = torch.where(mask, nll, torch.zeros_like(nll)).mul(wt[:, None]).sum()
                        grads = torch.autograd.grad(loss, params, allow_unused=True)
                        with torch.no_grad():  # Adam, per element (so per document); step c + 1 for every row
                            t = c + 1
                            for p, g, (m1, m2) in zip(params, grads, moments):
                                if g is None:
                                    g = torch.zeros_like(p)
                                m1.mul_(b1).add_(g, alpha=1 - b1)
                                m2.mul_(b2).addcmul_(g, g, value=1 - b2)
                                denom = (m2.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                                p.addcdiv_(m1, denom, value=-lr / (1 - b1 ** t))
                        batch_steps += 1
                done += sum(lengths[g] for g in batch)
                if progress is not None:
                    progress(done, mine_total)
            if k < phases and phase_lr > 0 and phase_epochs > 0 and k + 1 < len(groups):  # a group follows
                # every target of this group is scored (the SGD's all-reduces wait for every rank):
                # train the base on them, with no adapter in the forward
                ts = time.perf_counter()
                saved = list(current)
                current[:] = [None] * len(current)
                a, b = docs[g0][0], docs[g1 - 1][0] + lengths[g1 - 1]
                phase_steps += phase_sgd(model, tokens, a, b, seq_len, device, rank, world_size, autocast,
                                         phase_lr, phase_momentum, phase_epochs, phase_chunk, phase_clip,
                                         phase_seqs)
                current[:] = saved
                phases_run += 1
                phase_s += time.perf_counter() - ts
    finally:
        for h in hooks:
            h.remove()
        current.clear()
        model.train(was_training)
    _lora_sync(device)
    result = _finish(sums, world_size, t0)
    stats = {"docs": len(docs), "chunks": sum(n_chunks),
             "steps": sum(n - 1 for n in n_chunks) if lr > 0 else 0, "batch_steps": batch_steps,
             "adapter_params": sum(rank_r * (fi + fo) for fi, fo in shapes), "phases": phases_run,
             "phase_steps": phase_steps, "phase_seconds": phase_s, "seconds": time.perf_counter() - t0}
    if per_tok is not None:
        if world_size > 1:
            dist.all_reduce(per_tok, op=dist.ReduceOp.SUM)
        stats["per_token"] = per_tok.cpu()
    return result, stats
