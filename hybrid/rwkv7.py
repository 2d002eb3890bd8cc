"""RWKV-7 "Goose" (x070): time-mix, channel-mix, block and a standalone language model.

Shapes: B batch, T time, C model dim, H = C / N heads of size N, V vocab. Column-vector math per
token t (arXiv:2503.14456, BlinkDL RWKV-LM `RWKV-v7/train_temp/src/model.py`; docs/TECHNIQUES.md "RWKV-7"):

    δ = x_{t−1} − x_t (x_{−1} = carried shift state, 0 at the start);  x^∗ = x + δ⊙μ_∗, ∗ ∈ {r,w,k,v,a,g}
    r = W_r x^r,  k = W_k x^k,  v = W_v x^v                                  [B, T, C] each
    log d = −e^{−1/2}·σ(w0 + tanh(x^w W1) W2)  ∈ (−0.607, 0): decay d ∈ (0.545, 1), fp32
    a = σ(a0 + x^a A1 A2)  ("in-context learning rate"),  g = σ(x^g G1) G2  (output gate)
    v ← v + (v_first − v)⊙σ(v0 + x^v V1 V2)   in every layer but the first, which sets v_first = v
    κ̂ = L2-normalize_per_head(k⊙k_k),  k̃ = k⊙(1 + (a − 1)⊙k_a)
    y, S = WKV7(r, log d, k̃, v, α = −κ̂, β = κ̂⊙a; S)   (hybrid/kernels/wkv7.py; S [B, H, N, N] fp32)
    o = GroupNorm_H(y) + (Σ_head r⊙k̃⊙r_k)·v;   out = W_o(o⊙g)
  channel-mix: out = W_v relu(W_k (x + δ⊙μ_k))²
  block: x = ln0(x) (layer 0 only);  x += TimeMix(ln1(x));  x += ChannelMix(ln2(x))   (pre-LN, LayerNorm)
  LM: emb -> blocks -> ln_out -> head (untied like the reference; tie=True shares emb)

Parameter names and shapes follow the reference checkpoints (`blocks.{i}.att.w1`, …) so that
`rwkv7_reference_state_dict` is a reshape; the per-channel vectors are stored [C] instead of
[1, 1, C]. Big matrices (receptance, key, value, output, channel-mix key/value, head) are
`CastedLinear` (fp32 master weight, `qat_bits` for QAT); LoRA factors and vectors are plain fp32
Parameters cast to the activation dtype at use; the decay and the state stay fp32. Each LoRA factor also
has a parameter-free QAT handle (`att.lora_qat.w1`, …, `RWKV7LoRAQAT`) so that late QAT reaches it
without renaming it. The time-mix, channel-mix and ln_x carry `optim_recipe = "rwkv7"`, which
hybrid/training/optim.py reads to apply the reference optimizer recipe to their own parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybrid.layers import CastedLinear
from hybrid.kernels.wkv7 import wkv7

# −e^{−1/2}: the decay soft clamp (rwkv7_clampw.cu W_SCALE, FLA `fla/layers/rwkv7.py`).
RWKV7_LOG_DECAY_SCALE = -math.exp(-0.5)
# LoRA rank = max(32, round(f·sqrt(C)/32)·32) with these f (RWKV_Tmix_x070.__init__ "suggestion").
RWKV7_LORA_FACTORS = {"w": 2.5, "a": 2.5, "v": 1.7, "g": 5.0}
# Per-channel vectors of the time-mix / channel-mix, stored [C] here and [1, 1, C] by the reference.
RWKV7_VECTOR_NAMES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")
# LoRA factors: first [C, d] then second [d, C] of each LoRA (RWKV_Tmix_x070); v1/v2 not in the first layer.
RWKV7_LORA_NAMES = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


def rwkv7_lora_dims(dim: int) -> dict[str, int]:
    """The reference LoRA ranks for model dim C, e.g. C=512 -> w 64, a 64, v 32, g 128."""
    return {n: max(32, int(round(f * dim ** 0.5 / 32) * 32)) for n, f in RWKV7_LORA_FACTORS.items()}


def rwkv7_token_shift(x: Tensor, prev: Tensor | None) -> Tensor:
    """x_{t−1} for every t: [B, T, C] -> [B, T, C]; position 0 gets `prev` [B, C] (zeros if None)."""
    if prev is None:
        return F.pad(x[:, :-1], (0, 0, 1, 0))
    return torch.cat((prev.to(x.dtype).unsqueeze(1), x[:, :-1]), dim=1)


def _layer_norm(x: Tensor, ln: nn.LayerNorm) -> Tensor:
    """LayerNorm with its fp32 affine cast to the activation dtype (the repo's control-param rule)."""
    return F.layer_norm(x, ln.normalized_shape, ln.weight.to(x.dtype), ln.bias.to(x.dtype), ln.eps)


def _orthogonal_(w: Tensor, scale: float) -> None:
    # Reference `ortho_init`: gain sqrt(rows/cols) when rows > cols, times scale.
    rows, cols = w.shape
    nn.init.orthogonal_(w, gain=(math.sqrt(rows / cols) if rows > cols else 1.0) * scale)


class RWKV7LoRAQAT(nn.Module):
    """Late-QAT handle of one LoRA factor: `qat_bits` (with `qat_clip`, `qat_sd_k`) and `.weight`,
    what quant.qat.set_qat looks for and sets, as on a CastedLinear. The factor itself stays a Parameter
    of the time-mix, so its state-dict name is still the reference's (`blocks.{i}.att.w1`); this module
    owns no parameters or buffers. When `qat_bits` > 0 the time-mix runs the factor through
    `quant.int6.fake_quant(w, bits, clip, sd_k)` as stored ([C, d] or [d, C], one scale per row of
    dim 0): the tensor and orientation the exporter quantizes. `qat_tensor_name` tells set_qat which
    state-dict name to ask the precision policy about (`...att.w1`, exactly what the exporter asks)."""

    def __init__(self, owner: nn.Module, param_name: str):
        super().__init__()
        self.param_name = param_name
        self.qat_bits: int = 0
        self.qat_clip: str = "mse"  # the export's row-scale rule, set by set_qat with qat_bits
        self.qat_sd_k: float = 0.0
        # A plain reference, not a submodule: the owner is this module's parent in the module tree.
        object.__setattr__(self, "_owner", owner)

    @property
    def weight(self) -> Tensor:
        return getattr(self._owner, self.param_name)

    def qat_tensor_name(self, module_name: str) -> str:
        """The state-dict name this handle stands for: `blocks.3.att.lora_qat.w1` -> `blocks.3.att.w1`
        (quant.qat.set_qat asks the precision policy about that name, the one the exporter sees)."""
        return module_name.rsplit(".", 2)[0] + "." + self.param_name

    def extra_repr(self) -> str:
        return f"{self.param_name}, qat_bits={self.qat_bits}"


class RWKV7GroupNorm(nn.Module):
    """Per-head GroupNorm of the WKV output ("ln_x"), [..., C] -> [..., C], eps = 1e-5·N.

    The reference hard-codes eps 64e-5 for N = 64 ("!!! notice eps value !!!"); FLA scales it by the
    head size, which is the same at N = 64. Own module (not nn.GroupNorm) so its weight keeps the
    time-mix's layer-scaled init: nothing outside resets it to 1."""

    optim_recipe = "rwkv7"  # Adam, no weight decay (hybrid/training/optim.py; docs/TECHNIQUES.md "RWKV-7 optimizer recipe")

    def __init__(self, num_heads: int, dim: int, eps: float):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, y: Tensor) -> Tensor:
        shape = y.shape
        y = F.group_norm(y.reshape(-1, shape[-1]), self.num_heads, self.weight.to(y.dtype),
                         self.bias.to(y.dtype), self.eps)
        return y.view(shape)


class RWKV7TimeMix(nn.Module):
    """The RWKV-7 time-mix. forward(x [B, T, C], v_first [B, T, C] | None, state | None)
    -> (out [B, T, C], v_first, (last input [B, C], WKV state [B, H, N, N] fp32)).

    `first` (default: layer_id == 0) marks the layer that produces v_first; it has no value-residual
    LoRA (FLA drops it too; the reference allocates v0/v1/v2 there but never reads them). Every other
    layer needs v_first. `state` = (shift, wkv) carried from a previous call, for long-context eval.
    `lora_qat[n]` is the late-QAT handle of LoRA factor n (RWKV7LoRAQAT)."""

    # hybrid/training/optim.py: this module's own parameters (vectors, r_k, LoRA factors) follow the RWKV-7
    # recipe (Adam, no weight decay, 2x lr on w0); its CastedLinear children stay with Muon.
    optim_recipe = "rwkv7"

    def __init__(self, dim: int, head_size: int, layer_id: int, num_layers: int,
                 lora: dict[str, int] | None = None, first: bool | None = None,
                 chunk_size: int = 16, impl: str = "auto"):
        super().__init__()
        if dim % head_size:
            raise ValueError(f"dim {dim} must be divisible by head_size {head_size}")
        C = dim
        self.dim, self.head_size, self.num_heads = C, head_size, C // head_size
        self.layer_id, self.num_layers = layer_id, num_layers
        self.first = layer_id == 0 if first is None else first
        self.chunk_size, self.impl = chunk_size, impl
        d = rwkv7_lora_dims(C) if lora is None else lora
        self.lora = dict(d)
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.empty(C)))
        self.w1, self.w2 = nn.Parameter(torch.empty(C, d["w"])), nn.Parameter(torch.empty(d["w"], C))
        self.a1, self.a2 = nn.Parameter(torch.empty(C, d["a"])), nn.Parameter(torch.empty(d["a"], C))
        if not self.first:
            self.v0 = nn.Parameter(torch.empty(C))
            self.v1, self.v2 = nn.Parameter(torch.empty(C, d["v"])), nn.Parameter(torch.empty(d["v"], C))
        self.g1, self.g2 = nn.Parameter(torch.empty(C, d["g"])), nn.Parameter(torch.empty(d["g"], C))
        self.lora_qat = nn.ModuleDict({n: RWKV7LoRAQAT(self, n) for n in RWKV7_LORA_NAMES if hasattr(self, n)})
        self.r_k = nn.Parameter(torch.empty(self.num_heads, head_size))
        self.receptance = CastedLinear(C, C)
        self.key = CastedLinear(C, C)
        self.value = CastedLinear(C, C)
        self.output = CastedLinear(C, C)
        self.output._zero_init = True
        self.ln_x = RWKV7GroupNorm(self.num_heads, C, eps=1e-5 * head_size)
        if self.w0.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Reference init (BlinkDL RWKV-LM RWKV_Tmix_x070.__init__, ln_x from generate_init_weight):

        | x_r x_w x_k x_v x_a x_g | 1 − (i/C)^{p·(1 − l/L)}, p = 0.2 0.9 0.7 0.7 0.9 0.2 |
        | w0                      | −6 + 6(i/(C−1))^{1 + (l/(L−1))^0.3} + 0.5 + 2.5·zigzag |
        | a0 / v0 / k_k / k_a / r_k | −0.19 + 0.3·zigzag + 0.4·linear / 0.73 − 0.4·linear / 0.71 − 0.1·linear / 1.02 / −0.04 |
        | w1 a1 v1 g1 / w2 a2 v2 g2 | 0 / orthogonal, gain 0.1                            |
        | receptance, value / key / output | U(±0.5/√C) / U(±0.05/√C) / 0                 |
        | ln_x weight / bias      | ((l+1)/L)^0.7 / 0                                    |
        linear_i = i/(C−1) − 0.5; zigzag_i = z|z|, z = ((i mod N) − (N−1)/2)/((N−1)/2).
        (generate_init_weight in the same file re-draws the big matrices orthogonally — gain 1 for
        receptance/value, 0.1 for key; we follow RWKV_Tmix_x070.__init__'s uniform ones.)"""
        C, N, l, L = self.dim, self.head_size, self.layer_id, self.num_layers
        dev = self.w0.device
        i = torch.arange(C, dtype=torch.float64, device=dev)
        ratio_1_to_0 = 1.0 - l / L
        ratio_0_to_1 = l / (L - 1) if L > 1 else 0.0
        ddd = i / C
        for name, p in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            getattr(self, name).copy_(1.0 - ddd.pow(p * ratio_1_to_0))
        linear = i / max(C - 1, 1) - 0.5
        z = ((i % N) - (N - 1) / 2) / ((N - 1) / 2) if N > 1 else torch.zeros_like(i)
        zigzag = z * z.abs()
        www = -6.0 + 6.0 * (i / max(C - 1, 1)).pow(1.0 + ratio_0_to_1 ** 0.3)
        self.w0.copy_(www + 0.5 + 2.5 * zigzag)
        self.a0.copy_(-0.19 + 0.3 * zigzag + 0.4 * linear)
        self.k_k.copy_(0.71 - 0.1 * linear)
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        loras = ["w", "a", "g"] + ([] if self.first else ["v"])
        for n in loras:
            getattr(self, n + "1").zero_()
            _orthogonal_(getattr(self, n + "2"), 0.1)
        if not self.first:
            self.v0.copy_(0.73 - 0.4 * linear)
        bound = C ** -0.5
        self.receptance.weight.uniform_(-0.5 * bound, 0.5 * bound)
        self.key.weight.uniform_(-0.05 * bound, 0.05 * bound)
        self.value.weight.uniform_(-0.5 * bound, 0.5 * bound)
        self.output.weight.zero_()
        self.ln_x.weight.fill_(((l + 1) / L) ** 0.7)
        self.ln_x.bias.zero_()

    def _lora(self, name: str, dt: torch.dtype) -> Tensor:
        """LoRA factor `name` in dtype dt; through the export grid first when its QAT handle is on
        (fake-quantize the fp32 master, then cast: CastedLinear's order)."""
        w = getattr(self, name)
        handle = self.lora_qat[name]
        if handle.qat_bits > 0:
            from quant.int6 import fake_quant  # as in CastedLinear: the model runs without quant/

            w = fake_quant(w, handle.qat_bits, handle.qat_clip, handle.qat_sd_k)
        return w.to(dt)

    def forward(self, x: Tensor, v_first: Tensor | None = None,
                state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        B, T, C = x.shape
        H, N = self.num_heads, self.head_size
        dt = x.dtype
        xx = rwkv7_token_shift(x, None if state is None else state[0]) - x
        xr, xw, xk, xv, xa, xg = (x + xx * getattr(self, n).to(dt) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        # Decay in fp32 at least: the soft clamp keeps log d in (−e^{−1/2}, 0), i.e. d ≥ 0.545.
        fdt = torch.promote_types(dt, torch.float32)
        w_lora = torch.tanh(xw @ self._lora("w1", dt)) @ self._lora("w2", dt)
        log_d = RWKV7_LOG_DECAY_SCALE * torch.sigmoid(self.w0.to(fdt) + w_lora.to(fdt))
        a = torch.sigmoid(self.a0.to(dt) + (xa @ self._lora("a1", dt)) @ self._lora("a2", dt))
        g = torch.sigmoid(xg @ self._lora("g1", dt)) @ self._lora("g2", dt)
        kk = F.normalize((k * self.k_k.to(dt)).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (a - 1) * self.k_a.to(dt))
        if self.first:
            v_first = v
        else:
            if v_first is None:
                raise ValueError(f"RWKV7TimeMix layer {self.layer_id} is not the first: it needs v_first")
            v = v + (v_first - v) * torch.sigmoid(self.v0.to(dt) + (xv @ self._lora("v1", dt)) @ self._lora("v2", dt))
        heads = (B, T, H, N)
        y, wkv_state = wkv7(r.view(heads), log_d.view(heads), k.view(heads), v.view(heads), -kk,
                            kk * a.view(heads), None if state is None else state[1],
                            chunk_size=self.chunk_size, impl=self.impl)
        y = self.ln_x(y.reshape(B, T, C).to(dt))
        bonus = (r.view(heads) * k.view(heads) * self.r_k.to(dt)).sum(dim=-1, keepdim=True) * v.view(heads)
        out = self.output((y + bonus.view(B, T, C)) * g)
        return out, v_first, (x[:, -1], wkv_state)


class RWKV7ChannelMix(nn.Module):
    """Token-shifted relu² FFN. forward(x [B, T, C], shift [B, C] | None) -> (out [B, T, C], last x [B, C]).

    x_k = 1 − (i/C)^{(1 − l/L)^4}; key U(±0.5/√C); value 0 (RWKV_CMix_x070). The reference hard-codes
    hidden = 4C; the golf configs use less (RWKV7_PRESETS["golf"]: 2.5C; docs/TECHNIQUES.md "RWKV-7")."""

    optim_recipe = "rwkv7"  # x_k: Adam, no weight decay; key/value (CastedLinear) stay with Muon

    def __init__(self, dim: int, hidden: int, layer_id: int = 0, num_layers: int = 1):
        super().__init__()
        self.dim, self.layer_id, self.num_layers = dim, layer_id, num_layers
        self.x_k = nn.Parameter(torch.empty(dim))
        self.key = CastedLinear(dim, hidden)
        self.value = CastedLinear(hidden, dim)
        self.value._zero_init = True
        if self.x_k.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        C = self.dim
        i = torch.arange(C, dtype=torch.float64, device=self.x_k.device)
        self.x_k.copy_(1.0 - (i / C).pow((1.0 - self.layer_id / self.num_layers) ** 4))
        self.key.weight.uniform_(-0.5 * C ** -0.5, 0.5 * C ** -0.5)
        self.value.weight.zero_()

    def forward(self, x: Tensor, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        xk = x + (rwkv7_token_shift(x, shift) - x) * self.x_k.to(x.dtype)
        return self.value(torch.relu(self.key(xk)).square()), x[:, -1]


class RWKV7Block(nn.Module):
    """Pre-LN RWKV-7 block; layer 0 also owns ln0 (applied to the embedding). [B, T, C] -> [B, T, C].

    forward(x, v_first, state=None) -> (x, v_first, (att shift [B, C], wkv [B, H, N, N], ffn shift [B, C]))."""

    def __init__(self, dim: int, head_size: int, layer_id: int, num_layers: int, ffn_hidden: int,
                 lora: dict[str, int] | None = None, chunk_size: int = 16, impl: str = "auto"):
        super().__init__()
        self.layer_id = layer_id
        self.ln0 = nn.LayerNorm(dim) if layer_id == 0 else None
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.att = RWKV7TimeMix(dim, head_size, layer_id, num_layers, lora, chunk_size=chunk_size, impl=impl)
        self.ffn = RWKV7ChannelMix(dim, ffn_hidden, layer_id, num_layers)

    def reset_parameters(self) -> None:
        for m in (self.ln0, self.ln1, self.ln2, self.att, self.ffn):
            if m is not None:
                m.reset_parameters()

    def forward(self, x: Tensor, v_first: Tensor | None = None,
                state: tuple[Tensor, Tensor, Tensor] | None = None):
        if self.ln0 is not None:
            x = _layer_norm(x, self.ln0)
        dx, v_first, (att_shift, wkv_state) = self.att(
            _layer_norm(x, self.ln1), v_first, None if state is None else (state[0], state[1]))
        x = x + dx
        dx, ffn_shift = self.ffn(_layer_norm(x, self.ln2), None if state is None else state[2])
        return x + dx, v_first, (att_shift, wkv_state, ffn_shift)


class RWKV7LM(nn.Module):
    """Standalone RWKV-7 language model: emb -> blocks -> ln_out -> head (-> optional softcap).

    forward(input_ids [B, T], target_ids [B, T]) -> mean cross-entropy (fp32).
    forward_logits(input_ids) -> [B, T, V] fp32 logits;
    forward_logits(input_ids, state) -> (logits, new_state), the state being a per-layer list of
    (att shift [B, C], wkv [B, H, N, N] fp32, ffn shift [B, C]) — start from `initial_state(B)` and
    feed the returned state to the next window to score a long stream as one sequence.
    logit_softcap 0 = the reference (none); > 0 gives c·tanh(z/c) like the golf stack.
    Built under torch.device("meta") it skips init: `to_empty(device=...)` then `init_weights()`."""

    def __init__(self, vocab_size: int, dim: int, num_layers: int, head_size: int = 64,
                 ffn_hidden: int | None = None, tie: bool = False, logit_softcap: float = 0.0,
                 lora: dict[str, int] | None = None, chunk_size: int = 16, impl: str = "auto"):
        super().__init__()
        self.vocab_size, self.dim, self.num_layers, self.head_size = vocab_size, dim, num_layers, head_size
        self.tie, self.logit_softcap = tie, logit_softcap
        ffn_hidden = 4 * dim if ffn_hidden is None else ffn_hidden
        self.emb = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(RWKV7Block(dim, head_size, i, num_layers, ffn_hidden, lora, chunk_size, impl)
                                    for i in range(num_layers))
        self.ln_out = nn.LayerNorm(dim)
        self.head = None if tie else CastedLinear(dim, vocab_size)
        if self.emb.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Reference init (generate_init_weight): emb U(±1e-4); head orthogonal with gain
        0.5·sqrt(V/C) if V > C else 0.5; blocks as their reset_parameters(). A tied emb/head uses the
        golf stack's tied init N(0, 0.005) instead (hybrid/model.py; U(±1e-4) is an emb-only init)."""
        if self.tie:
            self.emb.weight.normal_(0.0, 0.005)
        else:
            self.emb.weight.uniform_(-1e-4, 1e-4)
            V, C = self.vocab_size, self.dim
            nn.init.orthogonal_(self.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
        for block in self.blocks:
            block.reset_parameters()
        self.ln_out.reset_parameters()

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Zero state for `forward_logits(ids, state)`: equals starting a fresh sequence."""
        device = self.emb.weight.device if device is None else device
        C, H, N = self.dim, self.dim // self.head_size, self.head_size
        z = lambda *s: torch.zeros(*s, device=device, dtype=torch.float32)
        return [(z(batch_size, C), z(batch_size, H, N, N), z(batch_size, C)) for _ in self.blocks]

    def forward_logits(self, input_ids: Tensor, state: list | None = None):
        x = self.emb(input_ids)
        v_first = None
        new_state = []
        for i, block in enumerate(self.blocks):
            x, v_first, s = block(x, v_first, None if state is None else state[i])
            new_state.append(s)
        x = _layer_norm(x, self.ln_out)
        logits = (self.head(x) if self.head is not None else F.linear(x, self.emb.weight.to(x.dtype))).float()
        if self.logit_softcap > 0:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits if state is None else (logits, new_state)

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        logits = self.forward_logits(input_ids)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction="mean")


def rwkv7_param_count(vocab_size: int, dim: int, num_layers: int, head_size: int = 64,
                      ffn_hidden: int | None = None, tie: bool = False, lora: dict[str, int] | None = None,
                      **_ignored) -> int:
    """Exact parameter count of RWKV7LM. Per layer 4C² + 2C·F + 2C(d_w + d_a + d_g) + 18C, plus
    C + 2C·d_v for the value-residual LoRA of layers ≥ 1; model: V·C (×2 untied) + 4C (ln0, ln_out).
    The README's `2VD + 4D + L(19D + 12D² + 2D(d_w+d_a+d_v+d_g))` (F = 4C) also counts layer 0's
    unused v0/v1/v2. Extra keyword arguments (a preset's logit_softcap, …) are ignored."""
    C, F_ = dim, 4 * dim if ffn_hidden is None else ffn_hidden
    d = rwkv7_lora_dims(C) if lora is None else lora
    per_layer = 4 * C * C + 2 * C * F_ + 2 * C * (d["w"] + d["a"] + d["g"]) + 18 * C
    v_residual = C + 2 * C * d["v"]
    return vocab_size * C * (1 if tie else 2) + 4 * C + num_layers * per_layer + (num_layers - 1) * v_residual


RWKV7_PRESETS: dict[str, dict] = {
    # fla-hub/rwkv7-191M-world: L12-D768, vocab 65,536, head 64, FFN 4C, untied (its Hugging Face model card).
    # 191,034,624 parameters here (the README formula, which also counts layer 0's unused v LoRA: 191,084,544).
    "rwkv7-191m": {"vocab_size": 65536, "dim": 768, "num_layers": 12, "head_size": 64, "ffn_hidden": 3072,
                   "tie": False},
    # Golf (the first sp1024 design, 9 × 512 with FFN 3C, with one layer fewer and channel-mix 2.5C;
    # docs/TECHNIQUES.md "RWKV-7"): 8 × 512, 8 heads of 64, vocab 1024 tied. 21,804,544 params. Sized by
    # a measured pack (docs/PERF.md): after 60 CPU training steps the int6 + zlib artifact was 15,630,854
    # bytes + 82,227 code = 15,713,081 (margin 286,919). The design's FFN 3C (23,901,696 params at 8
    # layers) would be ≈ 17.1 MB at the measured ~0.72 byte/param.
    "golf": {"vocab_size": 1024, "dim": 512, "num_layers": 8, "head_size": 64, "ffn_hidden": 1280, "tie": True,
             "logit_softcap": 30.0},
}


def rwkv7_reference_state_dict(model: RWKV7LM) -> dict[str, Tensor]:
    """Our weights in the BlinkDL RWKV-LM checkpoint layout (the `.pth` the `rwkv` package loads):
    same names, per-channel vectors as [1, 1, C], fp32 on the CPU, `head.weight` = emb when tied,
    and zero v0/v1/v2 for layer 0 (present in reference checkpoints, never read)."""
    C = model.dim
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().float().cpu().clone()
        if name.rsplit(".", 1)[-1] in RWKV7_VECTOR_NAMES:
            t = t.view(1, 1, C)
        out[name] = t
    if model.tie:
        out["head.weight"] = out["emb.weight"].clone()
    att0 = model.blocks[0].att
    if att0.first:
        out["blocks.0.att.v0"] = torch.zeros(1, 1, C)
        out["blocks.0.att.v1"] = torch.zeros(C, att0.lora["v"])
        out["blocks.0.att.v2"] = torch.zeros(att0.lora["v"], C)
    return out


def rwkv7_load_reference_state_dict(model: RWKV7LM, ref: dict[str, Tensor]) -> None:
    """Inverse of `rwkv7_reference_state_dict`: load a reference-layout checkpoint into `model`
    (strict: every parameter must be present with a matching number of elements)."""
    own = model.state_dict()
    missing = [n for n in own if n not in ref]
    if missing:
        raise KeyError(f"reference checkpoint lacks {missing[:5]}{' …' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, t in own.items():
            src = ref[name]
            if src.numel() != t.numel():
                raise ValueError(f"{name}: checkpoint has {tuple(src.shape)}, model {tuple(t.shape)}")
            t.copy_(src.reshape(t.shape).to(t.dtype))


def check_rwkv_block_style(cfg, need) -> None:
    """ModelConfig's rules for block_style "rwkv" (RWKV-7's own pre-LayerNorm block, hybrid/model.py's
    RWKVBlock): only R/r layers, and neither of the hybrid block's smear and ln_scale. `need(ok, msg)`
    raises the config's ValueError."""
    others = sorted({k for k in cfg.mixer_kinds if k != "R"})
    need(not others,
         f"block_style 'rwkv' builds RWKV-7 blocks, so layer_pattern may hold only R (or r = MoE FFN), got "
         f"{cfg.layer_pattern!r} with {others}; use block_style 'hybrid' to mix R with T/W/F layers")
    need(not cfg.smear, "smear is a hybrid-block feature (it acts after the embedding RMS norm, which "
                        "block_style 'rwkv' replaces by ln0); set smear=False")
    need(not cfg.ln_scale, "ln_scale (1/sqrt(layer+1) on the normed inputs) is a hybrid-block feature; "
                           "set ln_scale=False with block_style 'rwkv'")
