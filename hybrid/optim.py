"""Optimizers: Muon for the matrices, Adam for embeddings and scalars, and the weight EMA.

Muon (Jordan et al., modded-nanogpt) replaces each matrix's momentum update by the nearest
semi-orthogonal matrix, computed with a quintic Newton–Schulz iteration. The golf records use it for
every 2-D weight inside the blocks; embeddings and control scalars stay with Adam (GOLF.md §3.4).

Distributed Muon follows the baseline: parameter i is orthogonalised by rank i % world_size, the
updates are written into one flat buffer and summed across ranks, and every rank applies the full
update. Momentum buffers therefore live only on the owning rank; `gather_muon_state` collects them
before a checkpoint so that a resumed run (with any world size) continues exactly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# Quintic coefficients (3.4445, -4.7750, 2.0315): the baseline's fixed NS5 (GOLF.md §3.4).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximate U Vᵀ of G = U S Vᵀ. bf16 on CUDA (as the records), fp32 on the CPU."""
    assert G.ndim == 2
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    X = X / (X.norm() + eps)  # spectral norm <= Frobenius norm <= 1, inside NS's basin
    transposed = G.size(0) > G.size(1)
    if transposed:  # iterate on the wide orientation: the Gram matrix is the smaller one
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    """Nesterov momentum → Newton–Schulz orthogonalisation → decoupled weight decay → update.

    Update of a (rows × cols) matrix is scaled by sqrt(max(1, rows/cols)) so tall and wide
    matrices move by comparable RMS (baseline). Weight decay is decoupled: p ← p·(1 − lr·wd)
    (golf record #60).
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int = 5,
                 nesterov: bool = True, weight_decay: float = 0.0, rank: int = 0, world_size: int = 1,
                 zeropower=zeropower_via_newtonschulz5):
        defaults = dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.rank, self.world_size = rank, world_size
        self.zeropower = zeropower

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            flat_dtype = torch.bfloat16 if params[0].is_cuda else torch.float32
            total = sum(p.numel() for p in params)
            flat = torch.zeros(total, device=params[0].device, dtype=flat_dtype)
            offset = 0
            for i, p in enumerate(params):
                if i % self.world_size == self.rank and p.grad is not None:
                    g = p.grad
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(g)
                    g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
                    g = self.zeropower(g, steps=group["backend_steps"])
                    g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    flat[offset:offset + p.numel()] = g.reshape(-1).to(flat_dtype)
                offset += p.numel()
            if self.world_size > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                update = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
                if wd > 0:
                    p.mul_(1.0 - lr * wd)
                p.add_(update, alpha=-lr)
                offset += p.numel()

    def gather_state(self) -> None:
        """Make every rank hold every momentum buffer (owner broadcasts), before a checkpoint."""
        if self.world_size == 1:
            return
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                dist.broadcast(state["momentum_buffer"], src=i % self.world_size)


# ---------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------

# Embedding tables (looked up, not multiplied): Adam, never Muon (GOLF.md §3.4).
EMBEDDING_NAMES = ("tok_emb.weight", "bigram.table.weight", "ve.table.weight")


def is_embedding(name: str) -> bool:
    return any(name.endswith(e) for e in EMBEDDING_NAMES)


# MoE routers (and the Qwen-style shared-expert gate): E×C logits that pick experts. They stay with
# Adam at any E (ARCHS.md §2.4: a small, separate learning rate; an orthogonalised update would give
# every expert's logit the same step size). Without this rule a router with E >= 16 would go to Muon.
ROUTER_NAMES = ("router.weight", "shared_gate.weight")


def is_router(name: str) -> bool:
    return any(name == r or name.endswith("." + r) for r in ROUTER_NAMES)


def is_matrix(name: str, p: Tensor) -> bool:
    """Muon's share: true 2-D weight matrices. Per-channel control tensors that happen to be
    2-D (resid_mix is 2×C, skip_weights is L/2×C) have a tiny dimension and stay with Adam, and so
    do MoE routers, by name, whatever their size."""
    return p.ndim == 2 and min(p.shape) >= 16 and not is_embedding(name) and not is_router(name)


def split_params(model: torch.nn.Module):
    """(embeddings, matrices, scalars): every trainable parameter lands in exactly one group; MoE
    routers are in the scalar (Adam) group."""
    emb, mat, sca = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_embedding(name):
            emb.append((name, p))
        elif is_matrix(name, p):
            mat.append((name, p))
        else:
            sca.append((name, p))
    return emb, mat, sca


def build_optimizers(model: torch.nn.Module, h, rank: int = 0, world_size: int = 1):
    """Adam(embeddings) + Muon(matrices) + Adam(scalars). Each group remembers its base lr."""
    emb, mat, sca = split_params(model)
    fused = next(model.parameters()).is_cuda
    adam_kw = dict(betas=(h.beta1, h.beta2), eps=h.adam_eps, weight_decay=h.adam_wd, fused=fused)
    emb_groups = []
    for name, p in emb:
        lr = h.tied_embed_lr if name.endswith("tok_emb.weight") else h.embed_lr
        emb_groups.append(dict(params=[p], lr=lr, base_lr=lr))
    optimizers = []
    if emb_groups:
        optimizers.append(torch.optim.AdamW(emb_groups, **adam_kw))
    if mat:
        muon = Muon([p for _, p in mat], lr=h.matrix_lr, momentum=h.muon_momentum,
                    backend_steps=h.muon_backend_steps, weight_decay=h.muon_wd,
                    rank=rank, world_size=world_size)
        for g in muon.param_groups:
            g["base_lr"] = h.matrix_lr
        optimizers.append(muon)
    if sca:
        optimizers.append(torch.optim.AdamW([dict(params=[p for _, p in sca], lr=h.scalar_lr,
                                                  base_lr=h.scalar_lr)], **adam_kw))
    return optimizers


# ---------------------------------------------------------------------------------------------
# EMA of the weights
# ---------------------------------------------------------------------------------------------

class EMA:
    """θ_ema ← d·θ_ema + (1−d)·θ after every step, in fp32, over the whole state dict
    (golf PR #287: decay 0.997; the EMA weights are the ones exported)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, t in model.state_dict().items() if t.is_floating_point()]
        sd = model.state_dict()
        self.shadow = [sd[n].detach().float().clone() for n in self.names]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        sd = model.state_dict()
        current = [sd[n].detach().float() for n in self.names]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {n: t for n, t in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {missing[:3]}")
        self.shadow = [state[n].float().clone().to(s.device) for n, s in zip(self.names, self.shadow)]

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        sd = model.state_dict()
        for n, t in zip(self.names, self.shadow):
            sd[n].copy_(t.to(sd[n].dtype))
