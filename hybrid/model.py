"""HybridGPT: the decoder that every architecture shares (hybrid, gpt, rwkv7, moe).

    ids -> tok_emb (+ BigramHash) -> RMSNorm -> (SmearGate) = x0
        -> blocks, each: x = m0⊙x + m1⊙x0;  x += mix_scale⊙mixer(norm(x)·s);  x += mlp_scale⊙ffn(norm(x)·s)
           (mixer: cfg.token_mix's T mixer (hybrid/token_mix.py; TokenShiftMix for "shift"), CausalAttention
           for W/F, RWKV7TimeMix for R; ffn: MLP, RWKV-7
           channel-mix for R with rwkv_ffn="cmix", MoEFFN for a lower-case letter; s = LN scale;
           optional U-Net skips)
        -> RMSNorm -> tied head -> softcap·tanh(z/softcap) -> fp32 cross-entropy (+ the MoE aux losses)

block_style "rwkv" (`--arch rwkv7`) swaps the block for RWKV-7's own pre-LayerNorm one (`RWKVBlock`:
ln0 on the embedding in layer 0, x += att(ln1(x)), x += ffn(ln2(x)); final ln_out instead of the RMS
norm): with rwkv_ffn="cmix" and no MoE it is RWKV7LM(tie=True) parameter for parameter, under the same
names except tok_emb for emb (tests/test_arch_integration.py checks equal logits).

v_first, the value of the first R layer, is threaded through every block (T/W/F blocks pass it on
untouched). MoE layers return their weighted aux loss, which `forward` adds to the cross-entropy
(`forward_logits` returns pure logits); each MoE block also copies its load statistics into small
non-persistent buffers, read by `expert_load_stats()`, so nothing syncs with the host during the
forward. `after_optimizer_step()` applies the aux-loss-free bias update (a no-op without MoE).

Evaluation paths (hybrid/training/evaluate.py): `forward_logits(ids, last)` runs the head only on the last `last`
positions (sliding-window eval scores only a window's tail); `forward_logits_stateful(ids, state)`
carries every recurrent state across calls (R: token shift + WKV; SmearGate, BigramHash: one token; T:
one token, or the last K−1 for token_mix conv/shiftk)
so chunks of a stream score as one sequence; models with attention (W/F) are refused (`check_stateful`).

`ModelConfig()` gives the hybrid; `ModelConfig(**ARCH_DEFAULTS["gpt"])` gives the challenge's naive
baseline, parameter for parameter (17,059,912; tests/test_model.py). The model holds no distributed
code and compiles with torch.compile(fullgraph=True, dynamic=False) (MoE: with the grouped dispatch,
which "auto" picks on CUDA under bf16 autocast; the CPU loop dispatch syncs). For a fast build without
memory, construct under `torch.device("meta")`, then `to_empty(device=...)` and `init_weights()`.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybrid.config import ModelConfig
from hybrid.layers import (
    MLP,
    BigramHash,
    CastedLinear,
    CausalAttention,
    SmearGate,
    TokenShiftMix,
    ValueEmbedding,
    rms_norm,
)

# hybrid.moe, hybrid.moe_presets and hybrid.rwkv7 are imported inside the functions that need them:
# a run's code bytes are the modules it imports (quant/budget.py), so a hybrid run never loads them.


def affine_layer_norm(x: Tensor, ln: nn.LayerNorm) -> Tensor:
    """LayerNorm with its fp32 affine cast to the activation dtype (the repo's control-param rule)."""
    return F.layer_norm(x, ln.normalized_shape, ln.weight.to(x.dtype), ln.bias.to(x.dtype), ln.eps)


def to_autocast_dtype(x: Tensor) -> Tensor:
    """x in the autocast dtype when autocast is on (else unchanged). The residual stream stays fp32
    under autocast; MoE dispatch wants the bf16 input to take the grouped-mm path (no host sync)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return x.to(torch.get_autocast_dtype(dev))
    return x


def moe_load_stats(cfg: ModelConfig) -> nn.Module:
    """An MoE layer's `MoELoadStats` (hybrid/moe.py: imported only by models with MoE layers)."""
    from hybrid.moe import MoELoadStats

    return MoELoadStats(cfg.moe_num_experts)


def build_ffn(cfg: ModelConfig, layer_idx: int, letter: str) -> tuple[nn.Module, str]:
    """The FFN a pattern letter asks for: (module, kind) with kind "moe" (lower case), "cmix" (R with
    rwkv_ffn="cmix") or "mlp"."""
    C = cfg.model_dim
    if letter.islower():
        from hybrid.moe import MoEFFN

        return MoEFFN(C, cfg.moe_config), "moe"
    if letter == "R" and cfg.rwkv_ffn == "cmix":
        from hybrid.rwkv7 import RWKV7ChannelMix

        return RWKV7ChannelMix(C, cfg.mlp_hidden, layer_idx, cfg.num_layers), "cmix"
    return MLP(C, cfg.mlp_hidden, cfg.mlp_act, fused=cfg.mlp_fused), "mlp"


def run_ffn(ffn: nn.Module, kind: str, h: Tensor, stats: nn.Module | None,
            shift: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Apply an FFN made by `build_ffn`: (output, weighted MoE aux loss or None, carried state or None).
    Only the channel-mix has state: its token shift's last input [B, C], fed back as `shift`."""
    if kind == "moe":
        y, aux = ffn(to_autocast_dtype(h))
        stats.record(aux)
        return y, aux["loss"], None
    if kind == "cmix":
        y, last = ffn(h, shift)
        return y, None, last
    return ffn(h), None, None


def shifted_call(fn, x: Tensor, prev: Tensor, *pairs: tuple[Tensor, Tensor]) -> Tensor:
    """fn(x, *args) for an fn whose output at t reads only inputs t and t−1 (TokenShiftMix, SmearGate),
    with `prev` [B, C] as the input at t = −1 instead of zeros (each extra arg comes as a pair
    (carried [B, 1] column, arg [B, T])): run fn one step longer and drop its first output."""
    x = torch.cat((prev.to(x.dtype).unsqueeze(1), x), dim=1)  # (B, T+1, C)
    return fn(x, *(torch.cat(pair, dim=1) for pair in pairs))[:, 1:]


class Block(nn.Module):
    """Pre-norm residual block with a sequence mixer and an FFN. [B, T, C] -> [B, T, C].

    Mixer by letter: "T" -> hybrid/token_mix.py's cfg.token_mix (TokenShiftMix for "shift");
    "W" -> CausalAttention with window cfg.attn_window; "F" -> full; "R" -> RWKV7TimeMix (`first_rwkv`
    marks the layer that makes v_first). FFN: the MLP, RWKV-7 channel-mix for "R" with
    cfg.rwkv_ffn == "cmix", or MoEFFN for a lower-case letter.
    resid_mix (2 × C, init [1, 0]) blends the stream with x0 first (baseline). With cfg.ln_scale the
    normed inputs of both sublayers are scaled by 1/sqrt(layer_idx+1) (golf PR #315); unlike the
    published hybrid, which skipped it in token-shift blocks, we apply it to every block so the
    depth schedule does not depend on the layer kind.

    forward(x, x0, ve, v_first) -> (x, v_first, weighted MoE aux loss or None);
    forward_stateful(x, x0, v_first, state) -> (x, v_first, new state), see HybridGPT.forward_logits_stateful."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, kind: str, first_rwkv: bool = False):
        super().__init__()
        C = cfg.model_dim
        self.kind = kind.upper()  # the mixer
        self.is_moe = kind.islower()
        self.ln_scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.ln_scale else 1.0
        if self.kind == "T" and cfg.token_mix == "shift":
            self.mixer: nn.Module = TokenShiftMix(C)
        elif self.kind == "T":  # not imported by TOKEN_MIX=shift runs (code bytes)
            from hybrid.token_mix import token_mixer

            self.mixer = token_mixer(cfg.token_mix, C, cfg.token_mix_kernel)
        elif self.kind == "R":
            from hybrid.rwkv7 import RWKV7TimeMix

            self.mixer = RWKV7TimeMix(C, cfg.rwkv_head_size, layer_idx, cfg.num_layers, first=first_rwkv,
                                      chunk_size=cfg.rwkv_chunk, impl=cfg.rwkv_impl)
        else:
            self.mixer = CausalAttention(
                C, cfg.num_heads, cfg.num_kv_heads, cfg.rotary_dims, cfg.rope_base, cfg.qk_gain_init,
                window=cfg.attn_window if self.kind == "W" else None,
                xsa=layer_idx in cfg.xsa_layer_ids,
                use_ve=layer_idx in cfg.ve_layer_ids,
                qk_norm_gain=cfg.qk_norm_gain,
            )
        self.mlp, self.ffn_kind = build_ffn(cfg, layer_idx, kind)
        self.moe_stats = moe_load_stats(cfg) if self.is_moe else None
        self.mix_scale = nn.Parameter(torch.empty(C))
        self.mlp_scale = nn.Parameter(torch.empty(C))
        self.resid_mix = nn.Parameter(torch.empty(2, C))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.mix_scale.fill_(1.0)
            self.mlp_scale.fill_(1.0)
            self.resid_mix[0].fill_(1.0)
            self.resid_mix[1].zero_()

    def _norm(self, x: Tensor) -> Tensor:
        h = rms_norm(x)
        return h * self.ln_scale if self.ln_scale != 1.0 else h

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None = None,
                v_first: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x, v_first, aux_loss, _ = self._run(x, x0, ve, v_first, None)
        return x, v_first, aux_loss

    def forward_stateful(self, x: Tensor, x0: Tensor, v_first: Tensor | None, state: tuple | None):
        """State = (mixer state, FFN state): T -> last normed input [B, C] ("shift"), or the last
        `mixer.lookback` normed inputs [B, lookback, C] (hybrid/token_mix.py's variants); R -> (shift
        [B, C], WKV [B, H, N, N] fp32); the channel-mix -> its last input [B, C]; None elsewhere / when fresh."""
        x, v_first, _, new_state = self._run(x, x0, None, v_first, state)
        return x, v_first, new_state

    def _run(self, x: Tensor, x0: Tensor, ve: Tensor | None, v_first: Tensor | None, state: tuple | None):
        mix_state, ffn_state = (None, None) if state is None else state
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        h = self._norm(x)
        if self.kind == "T" and hasattr(self.mixer, "step"):  # token_mix variants carry their own lookback
            out, mix_state = self.mixer.step(h, mix_state)
        elif self.kind == "T":  # the plain shift: one previous token
            out = self.mixer(h) if mix_state is None else shifted_call(self.mixer, h, mix_state)
            mix_state = h[:, -1]
        elif self.kind == "R":
            out, v_first, mix_state = self.mixer(h, v_first, mix_state)
        else:
            out, mix_state = self.mixer(h, ve), None
        x = x + self.mix_scale.to(x.dtype) * out
        y, aux_loss, ffn_state = run_ffn(self.mlp, self.ffn_kind, self._norm(x), self.moe_stats, ffn_state)
        return x + self.mlp_scale.to(x.dtype) * y, v_first, aux_loss, (mix_state, ffn_state)


class RWKVBlock(nn.Module):
    """RWKV-7's pre-LayerNorm block (block_style "rwkv"), with RWKV7Block's structure and parameter
    names (ln0 in layer 0, ln1, ln2, att, ffn), whose FFN may also be the MLP (rwkv_ffn="mlp") or an
    MoEFFN (letter "r"). [B, T, C] -> [B, T, C].

        x = ln0(x) (layer 0);  x += att(ln1(x), v_first);  x += ffn(ln2(x))

    forward(x, x0, ve, v_first) -> (x, v_first, weighted MoE aux loss or None); x0 and ve are unused
    (the signature is Block's). forward_stateful(x, x0, v_first, state) -> (x, v_first, new state),
    state = ((att shift [B, C], WKV [B, H, N, N] fp32), channel-mix shift [B, C] or None)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, kind: str):
        super().__init__()
        if kind.upper() != "R":
            raise ValueError(f"RWKVBlock takes only R/r layers, got {kind!r}")
        from hybrid.rwkv7 import RWKV7TimeMix

        C = cfg.model_dim
        self.kind = "R"
        self.is_moe = kind.islower()
        self.ln0 = nn.LayerNorm(C) if layer_idx == 0 else None
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = RWKV7TimeMix(C, cfg.rwkv_head_size, layer_idx, cfg.num_layers, first=layer_idx == 0,
                                chunk_size=cfg.rwkv_chunk, impl=cfg.rwkv_impl)
        self.ffn, self.ffn_kind = build_ffn(cfg, layer_idx, kind)
        self.moe_stats = moe_load_stats(cfg) if self.is_moe else None

    def forward(self, x: Tensor, x0: Tensor | None = None, ve: Tensor | None = None,
                v_first: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x, v_first, aux_loss, _ = self._run(x, v_first, None)
        return x, v_first, aux_loss

    def forward_stateful(self, x: Tensor, x0: Tensor | None, v_first: Tensor | None, state: tuple | None):
        x, v_first, _, new_state = self._run(x, v_first, state)
        return x, v_first, new_state

    def _run(self, x: Tensor, v_first: Tensor | None, state: tuple | None):
        att_state, ffn_state = (None, None) if state is None else state
        if self.ln0 is not None:
            x = affine_layer_norm(x, self.ln0)
        dx, v_first, att_state = self.att(affine_layer_norm(x, self.ln1), v_first, att_state)
        x = x + dx
        y, aux_loss, ffn_state = run_ffn(self.ffn, self.ffn_kind, affine_layer_norm(x, self.ln2), self.moe_stats,
                                         ffn_state)
        return x + y, v_first, aux_loss, (att_state, ffn_state)


class HybridGPT(nn.Module):
    """forward(input_ids, target_ids) -> mean loss (+ MoE aux losses); forward_logits(input_ids, last=0)
    -> (B, T or last, V) fp32 logits; forward_logits_stateful(input_ids, state) -> (logits, state) for
    models without attention; expert_load_stats() / after_optimizer_step() for MoE layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C = cfg.model_dim
        self.rwkv_style = cfg.block_style == "rwkv"
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.bigram = BigramHash(cfg.bigram_buckets, cfg.bigram_dim, C) if cfg.bigram_buckets > 0 else None
        self.smear = SmearGate(C) if cfg.smear else None
        self.ve_layer_ids = cfg.ve_layer_ids
        self.ve = ValueEmbedding(cfg.vocab_size, cfg.ve_dim, cfg.kv_dim) if self.ve_layer_ids else None
        if self.rwkv_style:
            self.blocks = nn.ModuleList(RWKVBlock(cfg, i, kind) for i, kind in enumerate(cfg.layer_kinds))
        else:
            first_r = cfg.rwkv_layer_ids[0] if cfg.rwkv_layer_ids else -1
            self.blocks = nn.ModuleList(Block(cfg, i, kind, first_rwkv=i == first_r)
                                        for i, kind in enumerate(cfg.layer_kinds))
        self.ln_out = nn.LayerNorm(C) if self.rwkv_style else None
        # Baseline U-Net: the first L//2 blocks push their outputs, the later ones pop in reverse.
        self.num_encoder_layers = cfg.num_layers // 2 if cfg.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.empty(self.num_encoder_layers, C)) if cfg.unet_skips else None
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter. The whole init policy, in one table:

        | parameter                                     | init                                     |
        |-----------------------------------------------|------------------------------------------|
        | tok_emb.weight (tied head)                    | N(0, tied_embed_init_std = 0.005)        |
        | CastedLinear with _zero_init (attention proj, | 0 (baseline)                             |
        |   mlp.proj, token-shift w_v, expert proj)     |                                          |
        | other CastedLinear, ortho_init, both dims>=64 | orthogonal, gain 1 (golf PR #164)        |
        |   bigram.proj, ve.proj (outputs into stream)  |   then × 1/sqrt(2·num_layers) (records'  |
        |                                               |   muP-style scaling, PR #162, PR #135)   |
        | other CastedLinear                            | PyTorch default (kaiming-uniform, a=√5)  |
        | RWKV-7 time-mix / channel-mix (R layers),     | RWKV-7 reference init, every parameter:  |
        |   matrices and LoRAs included                 |   RWKV7TimeMix/ChannelMix.reset_parameters |
        | MoE router (nn.Linear) / expert_bias          | PyTorch default / 0                      |
        | LayerNorms (block_style "rwkv")               | 1, 0                                     |
        | bigram.table / bigram.bigram_scale            | 0 / 0.05                                 |
        | ve.table / ve.shared_scale / mixer.ve_scale   | N(0, 0.01) / 0.1 / 1                     |
        | smear.gate                                    | 0 (σ = 0.5)                              |
        | mixer.mix_r, mixer.mix_k (token shift)        | 0.5 (σ ≈ 0.62 on the current token)      |
        | token_mix variants' own vectors / taps; their | each module's reset_parameters() (equal  |
        |   lora_b_* (ddlerp, _zero_init)               |   to the lerp at init) / 0               |
        | mixer.q_gain / q_norm_gain, k_norm_gain       | qk_gain_init = 1.5 / 1                   |
        | mix_scale, mlp_scale / resid_mix              | 1 / [1, 0]                               |
        | skip_weights                                  | 1                                        |

        Leaf control values live in each module's reset_parameters(); this method calls them, so a
        meta-built model after to_empty() is fully initialised by this call alone."""
        cfg = self.cfg
        self.tok_emb.weight.normal_(0.0, cfg.tied_embed_init_std)
        if self.skip_weights is not None:
            self.skip_weights.fill_(1.0)
        # RWKV-7 modules own the init of everything inside them (the RWKV-LM reference init,
        # docs/TECHNIQUES.md "RWKV-7").
        rwkv: list[nn.Module] = []
        if cfg.rwkv_layer_ids:
            from hybrid.rwkv7 import RWKV7ChannelMix, RWKV7TimeMix

            rwkv = [m for m in self.modules() if isinstance(m, (RWKV7TimeMix, RWKV7ChannelMix))]
        owned = {id(sub) for m in rwkv for sub in m.modules()}
        out_proj = {m for m in (self.bigram, self.ve) if m is not None}
        for module in self.modules():
            if id(module) in owned:
                continue
            if isinstance(module, CastedLinear):
                if module._zero_init:
                    module.weight.zero_()
                elif cfg.ortho_init and min(module.weight.shape) >= 64:
                    nn.init.orthogonal_(module.weight, gain=1.0)
                else:
                    module.reset_parameters()
                if module.bias is not None:
                    module.bias.zero_()
            elif module is not self and hasattr(module, "reset_parameters") and not isinstance(module, nn.Embedding):
                module.reset_parameters()  # leaf control params (and the bigram/VE tables, MoE buffers)
        for module in rwkv:
            module.reset_parameters()
        for module in out_proj:
            if cfg.ortho_init and min(module.proj.weight.shape) >= 64:
                module.proj.weight.mul_(1.0 / math.sqrt(2 * cfg.num_layers))

    def _trunk(self, input_ids: Tensor, state: tuple | None = None,
               carry: bool = False) -> tuple[Tensor, Tensor | None, tuple | None]:
        """[B, T] ids -> (final-normed hidden [B, T, C], summed MoE aux loss or None, new state or None).
        state None starts a fresh sequence; carry=True returns the state to continue it (see
        `forward_logits_stateful`; attention layers carry none, the caller refuses them)."""
        emb_state, block_states = (None, None) if state is None else state
        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.bigram is not None:
            if emb_state is None:
                x = x + self.bigram(input_ids)
            else:  # the previous chunk's last id is this chunk's first "previous token"
                x = x + self.bigram(torch.cat((emb_state[0], input_ids), dim=1))[:, 1:]
        smear_in = x
        if not self.rwkv_style:  # RWKV blocks normalise the embedding with ln0 inside block 0
            x = smear_in = rms_norm(x)
            if self.smear is not None:
                if emb_state is None:
                    x = self.smear(x, input_ids)
                else:
                    x = shifted_call(self.smear, x, emb_state[1], (emb_state[0], input_ids))
        x0 = x
        ve = self.ve(input_ids) if self.ve is not None else None  # (B, T, G*D)
        v_first: Tensor | None = None  # value of the first R layer (RWKV-7 value residual)
        aux_loss: Tensor | None = None
        skips: list[Tensor] = []
        new_blocks: list[tuple] = []
        for i, block in enumerate(self.blocks):
            if self.skip_weights is not None and i >= self.num_encoder_layers and skips:
                x = x + self.skip_weights[i - self.num_encoder_layers].to(x.dtype) * skips.pop()
            if carry:
                s = None if block_states is None else block_states[i]
                x, v_first, s = block.forward_stateful(x, x0, v_first, s)
                new_blocks.append(s)
            else:
                x, v_first, aux = block(x, x0, ve if i in self.ve_layer_ids else None, v_first)
                if aux is not None:
                    aux_loss = aux if aux_loss is None else aux_loss + aux
            if i < self.num_encoder_layers:
                skips.append(x)
        x = affine_layer_norm(x, self.ln_out) if self.ln_out is not None else rms_norm(x)
        new_state = ((input_ids[:, -1:], smear_in[:, -1]), new_blocks) if carry else None
        return x, aux_loss, new_state

    def _head(self, x: Tensor) -> Tensor:
        """Final-normed hidden [..., C] -> float32 logits after the softcap [..., V]."""
        # Softcap in fp32 (the baseline applies it in the autocast dtype, then upcasts for the CE).
        z = F.linear(x, self.tok_emb.weight.to(x.dtype)).float()  # (..., V)
        c = self.cfg.logit_softcap
        return c * torch.tanh(z / c)

    def forward_with_aux(self, input_ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """[B, T] int ids -> ([B, T, V] float32 logits after the softcap, summed weighted MoE aux loss
        (fp32 scalar) or None when the model has no MoE layer)."""
        x, aux_loss, _ = self._trunk(input_ids)
        return self._head(x), aux_loss

    def forward_logits(self, input_ids: Tensor, last: int = 0) -> Tensor:
        """[B, T] int ids -> [B, T, V] float32 logits after the softcap (no aux loss). last > 0: only
        the last `last` positions, [B, last, V]; the head, softcap and the caller's cross-entropy then
        never touch the others (sliding-window eval scores only a window's tail)."""
        x = self._trunk(input_ids)[0]
        return self._head(x[:, -last:] if last > 0 else x)

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats) over all B·T positions, in fp32, plus the weighted MoE
        aux losses (load balance + router z-loss) when the pattern has MoE layers."""
        logits, aux_loss = self.forward_with_aux(input_ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction="mean")
        return loss if aux_loss is None else loss + aux_loss

    def check_stateful(self) -> None:
        """`check_stateful(self.cfg)`: ValueError unless `forward_logits_stateful` is exact."""
        check_stateful(self.cfg)

    def forward_logits_stateful(self, input_ids: Tensor, state: tuple | None = None) -> tuple[Tensor, tuple]:
        """Score a long stream chunk by chunk: [B, T] ids + the state returned for the previous chunk
        (None: a fresh sequence) -> ([B, T, V] float32 logits, new state). Feeding consecutive chunks
        with their returned state gives the logits of one forward over their concatenation (up to
        float rounding), for any chunk lengths. Only for models whose mixers are all R or T
        (`check_stateful`). The state is a pytree of tensors:
        ((last id [B, 1], last embedding before SmearGate [B, C]), [per block (mixer state, FFN state)])."""
        self.check_stateful()
        x, _, new_state = self._trunk(input_ids, state, carry=True)
        return self._head(x), new_state

    # ---- Mixture of Experts bookkeeping ---------------------------------------------------------

    def moe_blocks(self) -> list[tuple[int, nn.Module]]:
        return [(i, b) for i, b in enumerate(self.blocks) if b.moe_stats is not None]

    def expert_load_stats(self) -> list[dict]:
        """Per MoE layer, from the last forward (training or eval), detached tensors on the model's
        device (no host sync here; format with `expert_load_summary` when logging):
        layer (block index), expert_frac [E] (share of token slots, sums to 1), load_max_mean
        (max/mean load, 1 = balanced), aux_loss (weighted, as added to the loss), balance_loss,
        z_loss (unweighted), expert_bias [E] (the selection bias of aux-loss-free balancing).
        [] without MoE layers (hybrid/moe.py, imported only by models with MoE layers)."""
        if not self.cfg.moe_layer_ids:
            return []
        from hybrid.moe import expert_load_stats

        return expert_load_stats(self)

    def after_optimizer_step(self) -> int:
        """Aux-loss-free balancing: move every MoE layer's selection bias toward uniform load using
        the token counts of the training forwards since the last call (all-reduced across ranks when
        torch.distributed is initialised, so call it on every rank). Returns the number of layers
        updated; 0 (a no-op) without MoE layers or with moe_bias_balancing off."""
        if not self.cfg.moe_layer_ids:
            return 0
        from hybrid.moe import update_expert_biases

        return update_expert_biases(self)

    def param_counts(self) -> tuple[int, int]:
        """(total, active per token): active leaves out the routed experts a token does not use,
        (E − k) per MoE layer (the moe_presets convention; the tied embedding counts as active)."""
        total = count_params(self)
        if not self.cfg.moe_layer_ids:
            return total, total
        from hybrid.moe import inactive_expert_params

        return total, total - inactive_expert_params(self)


def check_stateful(cfg: ModelConfig) -> None:
    """Raise ValueError unless every sequence mixer of `cfg` carries its whole past in a fixed-size state
    (R: WKV state + token shift; T: its last one or K−1 inputs), i.e. unless
    `HybridGPT.forward_logits_stateful` is exact.
    Attention (W, F) reads its past tokens themselves, which a chunk-to-chunk state cannot carry."""
    attn = sorted({k for k in cfg.mixer_kinds if k not in "RT"})
    if attn:
        raise ValueError(
            f"stateful evaluation needs every sequence mixer to be recurrent (R or T layers); layer pattern "
            f"{cfg.layer_pattern!r} has attention layers {attn} (W = windowed, F = full), whose context "
            f"cannot be carried across chunks: use sliding-window evaluation for this model")


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (the tied embedding counts once), as the baseline logs it."""
    return sum(p.numel() for p in model.parameters())


def expert_load_summary(stats: list[dict]) -> str:
    """One log line from `HybridGPT.expert_load_stats()` (hybrid/moe.py's `moe_load_summary`, imported
    on use: only MoE runs log it)."""
    from hybrid.moe import moe_load_summary

    return moe_load_summary(stats)
