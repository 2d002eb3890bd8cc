"""Leaf modules of HybridGPT, in reading order: norms and linears, RoPE, MLP, the two sequence
mixers (token shift and attention), then the embedding-side extras (SmearGate, BigramHash, value
embeddings). `hybrid/model.py` wires them into blocks.

Shapes: B batch, T time, C model dim, H query heads, G KV heads, D head dim, V vocab.
Conventions shared by every module here:
- matrices are `CastedLinear` (fp32 master weight, cast to the activation dtype at the matmul);
- control parameters (gates, gains, scales) are fp32 and cast to the activation dtype at use;
- each module with control parameters has `reset_parameters()` with its documented init, which
  `HybridGPT.init_weights()` calls (matrix/table init is the model's policy, not the leaf's);
- no `.item()` and no branch on tensor values, so the model compiles with fullgraph=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybrid.attention import attention


def rms_norm(x: Tensor) -> Tensor:
    """RMS norm over the last dim, no learned gain (baseline `RMSNorm`). [..., C] -> [..., C]."""
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """nn.Linear whose fp32 master weight is cast to the input's dtype at the matmul (baseline).

    [..., in] -> [..., out]. `qat_bits > 0` (set by quant.qat.set_qat) routes the weight through
    the export grid's straight-through fake-quant first; dynamo guards on the int, so switching
    QAT on costs exactly one recompile. `_zero_init` marks output projections that
    `HybridGPT.init_weights()` zeroes."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.qat_bits: int = 0
        self.qat_clip: str = "mse"  # the export's row-scale rule (quant.int6 CLIP_MODES), set with qat_bits
        self.qat_sd_k: float = 0.0
        self._zero_init: bool = False

    def casted_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight this layer multiplies by: fake-quantized when QAT is on, cast to `dtype`. Also
        used where the matmul happens elsewhere (MoE grouped experts, the fused MLP kernel)."""
        w = self.weight
        if self.qat_bits > 0:
            # Imported here so the model runs (and is tested) without the quant package.
            from quant.int6 import fake_quant

            w = fake_quant(w, self.qat_bits, self.qat_clip, self.qat_sd_k)
        return w.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.casted_weight(x.dtype), bias)


class Rotary(nn.Module):
    """Partial RoPE: rotate the first `rope_dims` dims of every head, leave the rest untouched.

    Applied to [B, T, H, D] (time-second, the layout q/k keep for the attention call).
    - Frequencies are built over the rotated dims, inv_freq_j = base^(-2j / rope_dims), j <
      rope_dims/2 (the records' form, golf PR #315; the published hybrid built them over all 64
      dims: docs/TECHNIQUES.md, "Partial RoPE").
    - Split-half pairing inside the rotated slice: dim j pairs with j + rope_dims/2. The sign
      convention (x1 cos + x2 sin, -x1 sin + x2 cos) is the baseline's, so rope_dims == head_dim
      reproduces its full RoPE formula.
    - cos/sin are cached as [T, rope_dims/2] fp32 per (T, device) and broadcast as (1, T, 1, r/2):
      the published hybrid cached (1, 1, T, r/2), a heads-first layout that fails to broadcast
      against time-second tensors (golf PR #1007/#1112; docs/TECHNIQUES.md, "Partial RoPE").
    No buffers: frequencies are recomputed in fp32, so `model.bfloat16()` cannot round them."""

    def __init__(self, head_dim: int, rope_dims: int, base: float = 10000.0):
        super().__init__()
        if rope_dims % 2 or not 0 < rope_dims <= head_dim:
            raise ValueError(f"rope_dims must be even and in [2, head_dim={head_dim}], got {rope_dims}")
        self.head_dim, self.rope_dims, self.base = head_dim, rope_dims, base
        self._cache: tuple[int, str, Tensor, Tensor] | None = None

    def cos_sin(self, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Two fp32 tensors of shape [T, rope_dims/2]."""
        cache = self._cache
        if cache is not None and cache[0] == T and cache[1] == str(device):
            return cache[2], cache[3]
        j = torch.arange(0, self.rope_dims, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (self.base ** (j / self.rope_dims))  # (r/2,)
        freqs = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv_freq)  # (T, r/2)
        cos, sin = freqs.cos(), freqs.sin()
        if not torch.compiler.is_compiling():  # never store traced tensors on the module
            self._cache = (T, str(device), cos, sin)
        return cos, sin

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, H, D] -> [B, T, H, D]."""
        r, half = self.rope_dims, self.rope_dims // 2
        cos, sin = self.cos_sin(x.size(1), x.device)
        cos = cos.to(x.dtype)[None, :, None, :]  # (1, T, 1, r/2)
        sin = sin.to(x.dtype)[None, :, None, :]
        x1, x2 = x[..., :half], x[..., half:r]
        rotated = torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1)
        if r == x.size(-1):
            return rotated
        return torch.cat((rotated, x[..., r:]), dim=-1)


class MLP(nn.Module):
    """fc -> act -> proj, [..., C] -> [..., C]; proj is zero-init (baseline).

    act "relu2" = relu(x)^2 (baseline, modded-nanogpt); "leaky_relu2" = leaky_relu(x, 0.5)^2
    (golf PR #493, about -0.003 bpb; docs/TECHNIQUES.md, "MLP width and activation").
    fused: "auto" | "triton" | "off" (= "ref"), fc -> act as one Triton kernel (hybrid/kernels/fused_mlp.py);
    "auto" takes it on CUDA under bf16/fp16, and the unfused code below everywhere else. The kernel
    module is imported only when asked for: a run counts the code it imports (quant/budget.py)."""

    def __init__(self, dim: int, hidden: int, act: str = "leaky_relu2", fused: str = "off"):
        super().__init__()
        if act not in ("relu2", "leaky_relu2"):
            raise ValueError(f"MLP act must be 'relu2' or 'leaky_relu2', got {act!r}")
        if fused not in ("off", "ref", "auto", "triton"):  # = hybrid.kernels.fused_mlp.FUSED_MLP_MODES (tested)
            raise ValueError(f"MLP fused must be one of off, ref, auto, triton, got {fused!r}")
        self.leaky = act == "leaky_relu2"
        self.fused = fused
        self._use_fused = self._mlp_up_act = None
        if fused in ("auto", "triton"):
            from hybrid.kernels.fused_mlp import mlp_up_act_linear, use_fused_mlp

            self._use_fused, self._mlp_up_act = use_fused_mlp, mlp_up_act_linear
        self.fc = CastedLinear(dim, hidden)
        self.proj = CastedLinear(hidden, dim)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        if self._use_fused is not None and self._use_fused(self.fused, x):
            return self.proj(self._mlp_up_act(self.fc, x, 0.5 if self.leaky else 0.0))
        h = self.fc(x)
        h = F.leaky_relu(h, 0.5) if self.leaky else torch.relu(h)
        return self.proj(h.square())


def token_shift_ref(x: Tensor) -> Tensor:
    """x_prev[:, t] = x[:, t-1], zeros at t = 0. [B, T, C] -> [B, T, C]."""
    return F.pad(x[:, :-1], (0, 0, 1, 0))


class TokenShiftMix(nn.Module):
    """RWKV-style one-token-lookback mixer of the published hybrid (golf PR #1007/#1112; docs/TECHNIQUES.md,
    "Token-shift mixer"). [B, T, C] -> [B, T, C].

        xr = σ(mix_r)⊙x + (1−σ(mix_r))⊙x_prev,  xk likewise with mix_k
        r = σ(W_r·xr),  k = relu(W_k·xk)^2,  out = r ⊙ (W_v·k)

    No time decay and no state: position t sees only x_t and x_{t-1}. W_v is zero-init, so the
    mixer starts as the identity residual."""

    MIX_INIT = 0.5  # a logit: σ(0.5) ≈ 0.62 weight on the current token at init

    def __init__(self, dim: int):
        super().__init__()
        self.mix_r = nn.Parameter(torch.empty(dim))
        self.mix_k = nn.Parameter(torch.empty(dim))
        self.w_r = CastedLinear(dim, dim)
        self.w_k = CastedLinear(dim, dim)
        self.w_v = CastedLinear(dim, dim)
        self.w_v._zero_init = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.mix_r.fill_(self.MIX_INIT)
            self.mix_k.fill_(self.MIX_INIT)

    def lerp(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(xr, xk): the current and previous token mixed per channel (hybrid/token_mix.py reuses it)."""
        x_prev = token_shift_ref(x)
        mr = torch.sigmoid(self.mix_r.to(x.dtype))
        mk = torch.sigmoid(self.mix_k.to(x.dtype))
        return mr * x + (1 - mr) * x_prev, mk * x + (1 - mk) * x_prev

    def forward(self, x: Tensor) -> Tensor:
        xr, xk = self.lerp(x)
        r = torch.sigmoid(self.w_r(xr))
        k = torch.relu(self.w_k(xk)).square()
        return r * self.w_v(k)


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """XSA (arXiv:2603.09078, golf PR #265): remove from each head's output its component along the
    token's own value direction v̂ = v/||v|| of the KV head it shares. y [B, T, H, D], v [B, T, G, D].

    GQA by reshape + broadcast instead of repeat_interleave (about 2 vs 7 ms/step for 3-4 layers,
    rec:2026-03-20_11L_EfficientPartialXSA_FA3_SWA120). A query whose only key is itself (position 0, or
    any position with window 1) attends to v alone, so its output is exactly removed: XSA with
    attn_window=1 is zero."""
    B, T, H, D = y.shape
    G = v.size(2)
    y_g = y.reshape(B, T, G, H // G, D)  # (B, T, G, H/G, D): heads g*H/G .. read KV head g
    v_hat = F.normalize(v, dim=-1).unsqueeze(3)  # (B, T, G, 1, D)
    y_g = y_g - (y_g * v_hat).sum(dim=-1, keepdim=True) * v_hat
    return y_g.reshape(B, T, H, D)


class CausalAttention(nn.Module):
    """GQA causal attention, full (window=None) or sliding-window. [B, T, C] -> [B, T, C].

    c_q/c_k/c_v -> per-head RMS norm of q and k (times a learned per-dim gain if qk_norm_gain)
    -> partial RoPE -> q × per-head q_gain -> hybrid.attention.attention -> XSA (if xsa) -> proj.
    With use_ve, `forward(x, ve)` adds the value embedding before the head reshape:
    v = c_v(x) + ve_scale·ve, where ve (B, T, G·D) already carries the shared scale 0.1 of
    `ValueEmbedding`, so the effective factor is 0.1 × ve_scale (init 1), as in golf PR #374."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_dims: int, rope_base: float,
                 qk_gain_init: float, window: int | None = None, xsa: bool = False, use_ve: bool = False,
                 qk_norm_gain: bool = True):
        super().__init__()
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"need dim % num_heads == 0 and num_heads % num_kv_heads == 0, "
                             f"got dim={dim} heads={num_heads} kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.window, self.xsa, self.use_ve = window, xsa, use_ve
        self.qk_gain_init = qk_gain_init
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim)
        self.proj._zero_init = True
        self.q_gain = nn.Parameter(torch.empty(num_heads))
        self.q_norm_gain = nn.Parameter(torch.empty(self.head_dim)) if qk_norm_gain else None
        self.k_norm_gain = nn.Parameter(torch.empty(self.head_dim)) if qk_norm_gain else None
        self.ve_scale = nn.Parameter(torch.empty(())) if use_ve else None
        self.rotary = Rotary(self.head_dim, rope_dims, rope_base)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.q_gain.fill_(self.qk_gain_init)
            for p in (self.q_norm_gain, self.k_norm_gain, self.ve_scale):
                if p is not None:
                    p.fill_(1.0)

    def forward(self, x: Tensor, ve: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        H, G, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.c_q(x).reshape(B, T, H, D)
        k = self.c_k(x).reshape(B, T, G, D)
        v = self.c_v(x)  # (B, T, G*D)
        if ve is not None:
            if self.ve_scale is None:
                raise ValueError("this attention layer was built with use_ve=False but got a value embedding")
            v = v + self.ve_scale.to(v.dtype) * ve
        v = v.reshape(B, T, G, D)
        q = F.rms_norm(q, (D,), weight=None if self.q_norm_gain is None else self.q_norm_gain.to(q.dtype))
        k = F.rms_norm(k, (D,), weight=None if self.k_norm_gain is None else self.k_norm_gain.to(k.dtype))
        q, k = self.rotary(q), self.rotary(k)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        # Not a no-op under CUDA autocast: rms_norm is on autocast's fp32 list, so q and k leave the
        # norms (and the fp32 rotary tables and gain) in fp32 while v is bf16. Flex/SDPA need one
        # dtype, and bf16 is the fast one: this cast is what keeps the attention kernel in bf16.
        q, k = q.to(v.dtype), k.to(v.dtype)
        y = attention(q, k, v, self.window)  # (B, T, H, D)
        if self.xsa:
            y = exclusive_self_attention(y, v)
        return self.proj(y.reshape(B, T, C))


class SmearGate(nn.Module):
    """Blend each position with the previous one (v1, golf PR #65 lineage). [B, T, C] -> [B, T, C].

        g = σ(gate) per dim (gate zero-init, so g = 0.5);  x_t ← (1−g)⊙x_t + g⊙x_{t−1},  x_{−1} = 0.

    BOS fix (golf PR #1851): when `input_ids` is given, the x_{t−1} term is dropped where token t is
    BOS, so a packed stream's first token of a document does not take in the previous document's
    last token. (The (1−g) factor on x_t stays; the fix only cuts the cross-document term.)"""

    def __init__(self, dim: int, bos_id: int = 1):
        super().__init__()
        self.bos_id = bos_id  # the golf tokenizers' BOS (docs/TECHNIQUES.md, "Shard format and tokenizer")
        self.gate = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gate.zero_()

    def forward(self, x: Tensor, input_ids: Tensor | None = None) -> Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))
        x_prev = token_shift_ref(x)
        if input_ids is not None:
            x_prev = x_prev * (input_ids != self.bos_id).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        return (1 - g) * x + g * x_prev


def bigram_hash_ids(input_ids: Tensor, buckets: int) -> Tensor:
    """[B, T] token ids -> [B, T] bucket ids (int64), the records' hash (golf rec 2026-03-20 on).

    idx_0 = buckets−1 (reserved for "no previous token"); idx_t = ((36313·tok_t) XOR (27191·tok_{t−1}))
    mod (buckets−1). Computed in int64: equal to the records' int32 arithmetic whenever that does
    not overflow (every id < 59,000), and still defined beyond."""
    t = input_ids.to(torch.int64)
    mod = buckets - 1
    pair = torch.bitwise_xor(36313 * t[:, 1:], 27191 * t[:, :-1]) % mod  # (B, T-1)
    return torch.cat((torch.full_like(t[:, :1], mod), pair), dim=1)


class BigramHash(nn.Module):
    """Hashed (previous, current) token-pair embedding added to tok_emb. [B, T] ids -> [B, T, C].

    table (buckets × dim_b, zero-init) -> proj dim_b→C -> × bigram_scale (init 0.05).
    docs/TECHNIQUES.md, "BigramHash"."""

    SCALE_INIT = 0.05

    def __init__(self, buckets: int, dim_b: int, model_dim: int):
        super().__init__()
        if buckets < 2:
            raise ValueError(f"BigramHash needs >= 2 buckets (one is reserved), got {buckets}")
        self.buckets = buckets
        self.table = nn.Embedding(buckets, dim_b)
        self.proj = CastedLinear(dim_b, model_dim)
        self.bigram_scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.table.weight.zero_()
            self.bigram_scale.fill_(self.SCALE_INIT)

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.proj(self.table(bigram_hash_ids(input_ids, self.buckets)))  # (B, T, C)
        return h * self.bigram_scale.to(h.dtype)


class ValueEmbedding(nn.Module):
    """A second token embedding fed into attention values (golf PR #374; docs/TECHNIQUES.md, "Value embeddings").

    [B, T] ids -> [B, T, kv_dim]: table (V × ve_dim, N(0, 0.01)) -> proj ve_dim→kv_dim ->
    × shared_scale (init 0.1, one scalar shared by every VE layer; each layer adds its own
    `ve_scale`, init 1)."""

    TABLE_STD = 0.01
    SCALE_INIT = 0.1

    def __init__(self, vocab_size: int, ve_dim: int, kv_dim: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, ve_dim)
        self.proj = CastedLinear(ve_dim, kv_dim)
        self.shared_scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.table.weight.normal_(0.0, self.TABLE_STD)
            self.shared_scale.fill_(self.SCALE_INIT)

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.proj(self.table(input_ids))  # (B, T, kv_dim)
        return h * self.shared_scale.to(h.dtype)
