"""Mixture-of-Experts feed-forward layer (`--arch moe`): router, dropless sorted dispatch, aux losses.

Shapes: N = B·T tokens, C model dim, E routed experts, k experts per token, H expert hidden width.

Routing (DeepSeek-V3 arXiv:2412.19437 / Kimi K2; Mixtral arXiv:2401.04088 / Qwen-MoE; docs/TECHNIQUES.md
"Mixture of Experts"), per token x [C]:

    z = W_r x                          [E]  router logits, always fp32 (autocast off)
    s = softmax(z) | sigmoid(z)        [E]  "softmax" = Mixtral/Qwen, "sigmoid" = DeepSeek-V3/Kimi
    c = s + b                          [E]  b = expert_bias buffer, used for SELECTION ONLY
        (n_group > 1: keep the topk_group groups with the largest sum of their top-2 c, mask others)
    I = topk(c, k)                     [k]  expert ids
    g = s[I]  (/ Σ g if norm_topk_prob) · routed_scaling_factor            [k]  gates, carry grad
    y = Σ_{i∈I} g_i · E_i(x) + σ(w_s·x)? · Shared(x)

Dispatch (dropless, no capacity, no token ever dropped; torchtitan `models/moe/moe.py`, nanochat `moe.py`):
    flat = I.flatten() [N·k] -> order = argsort(flat, stable) -> token = order // k
    xs = x[token] [N·k, C], rows grouped by expert; counts [E] = rows per expert
    expert MLPs on the contiguous segments: `torch._grouped_mm` (CUDA + bf16) or a loop over segments
    ys · g (the gate multiplies the expert OUTPUT: with relu² experts, scaling the input would gate by
    g², nanochat docstring) -> rows written back to their (token, slot) place with index_copy (no
    atomics, deterministic) -> [N, k, C].sum(1).
`moe_ref` runs every expert on every token and masks by the dense [N, E] gate matrix: the parity
reference for the dispatch.

Expert weights are a ModuleList of `MoEExpert`, each two 2-D `CastedLinear`s (fc [H or 2H, C], proj
[C, H]), not a 3-D bank: the int6 exporter quantizes every 2-D matrix per row, QAT switches any
`CastedLinear`'s `qat_bits`, and Muon takes 2-D matrices (= per-expert orthogonalisation), so experts
need no special case anywhere. The grouped-mm path stacks the (fake-quantized) weights per call.
The router is a plain `nn.Linear` (no QAT; the design keeps it fp16/fp32 in the artifact) and
`expert_bias` is an fp32 buffer updated outside autograd by `update_bias` / `update_expert_biases`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybrid.layers import CastedLinear

MOE_ROUTERS = ("softmax", "sigmoid")
MOE_ACTIVATIONS = ("swiglu", "leaky_relu2", "relu2")
MOE_BALANCE_LOSSES = ("batch", "sequence")
MOE_DISPATCH = ("auto", "grouped", "loop")


@dataclass
class MoEConfig:
    """One MoE FFN's shape and routing. Defaults: the first golf design (docs/TECHNIQUES.md, "Mixture of
    Experts"): 4 routed experts of hidden 256, top-1, one shared expert of hidden 512, sigmoid router
    with bias balancing."""

    num_experts: int = 4
    top_k: int = 1
    expert_hidden: int = 256
    num_shared_experts: int = 1
    shared_hidden: int = 512  # hidden width of EACH shared expert; all of them are fused into one MLP
    shared_gate: bool = False  # Qwen2-MoE: shared output × σ(w_s·x)
    router: str = "sigmoid"
    norm_topk_prob: bool = False  # k=1 must stay False: a renormalised single gate is always 1
    routed_scaling_factor: float = 1.0  # DeepSeek-V3 2.5, Kimi K2 2.827
    # Load balance: "batch" = Switch/Mixtral E·Σ f_i P_i over all N tokens (HF's scale: f sums to k);
    # "sequence" = DeepSeek-V3's per-sequence (E/k)·Σ f_i P_i, averaged over sequences (=1 if uniform).
    aux_loss_coef: float = 1e-4
    balance_loss: str = "sequence"
    z_loss_coef: float = 1e-3  # ST-MoE router z-loss
    bias_balancing: bool = True  # aux-loss-free balancing, arXiv 2408.15664
    bias_update_rate: float = 1e-3  # torchtitan's load_balance_coeff
    activation: str = "leaky_relu2"
    n_group: int = 1  # DeepSeek-V3 group-limited routing (8 groups / 4 kept in V3); 1 = off
    topk_group: int = 1
    dispatch: str = "auto"  # auto: grouped_mm on CUDA bf16, else the segment loop

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"MoEConfig: {msg}")

        need(self.num_experts >= 1, f"num_experts must be >= 1, got {self.num_experts}")
        need(1 <= self.top_k <= self.num_experts, f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        need(self.expert_hidden >= 1, f"expert_hidden must be >= 1, got {self.expert_hidden}")
        need(self.num_shared_experts >= 0, f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        need(self.num_shared_experts == 0 or self.shared_hidden >= 1, f"shared_hidden must be >= 1, got {self.shared_hidden}")
        need(self.router in MOE_ROUTERS, f"router must be one of {MOE_ROUTERS}, got {self.router!r}")
        need(self.activation in MOE_ACTIVATIONS, f"activation must be one of {MOE_ACTIVATIONS}, got {self.activation!r}")
        need(self.balance_loss in MOE_BALANCE_LOSSES, f"balance_loss must be one of {MOE_BALANCE_LOSSES}, got {self.balance_loss!r}")
        need(self.dispatch in MOE_DISPATCH, f"dispatch must be one of {MOE_DISPATCH}, got {self.dispatch!r}")
        need(not (self.norm_topk_prob and self.top_k == 1),
             "norm_topk_prob with top_k=1 makes every gate exactly 1, so the router would get no gradient "
             "from the LM loss; set norm_topk_prob=False")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "routed_scaling_factor"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.n_group >= 1 and self.num_experts % self.n_group == 0,
             f"n_group must divide num_experts={self.num_experts}, got {self.n_group}")
        need(1 <= self.topk_group <= self.n_group, f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
        need(self.topk_group * (self.num_experts // self.n_group) >= self.top_k,
             f"topk_group={self.topk_group} groups of {self.num_experts // self.n_group} experts hold fewer than top_k={self.top_k}")


def expert_activation(h: Tensor, activation: str) -> Tensor:
    """[..., H or 2H] -> [..., H]. swiglu: silu(first half) ⊙ second half (HF gate_up_proj layout);
    leaky_relu2 = leaky_relu(h, 0.5)² (golf PR #493); relu2 = relu(h)² (modded-nanogpt)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "leaky_relu2":
        return F.leaky_relu(h, 0.5).square()
    return torch.relu(h).square()


class MoEExpert(nn.Module):
    """One expert MLP, [..., C] -> [..., C]: proj(act(fc(x))). fc is [2H, C] for swiglu (gate rows
    first, then up rows), else [H, C]; proj [C, H] is marked zero-init like the dense MLP's."""

    def __init__(self, dim: int, hidden: int, activation: str):
        super().__init__()
        self.activation = activation
        self.fc = CastedLinear(dim, 2 * hidden if activation == "swiglu" else hidden)
        self.proj = CastedLinear(hidden, dim)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(expert_activation(self.fc(x), self.activation))


class MoERouting(NamedTuple):
    logits: Tensor  # [N, E] fp32 router logits
    scores: Tensor  # [N, E] fp32 softmax probabilities or sigmoid affinities (no bias)
    idx: Tensor  # [N, k] int64 chosen experts (distinct per token)
    gates: Tensor  # [N, k] fp32 gate values (normalised / scaled)


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


class MoEFFN(nn.Module):
    """forward(x [B, T, C] or [N, C]) -> (y same shape, aux dict). See the module docstring.

    aux: "loss" (aux_loss_coef·balance + z_loss_coef·z, add it to the LM loss), "balance_loss" and
    "z_loss" (unweighted, with grad), and detached statistics: "tokens_per_expert" [E] token-slot
    counts, "expert_frac" [E] (sums to 1), "load_max_mean" (max/mean load; 1 = perfectly balanced)."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        cfg.validate()
        self.dim, self.cfg = dim, cfg
        E = cfg.num_experts
        self.router = nn.Linear(dim, E, bias=False)
        self.experts = nn.ModuleList(MoEExpert(dim, cfg.expert_hidden, cfg.activation) for _ in range(E))
        # Several shared experts fused into one MLP of hidden n·h: concatenating hidden units is
        # exactly the sum of the separate experts' outputs (HF DeepseekV3MoE does the same).
        n_sh = cfg.num_shared_experts
        self.shared = MoEExpert(dim, n_sh * cfg.shared_hidden, cfg.activation) if n_sh > 0 else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if (n_sh > 0 and cfg.shared_gate) else None
        # Selection bias (persistent: it shapes routing at eval, so it ships in the artifact) and the
        # token-slot counts accumulated over training forwards since the last bias update.
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("load_accum", torch.zeros(E, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Buffers only (router, shared gate and experts are initialised by their owners)."""
        self.expert_bias.zero_()
        self.load_accum.zero_()

    # ---- routing ---------------------------------------------------------------------------------

    def route(self, x: Tensor) -> MoERouting:
        """x [N, C] -> MoERouting. Selection is non-differentiable; gradient reaches the router
        through the gates (and the aux losses) only."""
        cfg = self.cfg
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())  # [N, E]
        scores = torch.softmax(logits, dim=-1) if cfg.router == "softmax" else torch.sigmoid(logits)
        with torch.no_grad():
            choice = scores + self.expert_bias  # bias steers selection only (arXiv 2408.15664)
            if cfg.n_group > 1:
                # DeepSeek-V3 group-limited routing: rank groups by the sum of their top-2 scores.
                N, G = choice.size(0), cfg.n_group
                grouped = choice.view(N, G, -1)
                group_score = grouped.topk(min(2, grouped.size(-1)), dim=-1).values.sum(-1)  # [N, G]
                keep = torch.zeros(N, G, dtype=torch.bool, device=x.device)
                keep.scatter_(1, group_score.topk(cfg.topk_group, dim=-1).indices, True)
                choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(N, -1)
            idx = choice.topk(cfg.top_k, dim=-1).indices  # [N, k]
        gates = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)  # eps as HF DeepSeek-V3
        if cfg.routed_scaling_factor != 1.0:
            gates = gates * cfg.routed_scaling_factor
        return MoERouting(logits, scores, idx, gates)

    def aux_losses(self, r: MoERouting, num_seqs: int) -> dict[str, Tensor]:
        """Balance loss, z-loss and load statistics from one routing of N = num_seqs·T tokens."""
        cfg = self.cfg
        N, k = r.idx.shape
        E = cfg.num_experts
        ones = torch.ones(N * k, dtype=torch.float32, device=r.idx.device)
        counts = torch.zeros(E, dtype=torch.float32, device=r.idx.device).scatter_add_(0, r.idx.reshape(-1), ones)
        # P uses probabilities over all experts: softmax as is, sigmoid affinities renormalised per
        # token (DeepSeek-V3 report, s'_i = s_i / Σ_j s_j).
        probs = r.scores if cfg.router == "softmax" else r.scores / r.scores.sum(dim=-1, keepdim=True)
        if cfg.balance_loss == "batch":
            # Switch / HF load_balancing_loss_func: f_i = count_i / N (sums to k), P_i = mean_t p_i.
            balance = E * (counts / N * probs.mean(0)).sum()
        else:
            T = N // num_seqs
            seq_counts = torch.zeros(num_seqs, E, dtype=torch.float32, device=r.idx.device)
            seq_counts.scatter_add_(1, r.idx.reshape(num_seqs, T * k), ones.view(num_seqs, T * k))
            f = seq_counts * (E / (k * T))  # [B, E], 1 when uniform
            balance = (f * probs.view(num_seqs, T, E).mean(1)).sum(-1).mean()
        z_loss = torch.logsumexp(r.logits, dim=-1).square().mean()
        frac = (counts / (N * k)).detach()
        return {
            "loss": cfg.aux_loss_coef * balance + cfg.z_loss_coef * z_loss,
            "balance_loss": balance,
            "z_loss": z_loss,
            "tokens_per_expert": counts.detach(),
            "expert_frac": frac,
            "load_max_mean": frac.max() * E,
        }

    # ---- experts ---------------------------------------------------------------------------------

    def _use_grouped(self, x: Tensor) -> bool:
        mode = self.cfg.dispatch
        if mode == "grouped":
            if not grouped_mm_available():
                raise RuntimeError(f"MoEConfig.dispatch='grouped' but torch {torch.__version__} has no torch._grouped_mm")
            return True
        if mode == "loop":
            return False
        # auto: the bf16 CUDA kernel wants 16-byte aligned rows (dims % 8); elsewhere the loop was
        # faster in our CPU measurements (the CPU _grouped_mm is a fallback).
        hidden = self.cfg.expert_hidden
        return (grouped_mm_available() and x.is_cuda and x.dtype == torch.bfloat16
                and self.dim % 8 == 0 and hidden % 8 == 0)

    def _experts_sorted(self, xs: Tensor, counts: Tensor) -> Tensor:
        """xs [M, C] rows grouped by expert (counts[e] rows for expert e, in order) -> [M, C]."""
        act = self.cfg.activation
        if self._use_grouped(xs):
            offs = counts.cumsum(0).to(torch.int32)  # end offset of every expert's rows
            # [E, out, in] stacked, transposed to [E, in, out]: a column-major right operand.
            w_fc = torch.stack([e.fc.casted_weight(xs.dtype) for e in self.experts])
            w_proj = torch.stack([e.proj.casted_weight(xs.dtype) for e in self.experts])
            h = torch._grouped_mm(xs, w_fc.transpose(-2, -1), offs=offs)
            return torch._grouped_mm(expert_activation(h, act), w_proj.transpose(-2, -1), offs=offs)
        # Every expert runs, even on an empty segment, so every parameter gets a (zero) grad: DDP and
        # the optimizers see the same parameter set every step.
        segments = xs.split(counts.tolist())  # host sync; this is the CPU / fallback path
        return torch.cat([expert(seg) for expert, seg in zip(self.experts, segments)], dim=0)

    def dispatch(self, x: Tensor, idx: Tensor, gates: Tensor) -> Tensor:
        """Routed part, dropless: x [N, C], idx/gates [N, k] -> Σ_j gates[:, j] · E_idx[:, j](x), [N, C]."""
        N, k = idx.shape
        flat = idx.reshape(-1)  # slot s = token·k + j
        order = torch.argsort(flat, stable=True)  # slots grouped by expert
        counts = torch.zeros(self.cfg.num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))  # fixed shape: compiles, no host sync
        ys = self._experts_sorted(x.index_select(0, order // k), counts)  # [N·k, C]
        ys = ys * gates.reshape(-1).index_select(0, order).unsqueeze(-1).to(ys.dtype)
        back = torch.index_copy(ys.new_zeros(N * k, ys.size(-1)), 0, order, ys)  # slot order again
        return back.view(N, k, -1).sum(dim=1)

    def shared_out(self, x: Tensor) -> Tensor | None:
        if self.shared is None:
            return None
        y = self.shared(x)
        if self.shared_gate is not None:
            with torch.autocast(device_type=x.device.type, enabled=False):
                g = torch.sigmoid(F.linear(x.float(), self.shared_gate.weight.float()))
            y = y * g.to(y.dtype)
        return y

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        shape = x.shape
        num_seqs = shape[0] if x.dim() == 3 else 1
        x2 = x.reshape(-1, self.dim)
        shared = self.shared_out(x2)  # first: independent of routing, overlaps on GPU
        r = self.route(x2)
        y = self.dispatch(x2, r.idx, r.gates)
        if shared is not None:
            y = y + shared
        aux = self.aux_losses(r, num_seqs)
        if self.training and self.cfg.bias_balancing:
            self.load_accum.add_(aux["tokens_per_expert"])
        return y.view(shape), aux

    @torch.no_grad()
    def update_bias(self, load: Tensor | None = None) -> None:
        """b ← b + rate·sign(mean(load) − load), then centre b; clears the accumulator. `load`
        defaults to the counts accumulated since the last call (pass all-reduced counts under DDP).
        With no tokens seen, sign(0) = 0 leaves b unchanged."""
        load = self.load_accum if load is None else load
        self.expert_bias.add_(torch.sign(load.mean() - load) * self.cfg.bias_update_rate)
        self.expert_bias.sub_(self.expert_bias.mean())
        self.load_accum.zero_()


def moe_ref(moe: MoEFFN, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Dense reference: every expert on every token, weighted by the dense [N, E] gate matrix
    (zero off the chosen k). Same routing and aux as `moe.forward`; does not touch load_accum."""
    shape = x.shape
    num_seqs = shape[0] if x.dim() == 3 else 1
    x2 = x.reshape(-1, moe.dim)
    r = moe.route(x2)
    dense = torch.zeros_like(r.scores).scatter(1, r.idx, r.gates)  # [N, E]
    y = sum(dense[:, e:e + 1].to(x2.dtype) * expert(x2) for e, expert in enumerate(moe.experts))
    shared = moe.shared_out(x2)
    if shared is not None:
        y = y + shared
    return y.view(shape), moe.aux_losses(r, num_seqs)


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


@torch.no_grad()
def update_expert_biases(model: nn.Module) -> int:
    """Apply the aux-loss-free bias update to every MoEFFN with bias_balancing; call after each
    optimizer step. Under torch.distributed the counts of all layers are summed across ranks in one
    all_reduce (nanochat `update_expert_biases`), so every rank applies the same update. Returns the
    number of layers updated."""
    layers = [m for m in moe_layers(model) if m.cfg.bias_balancing]
    if not layers:
        return 0
    loads = torch.cat([m.load_accum for m in layers])  # [Σ E_l], layers may differ in E
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(loads)
    for m, load in zip(layers, loads.split([m.cfg.num_experts for m in layers])):
        m.update_bias(load)
    return len(layers)


@torch.no_grad()
def expert_load_stats(model: nn.Module) -> list[dict]:
    """`HybridGPT.expert_load_stats()`: per MoE block (`model.moe_blocks()`), detached statistics of
    the last forward (see there)."""
    out = []
    for i, block in model.moe_blocks():
        s = block.moe_stats
        frac = s.expert_frac.detach().clone()
        moe = block.mlp if hasattr(block, "mlp") else block.ffn  # Block's FFN is `mlp`, RWKVBlock's `ffn`
        out.append({"layer": i, "expert_frac": frac, "load_max_mean": frac.max() * frac.numel(),
                    "aux_loss": s.losses[0].clone(), "balance_loss": s.losses[1].clone(),
                    "z_loss": s.losses[2].clone(), "expert_bias": moe.expert_bias.detach().clone()})
    return out


def inactive_expert_params(model: nn.Module) -> int:
    """Parameters of the routed experts a token does not use: (E − k) experts per MoE layer
    (`HybridGPT.param_counts`' active count leaves them out)."""
    return sum((m.cfg.num_experts - m.cfg.top_k) * sum(p.numel() for p in m.experts[0].parameters())
               for m in moe_layers(model))


class MoELoadStats(nn.Module):
    """Detached statistics of an MoE layer's last forward, kept in non-persistent buffers (not in the
    state dict, the artifact or the EMA): expert_frac [E] (token-slot share of each expert, sums to 1)
    and losses [3] = (weighted aux loss, balance loss, z-loss). Writing buffers in place keeps the
    forward free of host syncs and compilable."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.register_buffer("expert_frac", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("losses", torch.zeros(3, dtype=torch.float32), persistent=False)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.expert_frac.zero_()
            self.losses.zero_()

    def record(self, aux: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.expert_frac.copy_(aux["expert_frac"])
            self.losses.copy_(torch.stack((aux["loss"], aux["balance_loss"], aux["z_loss"])).detach())


def moe_load_summary(stats: list[dict]) -> str:
    """One log line from `HybridGPT.expert_load_stats()` (this syncs: call it only when logging), e.g.
    "moe_load L1:max/mean=1.21,frac=[0.31 0.22 0.25 0.22],aux=0.0021 L2:..."."""
    parts = []
    for s in stats:
        frac = " ".join(f"{v:.3f}" for v in s["expert_frac"].float().tolist())
        parts.append(f"L{s['layer']}:max/mean={s['load_max_mean'].item():.3f},frac=[{frac}],"
                     f"aux={s['aux_loss'].item():.5f}")
    return "moe_load " + " ".join(parts) if parts else "moe_load none"
