"""The hybrid's T-layer mixers beyond the one-token lerp, picked by ModelConfig.token_mix (TOKEN_MIX).

"conv" is the default (issue 11: with XSA off it beat the lerp and the dense stack on held-out text;
docs/PERF.md). "shift" is hybrid/layers.py's TokenShiftMix, the published hybrid's mixer, and a
TOKEN_MIX=shift run never imports this module (a run's code bytes count the modules it imports,
quant/budget.py).

Every mixer here keeps TokenShiftMix's r/k/v path (RWKV channel-mix form) and changes only how the
inputs xr, xk of the two branches are made from the current and past tokens (or, for
"shift_silu_gate", the gate):

    r = σ(W_r·xr),  k = relu(W_k·xk)²,  out = r ⊙ (W_v·k)         (W_v zero-init: identity residual)

| token_mix       | xr, xk from                                         | parameters per T layer beyond "shift"  |
|-----------------|-----------------------------------------------------|----------------------------------------|
| ddlerp          | x_t, x_{t−1}; data-dependent lerp (RWKV-6 LoRA)     | C + 4·R·C (μ_x, μ_r, μ_k, A, B_r, B_k  |
|                 |                                                     |   instead of mix_r, mix_k; R = rank)   |
| conv            | x_t .. x_{t−K+1}; free per-channel taps             | 2·(K−1)·C ([K, C] taps per branch)     |
| shiftk          | x_t .. x_{t−K+1}; per-channel softmax over K tokens | 2·(K−1)·C ([K, C] logits per branch)   |
| shift_silu_gate | x_t, x_{t−1} as "shift"; r = SiLU(W_r·xr)           | 0                                      |

K = token_mix_kernel (the current token included, so K − 1 past tokens). Each mixer holds
`lookback` = how many past inputs its output at t reads (1, or K − 1), and `step(x, past)` runs it on a
chunk continuing from the carried last `lookback` inputs (stateful evaluation, hybrid/model.py).

Parameter naming follows the optimizer and export rules (hybrid/training/optim.py, quant/policy.py): per-channel
vectors (mu_*) are 1-D, so Adam and fp32; the [K, C] tap/logit tensors (conv_mix_*, mix_*) carry the
control word "mix" and have K < 16 rows (ModelConfig caps K at TOKEN_MIX_MAX_KERNEL), so they stay with
Adam (is_matrix needs min(shape) >= 16) and in float in the artifact; the ddlerp LoRA factors
(lora_a, lora_b_*) are CastedLinear matrices: Muon and int (the mixer group's width) once their rank
reaches 16 and they exceed 4096 entries (fp32 and Adam below that).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybrid.config import TOKEN_MIXES
from hybrid.layers import CastedLinear, TokenShiftMix


def past_taps(x: Tensor, lookback: int) -> list[Tensor]:
    """[x_t, x_{t−1}, .., x_{t−lookback}] as views of one zero-padded copy of x [B, T, C] (zeros before
    t = 0): lookback + 1 tensors of shape [B, T, C]. Views, so autograd keeps one padded copy."""
    T = x.size(1)
    xp = F.pad(x, (0, 0, lookback, 0))  # (B, lookback + T, C)
    return [xp[:, lookback - j:lookback - j + T] for j in range(lookback + 1)]


class _RKVMix(nn.Module):
    """The shared r/k/v path and the chunked `step` of the mixers below (not used on its own)."""

    MIX_INIT = TokenShiftMix.MIX_INIT  # σ(0.5) ≈ 0.62 on the current token at init, as "shift"
    lookback = 1

    def __init__(self, dim: int):
        super().__init__()
        self.w_r = CastedLinear(dim, dim)
        self.w_k = CastedLinear(dim, dim)
        self.w_v = CastedLinear(dim, dim)
        self.w_v._zero_init = True

    def rkv(self, xr: Tensor, xk: Tensor) -> Tensor:
        r = torch.sigmoid(self.w_r(xr))
        k = torch.relu(self.w_k(xk)).square()
        return r * self.w_v(k)

    def step(self, x: Tensor, past: Tensor | None) -> tuple[Tensor, Tensor]:
        """(out [B, T, C], last `lookback` inputs [B, lookback, C]) for a chunk x [B, T, C] that follows
        the inputs `past` [B, lookback, C] (None: a fresh sequence, i.e. zeros). Exact: an output reads
        at most `lookback` earlier inputs, so prepending them and dropping their outputs is the same
        as one pass over the whole stream."""
        L = self.lookback
        if past is None:
            out, tail = self(x), x[:, max(0, x.size(1) - L):]
            return out, F.pad(tail, (0, 0, L - tail.size(1), 0))
        xx = torch.cat((past.to(x.dtype), x), dim=1)  # (B, L + T, C)
        return self(xx)[:, L:], xx[:, xx.size(1) - L:]


class DDLerpMix(_RKVMix):
    """Data-dependent token shift ("ddlerp") of RWKV-6 Finch (Peng et al., "Eagle and Finch",
    arXiv:2404.05892, §4, eq. for lora_□ / ddlerp_□). [B, T, C] -> [B, T, C].

        xx = x_{t−1} − x_t,   base = x_t + xx ⊙ μ_x
        [z_r | z_k] = tanh(A·base)                      A: C → 2R, one rank-R slice per branch
        m_b = μ_b + B_b·z_b                             B_b: R → C, zero-init;  b ∈ {r, k}
        x_b = x_t + xx ⊙ m_b                            then the r/k/v path (module docstring)

    As in the paper each branch has its own A_b (fused into one `lora_a` of 2R outputs, like the
    reference's time_maa_w1) and μ's are unconstrained weights on the previous token. R = `rank`,
    default min(32, max(1, C // 4)) (RWKV-6 uses 32, D_MIX_LORA). Init: μ_r = μ_k = μ_x = 1 − σ(0.5)
    and B = 0, so at init x_b = σ(0.5)·x_t + (1 − σ(0.5))·x_{t−1}: exactly "shift"'s lerp (up to
    rounding), and the mixer starts as the static one. A is the model's matrix init (orthogonal when
    both dims >= 64, else PyTorch's default), so B gets a gradient from the first step."""

    LORA_RANK = 32

    def __init__(self, dim: int, rank: int | None = None):
        super().__init__(dim)
        self.rank = rank or min(self.LORA_RANK, max(1, dim // 4))
        self.mu_x = nn.Parameter(torch.empty(dim))
        self.mu_r = nn.Parameter(torch.empty(dim))
        self.mu_k = nn.Parameter(torch.empty(dim))
        self.lora_a = CastedLinear(dim, 2 * self.rank)
        self.lora_b_r = CastedLinear(self.rank, dim)
        self.lora_b_k = CastedLinear(self.rank, dim)
        for b in (self.lora_b_r, self.lora_b_k):
            b._zero_init = True
            nn.init.zeros_(b.weight)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        mu = 1.0 - 1.0 / (1.0 + math.exp(-self.MIX_INIT))  # 1 − σ(0.5): the weight on x_{t−1}
        with torch.no_grad():
            for p in (self.mu_x, self.mu_r, self.mu_k):
                p.fill_(mu)

    def forward(self, x: Tensor) -> Tensor:
        xx = past_taps(x, 1)[1] - x
        z_r, z_k = torch.tanh(self.lora_a(x + xx * self.mu_x.to(x.dtype))).chunk(2, dim=-1)
        xr = x + xx * (self.mu_r.to(x.dtype) + self.lora_b_r(z_r))
        xk = x + xx * (self.mu_k.to(x.dtype) + self.lora_b_k(z_k))
        return self.rkv(xr, xk)


class ConvShiftMix(_RKVMix):
    """Short causal depthwise convolution over time in place of the lerp ("conv"), the short conv of
    H3 (Fu et al., arXiv:2212.14052) / Mamba (Gu & Dao, arXiv:2312.00752) applied to each branch's
    input. [B, T, C] -> [B, T, C].

        x_b[t] = Σ_{j=0}^{K−1} w_b[j] ⊙ x[t−j]      (x[t] = 0 for t < 0);  w_b = conv_mix_b, [K, C]

    Per-channel taps, unconstrained (no bias). Init: w[0] = σ(0.5), w[1] = 1 − σ(0.5), w[j>=2] = 0, so
    at init it is exactly "shift"'s lerp (K = 1: w[0] = 1, no lookback). Computed as K shifted
    multiply-adds of views of one padded copy (one fused kernel under torch.compile), not conv1d."""

    def __init__(self, dim: int, kernel: int = 4):
        super().__init__(dim)
        if kernel < 1:
            raise ValueError(f"ConvShiftMix kernel must be >= 1, got {kernel}")
        self.lookback = kernel - 1
        self.conv_mix_r = nn.Parameter(torch.empty(kernel, dim))
        self.conv_mix_k = nn.Parameter(torch.empty(kernel, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cur = 1.0 / (1.0 + math.exp(-self.MIX_INIT))
        with torch.no_grad():
            for w in (self.conv_mix_r, self.conv_mix_k):
                w.zero_()
                if self.lookback:
                    w[0].fill_(cur)
                    w[1].fill_(1.0 - cur)
                else:
                    w[0].fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        taps = past_taps(x, self.lookback)
        wr, wk = self.conv_mix_r.to(x.dtype), self.conv_mix_k.to(x.dtype)
        xr = sum(wr[j] * t for j, t in enumerate(taps))
        xk = sum(wk[j] * t for j, t in enumerate(taps))
        return self.rkv(xr, xk)


class SoftShiftMix(_RKVMix):
    """Token shift over K tokens ("shiftk"): per channel, a softmax-weighted (convex) mix of the last K
    inputs, the current one included. Generalises RWKV's lerp (Peng et al., RWKV-4, arXiv:2305.13048):
    K = 2 is exactly "shift" (softmax([a, b]) = [σ(a − b), 1 − σ(a − b)]). [B, T, C] -> [B, T, C].

        π_b = softmax over j of mix_b[j]  ([K, C] logits);   x_b[t] = Σ_{j=0}^{K−1} π_b[j] ⊙ x[t−j]

    Init logits: [0.5, 0, OLD_INIT, ..]: K = 2 starts equal to "shift"; for K > 2 the tokens t−2 ..
    start with a small weight (OLD_INIT = −4: about 0.7 % each at K = 4, so [0.614, 0.372, 0.007,
    0.007] against shift's [0.622, 0.378]) rather than 0, which a softmax reaches only at −∞, where
    the logits would get no gradient. K = 1 is no lookback (π = 1)."""

    OLD_INIT = -4.0

    def __init__(self, dim: int, kernel: int = 4):
        super().__init__(dim)
        if kernel < 1:
            raise ValueError(f"SoftShiftMix kernel must be >= 1, got {kernel}")
        self.lookback = kernel - 1
        self.mix_r = nn.Parameter(torch.empty(kernel, dim))
        self.mix_k = nn.Parameter(torch.empty(kernel, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for w in (self.mix_r, self.mix_k):
                w.fill_(self.OLD_INIT)
                w[0].fill_(self.MIX_INIT)
                if self.lookback:
                    w[1].zero_()

    def forward(self, x: Tensor) -> Tensor:
        taps = past_taps(x, self.lookback)
        pr = torch.softmax(self.mix_r, dim=0).to(x.dtype)  # softmax in fp32, on the parameter
        pk = torch.softmax(self.mix_k, dim=0).to(x.dtype)
        xr = sum(pr[j] * t for j, t in enumerate(taps))
        xk = sum(pk[j] * t for j, t in enumerate(taps))
        return self.rkv(xr, xk)


class SiLUGateShiftMix(TokenShiftMix):
    """"shift" with a SiLU receptance ("shift_silu_gate"). [B, T, C] -> [B, T, C].

        xr, xk as "shift" (same mix_r, mix_k and init);  r = SiLU(W_r·xr) = (W_r·xr)·σ(W_r·xr)
        k = relu(W_k·xk)²;  out = r ⊙ (W_v·k)

    The sigmoid gate becomes a Swish-gated linear unit, the GLU variant that works best in
    Shazeer's comparison ("GLU Variants Improve Transformer", arXiv:2002.05202) and the activation of
    RWKV-6's output gate g = SiLU(W_g·x_g) (arXiv:2404.05892). No extra parameters: with the same
    weights its output is (W_r·xr) ⊙ the "shift" output, so both start at 0 (W_v = 0)."""

    lookback = _RKVMix.lookback
    step = _RKVMix.step  # the chunked stateful step of the other variants

    def forward(self, x: Tensor) -> Tensor:
        xr, xk = self.lerp(x)  # TokenShiftMix's parameters, init and lerp
        k = torch.relu(self.w_k(xk)).square()
        return F.silu(self.w_r(xr)) * self.w_v(k)


def token_mixer(kind: str, dim: int, kernel: int = 4) -> nn.Module:
    """The T-layer mixer for ModelConfig.token_mix `kind` (hybrid.config.TOKEN_MIXES); `kernel` is
    token_mix_kernel, used by "conv" and "shiftk"."""
    if kind == "shift":
        return TokenShiftMix(dim)
    if kind == "ddlerp":
        return DDLerpMix(dim)
    if kind == "conv":
        return ConvShiftMix(dim, kernel)
    if kind == "shiftk":
        return SoftShiftMix(dim, kernel)
    if kind == "shift_silu_gate":
        return SiLUGateShiftMix(dim)
    raise ValueError(f"token_mix must be one of {TOKEN_MIXES}, got {kind!r}")
