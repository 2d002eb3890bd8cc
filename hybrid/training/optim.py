"""Optimizers: Muon for the matrices, Adam for embeddings and scalars, and the weight EMA.

Muon (Jordan et al., modded-nanogpt) replaces each matrix's momentum update by the nearest
semi-orthogonal matrix, computed with a quintic Newton–Schulz iteration. The golf records use it for
every 2-D weight inside the blocks; embeddings and control scalars stay with Adam (the baseline's split).

Distributed Muon ("Parallel Muon", golf PR #399, docs/TECHNIQUES.md: about −2 ms/step on 8×H100): the
matrices of one shape form a bank; in a bank of n matrices each rank runs at most ceil(n/W) of them, a
contiguous run in rank order, and how many is chosen so that the Newton–Schulz work (∝ rows·cols·
min(rows, cols) per matrix) summed over all banks is balanced (`balance_banks`: greedy, largest
first, to the least-loaded rank; the same plan on every rank). The plain contiguous split by
ceil(n/W) left ranks idle: on 8 ranks the hybrid's MLP banks of 12 went 2,2,2,2,2,2,0,0, a max/min
Newton–Schulz load over ranks of 3.85; now 1.005 (`--arch gpt` inf -> 1.11, moe 5.26 -> 1.16).
Each rank keeps the momentum of its own matrices only, runs one batched Newton–Schulz over them, and
the orthogonalised updates travel by one all-gather per bank of ceil(n/W) slots per rank (half the
bytes of the baseline's all-reduce of a mostly-zero buffer), launched asynchronously so the gathers
overlap the next bank's Newton–Schulz. Gradients arrive already averaged (DDP overlaps
that all-reduce with the backward pass). `gather_state` collects the momentum buffers before a
checkpoint so that a resumed run (with any world size) continues exactly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# Quintic coefficients (3.4445, -4.7750, 2.0315): the baseline's fixed NS5 (its zeropower_via_newtonschulz5).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximate U Vᵀ of G = U S Vᵀ for a matrix [R, C] or a stack of them [N, R, C] (each
    orthogonalised on its own). bf16 on CUDA (as the records), fp32 on the CPU."""
    assert G.ndim in (2, 3)
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    # spectral norm <= Frobenius norm <= 1, inside NS's basin
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide orientation: the Gram matrix is the smaller one
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if transposed else X


def compiled_zeropower():
    """Newton–Schulz compiled on its own (as the baseline and the records do): one graph per bank
    shape, so the recompile limit is raised to the number of distinct matrix shapes a model has."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    return torch.compile(zeropower_via_newtonschulz5, dynamic=False, fullgraph=True)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum → Newton–Schulz orthogonalisation → decoupled weight decay → update.

    Update of a (rows × cols) matrix is scaled by sqrt(max(1, rows/cols)) so tall and wide
    matrices move by comparable RMS (baseline). Weight decay is decoupled: p ← p·(1 − lr·wd)
    (golf record #60). Parameters are grouped into same-shape banks (module docstring).
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int = 5,
                 nesterov: bool = True, weight_decay: float = 0.0, rank: int = 0, world_size: int = 1,
                 zeropower=zeropower_via_newtonschulz5):
        defaults = dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.rank, self.world_size = rank, world_size
        self.zeropower = zeropower

    def banks(self, group: dict) -> list[tuple[list[Tensor], int]]:
        """[(params of one shape in group order, slots per rank = ceil(n / world_size))], in order of
        first appearance."""
        by_shape: dict[tuple, list[Tensor]] = {}
        for p in group["params"]:
            by_shape.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
        return [(ps, -(-len(ps) // self.world_size)) for ps in by_shape.values()]

    def plan(self) -> list[tuple[dict, list[Tensor], int, list[int]]]:
        """[(group, bank params, slots per rank, matrices per rank [world_size])] over every group's
        banks: rank r runs params[sum(counts[:r]) : sum(counts[:r + 1])] and sends them in its
        slots of the bank's all-gather buffer (`balance_banks`; identical on every rank)."""
        # cached per (group dict, params): load_state_dict makes new group dicts; the cache keeps the
        # old ones alive, so their ids cannot be reused while it holds them
        key = tuple((id(g), tuple(map(id, g["params"]))) for g in self.param_groups)
        if getattr(self, "_plan_key", None) != key:
            banks = [(g, ps, per_rank) for g in self.param_groups for ps, per_rank in self.banks(g)]
            counts = balance_banks([(len(ps), ns_cost(ps[0].shape)) for _, ps, _ in banks], self.world_size)
            self._plan = [(g, ps, per_rank, c) for (g, ps, per_rank), c in zip(banks, counts)]
            self._plan_key = key
        return self._plan

    @staticmethod
    def owners(counts: list[int]) -> list[int]:
        """The rank that runs each matrix of a bank with `counts` matrices per rank."""
        return [r for r, c in enumerate(counts) for _ in range(c)]

    @torch.no_grad()
    def step(self, closure=None):
        pending = []
        for group, params, per_rank, counts in self.plan():
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            start = sum(counts[:self.rank])
            mine = params[start:start + counts[self.rank]]
            rows, cols = params[0].shape
            out_dtype = torch.bfloat16 if params[0].is_cuda else torch.float32
            updates = torch.zeros(per_rank, rows, cols, device=params[0].device, dtype=out_dtype)
            grads, slots = [], []
            for j, p in enumerate(mine):
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(p.grad)
                grads.append(p.grad.add(buf, alpha=momentum) if group["nesterov"] else buf)
                slots.append(j)
            if grads:
                g = self.zeropower(torch.stack(grads), steps=group["backend_steps"])
                g = g * max(1.0, rows / cols) ** 0.5
                if len(slots) == per_rank:
                    updates.copy_(g)
                else:
                    updates[slots] = g.to(out_dtype)
            if self.world_size > 1:
                full = torch.empty(per_rank * self.world_size, rows, cols, device=updates.device,
                                   dtype=out_dtype)
                handle = dist.all_gather_into_tensor(full, updates, async_op=True)
            else:
                full, handle = updates, None
            # row of full that holds params[i]: its owner's block of per_rank slots, in bank order
            where = [r * per_rank + j for r, c in enumerate(counts) for j in range(c)]
            pending.append((params, full, where, handle, lr, wd))
        for params, full, where, handle, lr, wd in pending:
            if handle is not None:
                handle.wait()
            for p, i in zip(params, where):
                if wd > 0:
                    p.mul_(1.0 - lr * wd)
                p.add_(full[i].to(p.dtype), alpha=-lr)

    def gather_state(self) -> None:
        """Make every rank hold every momentum buffer (owner broadcasts), before a checkpoint."""
        if self.world_size == 1:
            return
        for _, params, _, counts in self.plan():
            for p, owner in zip(params, self.owners(counts)):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                dist.broadcast(state["momentum_buffer"], src=owner)


def ns_cost(shape) -> int:
    """Newton–Schulz work of one [rows, cols] matrix, up to a constant: rows·cols·min(rows, cols)
    (each iteration's three matmuls on the wide orientation: 2·m²·n + m³ multiply-adds, m = min)."""
    rows, cols = shape[-2:]
    return rows * cols * min(rows, cols)


def balance_banks(banks: list[tuple[int, int]], world_size: int) -> list[list[int]]:
    """For banks [(n matrices, cost per matrix)], the matrices each rank runs, [bank][rank].

    Greedy longest-first: the matrices by decreasing cost (ties: bank order), each to the least-loaded
    rank (ties: the lower rank) that has fewer than ceil(n / W) of its bank, so a bank's all-gather
    keeps the ceil(n / W) slots per rank of a plain contiguous split (the same bytes) while the summed
    Newton–Schulz load is balanced. Deterministic: every rank computes the same plan from the shapes."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0] * world_size
    out = [[0] * world_size for _ in banks]
    for b in sorted(range(len(banks)), key=lambda b: -banks[b][1]):  # stable: ties keep bank order
        n, cost = banks[b]
        cap = -(-n // world_size)
        for _ in range(n):
            r = min((r for r in range(world_size) if out[b][r] < cap), key=lambda r: (load[r], r))
            out[b][r] += 1
            load[r] += cost
    return out


# ---------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------

# Embedding tables (looked up, not multiplied): Adam, never Muon (the baseline's optimizer split).
EMBEDDING_NAMES = ("tok_emb.weight", "bigram.table.weight", "ve.table.weight")


def is_embedding(name: str) -> bool:
    return any(name.endswith(e) for e in EMBEDDING_NAMES)


# MoE routers (and the Qwen-style shared-expert gate): E×C logits that pick experts. They stay with
# Adam at any E (nanochat's router-lr sweep: a small, separate learning rate; an orthogonalised update would give
# every expert's logit the same step size). Without this rule a router with E >= 16 would go to Muon.
ROUTER_NAMES = ("router.weight", "shared_gate.weight")


def is_router(name: str) -> bool:
    return any(name == r or name.endswith("." + r) for r in ROUTER_NAMES)


def is_matrix(name: str, p: Tensor) -> bool:
    """Muon's share: true 2-D weight matrices. Per-channel control tensors that happen to be
    2-D (resid_mix is 2×C, skip_weights is L/2×C) have a tiny dimension and stay with Adam, and so
    do MoE routers, by name, whatever their size."""
    return p.ndim == 2 and min(p.shape) >= 16 and not is_embedding(name) and not is_router(name)


# RWKV-7's optimizer recipe (docs/TECHNIQUES.md, "RWKV-7 optimizer recipe"), for the parameters of
# modules marked `optim_recipe = "rwkv7"` (the time-mix, channel-mix and ln_x of hybrid/rwkv7.py) and of
# LayerNorms (here only RWKV-7's pre-LN block norms, BlinkDL RWKV-LM `Block`); nothing else in the model
# is touched by these rules:
# - BlinkDL RWKV-LM: weight decay **only** on the large projection matrices and emb/head,
#   "never on the vectors, LoRAs, norms" (reference README, "THIS IS VERY IMPORTANT"); the reference
#   `configure_optimizers` gives w0 `my_lr_scale 2.0`, i.e. "**2x LR**".
# - BlinkDL modded-nanogpt-rwkv (`rwkv_records/RWKV-7-fast-2024-11-09-19-49-33.txt`): Muon on r, k, v, o
#   and the channel-mix matrices (here CastedLinear children, which keep the generic Muon rule), Adam on
#   the LoRAs and vectors (that run keeps the LoRA `*_w1/*_w2` off Muon).
# So: LoRA factors, vectors/norms/r_k and w0 are three Adam groups at scalar_lr without weight decay,
# w0's at RWKV7_W0_LR_SCALE x scalar_lr. The names are hybrid/rwkv7.py's RWKV7_LORA_NAMES (repeated
# here so that optim does not import the RWKV-7 module).
RWKV7_LORA_PARAMS = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
RWKV7_DECAY_BIAS = "w0"
RWKV7_W0_LR_SCALE = 2.0
RWKV7_ROLES = ("lora", "vector", "w0")  # the Adam groups, in this order after the generic scalars


def rwkv7_roles(model: torch.nn.Module) -> dict[str, str]:
    """{parameter name: "lora" | "vector" | "w0"} for the parameters the RWKV-7 recipe governs (the
    own parameters of `optim_recipe == "rwkv7"` modules and of LayerNorms); empty for other models."""
    roles = {}
    for prefix, module in model.named_modules():
        if getattr(module, "optim_recipe", None) != "rwkv7" and not isinstance(module, torch.nn.LayerNorm):
            continue
        for leaf, _ in module.named_parameters(recurse=False):
            role = "lora" if leaf in RWKV7_LORA_PARAMS else "w0" if leaf == RWKV7_DECAY_BIAS else "vector"
            roles[f"{prefix}.{leaf}" if prefix else leaf] = role
    return roles


def split_params(model: torch.nn.Module):
    """(embeddings, matrices, scalars): every trainable parameter lands in exactly one group; MoE
    routers and the RWKV-7 recipe's LoRA factors (`rwkv7_roles`) are in the scalar (Adam) group."""
    roles = rwkv7_roles(model)
    emb, mat, sca = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_embedding(name):
            emb.append((name, p))
        elif is_matrix(name, p) and name not in roles:
            mat.append((name, p))
        else:
            sca.append((name, p))
    return emb, mat, sca


def scalar_groups(model: torch.nn.Module, sca: list, h) -> list[dict]:
    """Adam param groups of the scalar share: the generic one (scalar_lr, the optimizer's adam_wd), then
    the RWKV-7 recipe's lora / vector / w0 groups (weight decay 0; w0 at 2x lr; the LoRAs at
    h.rwkv_lora_lr when it is set), each only if non-empty."""
    roles = rwkv7_roles(model)
    groups = []
    generic = [p for n, p in sca if n not in roles]
    if generic:
        groups.append(dict(params=generic, lr=h.scalar_lr, base_lr=h.scalar_lr))
    for role in RWKV7_ROLES:
        params = [p for n, p in sca if roles.get(n) == role]
        if params:
            lr = h.scalar_lr * (RWKV7_W0_LR_SCALE if role == "w0" else 1.0)
            if role == "lora" and getattr(h, "rwkv_lora_lr", 0.0) > 0:  # RWKV_LORA_LR (0 = scalar_lr)
                lr = h.rwkv_lora_lr
            groups.append(dict(params=params, lr=lr, base_lr=lr, weight_decay=0.0))
    return groups


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
                    rank=rank, world_size=world_size, zeropower=compiled_zeropower() if fused else
                    zeropower_via_newtonschulz5)
        for g in muon.param_groups:
            g["base_lr"] = h.matrix_lr
        optimizers.append(muon)
    if sca:
        optimizers.append(torch.optim.AdamW(scalar_groups(model, sca, h), **adam_kw))
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
