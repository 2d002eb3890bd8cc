"""Model configuration: the one declaration of every model setting (ModelConfig, which the trainer's
flags and environment variables are derived from), the layer-pattern grammar, and the four named
architectures (ARCH_DEFAULTS: hybrid, gpt, rwkv7, moe).

`ModelConfig()` is the project's hybrid (token-shift + short-window attention after golf PR #1007/#1112;
docs/TECHNIQUES.md, "Layer pattern and the published hybrid"); `ModelConfig(**ARCH_DEFAULTS["gpt"])` is
the challenge's naive baseline (rec:2026-03-17_NaiveBaseline), which must have exactly 17,059,912
parameters. Every field is validated on construction (`__post_init__`), so a
bad env override fails before any tensor is allocated, with a message that names the field.

Layer pattern: one letter per layer, written out at full length (no tiling), e.g. "TTTWTTWTTWTF".
The letter picks the block's sequence mixer:
  T  token-shift mixer (a few tokens of lookback, no attention) docs/TECHNIQUES.md "Token-shift mixer"
  W  causal attention over a sliding window of `attn_window` tokens (the query and the w-1 before it)
  F  full causal attention
  R  RWKV-7 time-mix (hybrid/rwkv7.py; docs/TECHNIQUES.md "RWKV-7"); the first R layer makes the value residual
     v_first that every later R layer mixes in
The T mixer itself is `token_mix`: "conv" (the default: a causal depthwise convolution over the last
K = token_mix_kernel tokens in place of the one-token lerp), "shift" (TokenShiftMix, the published
hybrid's lerp) or another variant of hybrid/token_mix.py (ddlerp, shiftk, shift_silu_gate).
Its case picks the FFN: upper case = the dense FFN (the hybrid MLP; an R layer takes RWKV-7's
channel-mix instead when rwkv_ffn="cmix"), lower case = the same mixer with a Mixture-of-Experts FFN
(hybrid/moe.py, shaped by the moe_* fields, which need moe_num_experts > 0). So "TttWttWttWtF" says
exactly which layers hold experts.

Block style: "hybrid" (default) = the RMS-norm residual block of hybrid/model.py with resid_mix and
per-branch scales; "rwkv" = RWKV-7's own pre-LayerNorm block (ln0 on the embedding, ln1/ln2, ln_out),
parameter for parameter RWKV7LM, which takes only R/r letters (`--arch rwkv7`).

Named architectures (ARCH_DEFAULTS): "hybrid", "gpt" (the naive baseline), "rwkv7" (8 × 512 RWKV-7,
channel-mix 2.5x) and "moe" (MOE_PRESETS["golf"]'s FFNs on the hybrid's mixers: 11 × 512, dense layer
0, 4 routed experts of 192 top-1 + 1 shared of 256 in layers 1-10; 21,284,896 params, 15,386,656
active per token). Both golf sizes were fitted by a measured pack (docs/PERF.md). The full-size seeds (rize, rish, rwkv7-191m) stay in their modules;
hybrid.presets.model_preset_report counts them on the meta device.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, make_dataclass

# hybrid.moe / hybrid.rwkv7 / hybrid.kernels.wkv7 are imported only where a config uses them: a run's code
# bytes count the modules it imports (quant/budget.py), so a hybrid run must not load them.

LAYER_KINDS = {
    "T": "token-shift mixer",
    "W": "sliding-window causal attention",
    "F": "full causal attention",
    "R": "RWKV-7 time-mix",
}
MLP_ACTIVATIONS = ("leaky_relu2", "relu2")
MLP_FUSED_MODES = ("auto", "triton", "off", "ref")  # = hybrid.kernels.fused_mlp.FUSED_MLP_MODES (tested)
TOKEN_MIXES = ("shift", "ddlerp", "conv", "shiftk", "shift_silu_gate")  # hybrid/token_mix.py
# K < 16 keeps a conv/shiftk [K, C] tap tensor off Muon and out of the int grid (optim.is_matrix,
# quant.policy.MIN_MATRIX_DIM): it stays a per-channel control tensor.
TOKEN_MIX_MAX_KERNEL = 15
BLOCK_STYLES = ("hybrid", "rwkv")
RWKV_FFNS = ("mlp", "cmix")
# WKV chunks: the chunked form's factors reach e^{c/2·0.607}; fp32 holds up to c ≈ 130 (hybrid/kernels/wkv7.py).
RWKV_MAX_CHUNK = 128
# ModelConfig's MoE settings -> the field of hybrid.moe.MoEConfig (the MoE layer's own config, also
# used by the seed presets and the peer tests) each one sets; MoEConfig.validate holds their rules.
MOE_FIELDS = {
    "moe_num_experts": "num_experts", "moe_top_k": "top_k", "moe_expert_hidden": "expert_hidden",
    "moe_shared_experts": "num_shared_experts", "moe_shared_hidden": "shared_hidden",
    "moe_shared_gate": "shared_gate", "moe_router": "router", "moe_norm_topk": "norm_topk_prob",
    "moe_routed_scale": "routed_scaling_factor", "moe_aux_coef": "aux_loss_coef",
    "moe_balance_loss": "balance_loss", "moe_z_coef": "z_loss_coef", "moe_bias_balancing": "bias_balancing",
    "moe_bias_rate": "bias_update_rate", "moe_act": "activation", "moe_dispatch": "dispatch",
}


def parse_layer_pattern(pattern: str, num_layers: int, moe: bool = False) -> list[str]:
    """"TTWF" -> ["T", "T", "W", "F"]; with moe=True lower-case letters (MoE FFN) are allowed too,
    "TtRr" -> ["T", "t", "R", "r"]. ValueError (naming the allowed letters and both lengths) otherwise."""
    allowed = ", ".join(f"{k} = {v}" for k, v in LAYER_KINDS.items())
    allowed += "; lower case (t, w, f, r) = the same mixer with an MoE FFN"
    letters = set(LAYER_KINDS) | ({k.lower() for k in LAYER_KINDS} if moe else set())
    bad = sorted({c for c in pattern if c not in letters})
    if bad:
        lower = [c for c in bad if c.upper() in LAYER_KINDS]
        hint = (f"; the lower-case letter(s) {lower} ask for an MoE FFN, which needs moe_num_experts > 0 "
                f"(it is 0)" if lower and not moe else "")
        raise ValueError(
            f"layer_pattern {pattern!r} contains invalid letter(s) {bad}; allowed letters: {allowed}{hint}"
        )
    if len(pattern) != num_layers:
        raise ValueError(
            f"layer_pattern {pattern!r} has {len(pattern)} letters but num_layers is {num_layers}; "
            f"write one letter per layer ({allowed})"
        )
    return list(pattern)


@dataclass
class ModelConfig:
    """Shape and feature switches of `HybridGPT`: the one declaration of every model setting. Each
    field is also a setting of the trainer (env var FIELD_NAME, flag --field-name, with this help);
    the defaults are the hybrid's, ARCH_DEFAULTS holds the other arches'."""

    vocab_size: int = field(default=1024, metadata={"help": "vocabulary size (must match the tokenizer)"})
    num_layers: int = field(default=12, metadata={"help": "number of blocks"})
    model_dim: int = field(default=512, metadata={"help": "residual width"})
    num_heads: int = field(default=8, metadata={"help": "query heads"})
    num_kv_heads: int = field(default=4, metadata={"help": "key/value heads (GQA)"})
    # We never round the hidden width, so the parameter count is exactly what the multiplier says.
    # MLP3x is the records' width (PR #164, rec:2026-03-19 MixedQuant: about -0.02 bpb against 2x); it
    # fits 16 MB with int6 + zlib because the default export is SDClip + GPTQ (~0.49 byte/param,
    # docs/PERF.md), with the budget fit (quant/fit.py) as the guarantee.
    mlp_mult: float = field(default=3.0, metadata={"help": (
        "MLP hidden = mlp_mult × model_dim, a whole number (1.75 -> 896, 3.0 -> 1536)")})
    mlp_act: str = field(default="leaky_relu2", metadata={"help": (
        "leaky_relu2 (leaky_relu(x, 0.5)², golf PR #493) | relu2 (the baseline's)")})
    # Off by default until a GPU measurement shows it pays (docs/PERF.md); "off" is bit-identical to
    # the unfused MLP.
    mlp_fused: str = field(default="off", metadata={"help": (
        "MLP up-projection + activation as one Triton kernel (hybrid/kernels/fused_mlp.py): auto (CUDA "
        "bf16/fp16) | triton (always; errors without it) | off")})
    layer_pattern: str = field(default="TTTWTTWTTWTF", metadata={"help": (
        "one letter per layer: T token-shift, W windowed attention, F full attention, R RWKV-7 time-mix; "
        "lower case = the same mixer with an MoE FFN")})
    attn_window: int = field(default=128, metadata={"help": "tokens a W layer's query sees, itself included"})
    # "conv" with XSA off (xsa_last 0) is issue 11's measured winner on held-out text at the CPU scale:
    # 5 seeds of 500 steps, 0.03 nats under "shift" with XSA (docs/PERF.md, "conv and XSA off together").
    token_mix: str = field(default="conv", metadata={"help": (
        "T-layer mixer (hybrid/token_mix.py): shift (one-token lerp) | ddlerp (RWKV-6's data-dependent "
        "lerp) | conv (causal depthwise conv over K) | shiftk (softmax mix of the last K) | "
        "shift_silu_gate")})
    token_mix_kernel: int = field(default=4, metadata={"help": (
        "K, the tokens (current included) that conv/shiftk mix: 1..15 (TOKEN_MIX_MAX_KERNEL)")})
    rope_dims: int = field(default=16, metadata={"help": (
        "head dims rotated by RoPE (16 of 64: golf PR #315; 0 = all)")})
    rope_base: float = field(default=10000.0, metadata={"help": "RoPE base"})
    # PR #1125 swept 1.5/2/3/4 on the 11-layer stack: 4.0 was best (-0.0039 bpb); docs/SETTINGS.md.
    qk_gain_init: float = field(default=4.0, metadata={"help": "initial per-head query gain"})
    # Neither the baseline nor the published hybrid has it, so "gpt" turns it off.
    qk_norm_gain: bool = field(default=True, metadata={"help": "learned per-dim gains after the q/k RMS norms"})
    # Off by default (see token_mix); the full-size records found XSA on the last 4 layers a small help
    # (PR #1125), which XSA_LAST=4 restores.
    xsa_last: int = field(default=0, metadata={"help": (
        "XSA on the last N attention (W or F) layers (0: off; more than there are: all)")})
    ve_layers: str = field(default="", metadata={"help": (
        "value-embedding layers: a comma list of attention layers, 'none', or empty for the last 2 "
        "attention layers")})
    ve_dim: int = field(default=128, metadata={"help": "value-embedding table width"})
    smear: bool = field(default=True, metadata={"help": "SmearGate on the embedding"})
    bigram_buckets: int = field(default=2048, metadata={"help": "BigramHash buckets (0: off)"})
    bigram_dim: int = field(default=128, metadata={"help": "BigramHash table width"})
    ln_scale: bool = field(default=True, metadata={"help": (
        "scale block i's normed inputs by 1/sqrt(i+1) (golf PR #315)")})
    unet_skips: bool = field(default=False, metadata={"help": (
        "the baseline's U-Net skip connections (the hybrid's README: removing them helped)")})
    logit_softcap: float = field(default=30.0, metadata={"help": "logits = c·tanh(z/c)"})
    tied_embed_init_std: float = field(default=0.005, metadata={"help": "std of the tied embedding at init"})
    ortho_init: bool = field(default=True, metadata={"help": "orthogonal init of the matrices"})
    # ---- block style and RWKV-7 (R / r layers) --------------------------------------------------
    block_style: str = field(default="hybrid", metadata={"help": (
        "hybrid | rwkv (RWKV-7's own pre-LayerNorm block; R/r letters only)")})
    rwkv_head_size: int = field(default=64, metadata={"help": (
        "RWKV-7 head size N: model_dim / N heads, a [N, N] state each")})
    rwkv_ffn: str = field(default="mlp", metadata={"help": (
        "FFN of R layers, hidden mlp_mult × model_dim: mlp (the hybrid MLP) | cmix (RWKV-7 channel-mix, "
        "token-shifted relu²)")})
    rwkv_chunk: int = field(default=16, metadata={"help": (
        "chunk of the PyTorch WKV-7 form / checkpoint interval of the Triton kernel")})
    rwkv_impl: str = field(default="auto", metadata={"help": (
        "WKV-7 implementation: auto | ref | chunked | triton (hybrid/kernels/wkv7.py)")})
    # ---- Mixture of Experts (lower-case layers) -------------------------------------------------
    # Each moe_X is field MOE_FIELDS[moe_X] of the hybrid.moe.MoEConfig every MoE layer is built with
    # (`moe_config`); MoEConfig.validate holds their rules.
    moe_num_experts: int = field(default=0, metadata={"help": (
        "routed experts per MoE layer (0: no MoE; lower-case letters refused)")})
    moe_top_k: int = field(default=1, metadata={"help": "experts per token"})
    moe_expert_hidden: int = field(default=256, metadata={"help": "hidden width of a routed expert"})
    moe_shared_experts: int = field(default=1, metadata={"help": "always-on shared experts (fused into one MLP)"})
    moe_shared_hidden: int = field(default=384, metadata={"help": "hidden width of each shared expert"})
    moe_shared_gate: bool = field(default=False, metadata={"help": "sigmoid gate on the shared output (Qwen2-MoE)"})
    moe_router: str = field(default="sigmoid", metadata={"help": "sigmoid (DeepSeek-V3) | softmax (Mixtral)"})
    moe_norm_topk: bool = field(default=False, metadata={"help": (
        "renormalise the top-k gates to sum 1 (needs top_k >= 2)")})
    moe_routed_scale: float = field(default=1.0, metadata={"help": "routed scaling factor"})
    moe_aux_coef: float = field(default=1e-4, metadata={"help": "weight of the load-balancing loss"})
    moe_balance_loss: str = field(default="sequence", metadata={"help": (
        "sequence (DeepSeek-V3) | batch (Switch/Mixtral)")})
    moe_z_coef: float = field(default=1e-3, metadata={"help": "weight of the router z-loss"})
    moe_bias_balancing: bool = field(default=True, metadata={"help": (
        "auxiliary-loss-free bias balancing (HybridGPT.after_optimizer_step)")})
    moe_bias_rate: float = field(default=1e-3, metadata={"help": "step of that bias update"})
    moe_act: str = field(default="leaky_relu2", metadata={"help": "expert activation: leaky_relu2 | relu2 | swiglu"})
    moe_dispatch: str = field(default="auto", metadata={"help": (
        "auto (grouped_mm on CUDA bf16, else the loop) | grouped | loop")})

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived shapes ------------------------------------------------------------------------

    @property
    def layer_kinds(self) -> list[str]:
        """One letter per layer as written: upper case = dense FFN, lower case = MoE FFN."""
        return parse_layer_pattern(self.layer_pattern, self.num_layers, moe=self.moe_num_experts > 0)

    @property
    def mixer_kinds(self) -> list[str]:
        """The sequence mixer of each layer, upper case: T, W, F or R."""
        return [k.upper() for k in self.layer_kinds]

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_kinds) if kind.islower()]

    @property
    def rwkv_layer_ids(self) -> list[int]:
        return [i for i, kind in enumerate(self.mixer_kinds) if kind == "R"]

    @property
    def moe_config(self):
        """The hybrid.moe.MoEConfig every MoE layer is built with, or None when the pattern has no MoE layer."""
        if not self.moe_layer_ids:
            return None
        from hybrid.moe import MoEConfig

        return MoEConfig(**{inner: getattr(self, name) for name, inner in MOE_FIELDS.items()})

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_dims(self) -> int:
        """Head dims that RoPE rotates: rope_dims, or every head dim when rope_dims is 0."""
        return self.rope_dims or self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return round(self.mlp_mult * self.model_dim)

    @property
    def attn_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.mixer_kinds) if kind in "WF"]

    @property
    def xsa_layer_ids(self) -> list[int]:
        attn = self.attn_layers
        return attn[len(attn) - min(self.xsa_last, len(attn)):]

    @property
    def ve_layer_ids(self) -> list[int]:
        spec = self.ve_layers.strip().lower()
        if spec == "none":
            return []
        if spec == "":
            return self.attn_layers[-2:]
        return [int(s) for s in spec.split(",")]

    # ---- validation ----------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ValueError naming the offending field; called on construction."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "ve_dim",
                     "bigram_dim"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.moe_num_experts >= 0, f"moe_num_experts must be >= 0 (0 = no MoE), got {self.moe_num_experts}")
        self.layer_kinds  # raises its own ValueError (letters, length, lower case without experts)
        kinds = self.mixer_kinds
        need(self.model_dim % self.num_heads == 0,
             f"model_dim {self.model_dim} must be divisible by num_heads {self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads} (GQA)")
        need(self.rope_dims % 2 == 0 and 0 <= self.rope_dims <= self.head_dim and self.head_dim % 2 == 0,
             f"rope_dims must be 0 (all head dims) or even and in [2, head_dim={self.head_dim}] (head_dim "
             f"itself even), got {self.rope_dims}")
        need(self.rope_base > 0, f"rope_base must be positive, got {self.rope_base}")
        hidden = self.mlp_mult * self.model_dim
        need(hidden >= 1 and math.isclose(hidden, round(hidden)),
             f"mlp_mult * model_dim must be a positive whole number, got {self.mlp_mult} * {self.model_dim}")
        need(self.mlp_act in MLP_ACTIVATIONS, f"mlp_act must be one of {MLP_ACTIVATIONS}, got {self.mlp_act!r}")
        need(self.mlp_fused in MLP_FUSED_MODES, f"mlp_fused must be one of {MLP_FUSED_MODES}, got {self.mlp_fused!r}")
        need("W" not in kinds or self.attn_window >= 1,
             f"attn_window must be >= 1 when the pattern has W layers, got {self.attn_window}")
        need(self.token_mix in TOKEN_MIXES, f"token_mix must be one of {TOKEN_MIXES}, got {self.token_mix!r}")
        need(1 <= self.token_mix_kernel <= TOKEN_MIX_MAX_KERNEL,
             f"token_mix_kernel must be in [1, {TOKEN_MIX_MAX_KERNEL}], got {self.token_mix_kernel}")
        need(self.xsa_last >= 0, f"xsa_last must be >= 0, got {self.xsa_last}")
        need(self.bigram_buckets == 0 or self.bigram_buckets >= 2,
             f"bigram_buckets must be 0 (off) or >= 2 (bucket B-1 is reserved), got {self.bigram_buckets}")
        need(self.logit_softcap > 0, f"logit_softcap must be positive, got {self.logit_softcap}")
        need(self.tied_embed_init_std > 0, f"tied_embed_init_std must be positive, got {self.tied_embed_init_std}")
        spec = self.ve_layers.strip().lower()
        if spec not in ("", "none"):
            try:
                ids = [int(s) for s in spec.split(",")]
            except ValueError:
                raise ValueError(
                    f"ModelConfig: ve_layers must be '', 'none' or a comma list of layer indices, "
                    f"got {self.ve_layers!r}"
                ) from None
            need(len(set(ids)) == len(ids), f"ve_layers {self.ve_layers!r} repeats a layer")
            for i in ids:
                need(0 <= i < self.num_layers and kinds[i] in "WF",
                     f"ve_layers entry {i} is not an attention layer (W or F) of pattern "
                     f"{self.layer_pattern!r}; attention layers are {self.attn_layers}")
        self._validate_block_style(need)
        if self.rwkv_layer_ids:
            self._validate_rwkv(need)
        if self.moe_layer_ids:
            self._validate_moe()

    def _validate_block_style(self, need) -> None:
        need(self.block_style in BLOCK_STYLES, f"block_style must be one of {BLOCK_STYLES}, got {self.block_style!r}")
        if self.block_style == "rwkv":  # RWKV-7's own block: its rules live with it
            from hybrid.rwkv7 import check_rwkv_block_style

            check_rwkv_block_style(self, need)

    def _validate_rwkv(self, need) -> None:
        from hybrid.kernels.wkv7 import WKV7_IMPLS

        need(self.rwkv_head_size > 0 and self.model_dim % self.rwkv_head_size == 0,
             f"model_dim {self.model_dim} must be divisible by rwkv_head_size {self.rwkv_head_size} "
             f"(R layers: heads of rwkv_head_size channels)")
        need(1 <= self.rwkv_chunk <= RWKV_MAX_CHUNK,
             f"rwkv_chunk must be in [1, {RWKV_MAX_CHUNK}] (larger chunks overflow the fp32 decay factors), "
             f"got {self.rwkv_chunk}")
        need(self.rwkv_impl in WKV7_IMPLS, f"rwkv_impl must be one of {WKV7_IMPLS}, got {self.rwkv_impl!r}")
        need(self.rwkv_ffn in RWKV_FFNS, f"rwkv_ffn must be one of {RWKV_FFNS}, got {self.rwkv_ffn!r}")

    def _validate_moe(self) -> None:
        # The rules live in MoEConfig.validate alone; its message is rewritten into setting names.
        try:
            self.moe_config
        except ValueError as exc:
            inner = {v: k for k, v in MOE_FIELDS.items()}
            text = re.sub(r"\b(" + "|".join(inner) + r")\b", lambda m: inner[m.group(1)],
                          str(exc).removeprefix("MoEConfig: "))
            raise ValueError(f"ModelConfig: {text}") from None


_GPT_OVERRIDES = {
    # The baseline (rec:2026-03-17_NaiveBaseline): 9 x (512 wide, 8/4 heads, relu^2 MLP 2x), full RoPE,
    # U-Net skips, default init.
    "num_layers": 9,
    "mlp_mult": 2.0,
    "mlp_act": "relu2",
    "layer_pattern": "F" * 9,
    "rope_dims": 0,  # full RoPE over all 64 head dims; 0 keeps it full if the width changes
    "qk_norm_gain": False,
    "qk_gain_init": 1.5,  # the baseline's value
    "xsa_last": 0,
    "ve_layers": "none",
    "smear": False,
    "bigram_buckets": 0,
    "ln_scale": False,
    "unet_skips": True,
    "ortho_init": False,
}

# `--arch rwkv7` = RWKV7_PRESETS["golf"] (hybrid/rwkv7.py) as HybridGPT fields: pure RWKV-7 (pre-LN
# blocks, channel-mix FFN 2.5x, 8 heads of 64, tied embedding with RWKV7LM's tied init, softcap 30),
# every hybrid extra off. Same parameters as RWKV7LM(**RWKV7_PRESETS["golf"]): 21,804,544; measured
# pack after 60 CPU steps 15,630,854 model + 82,227 code bytes = 15,713,081 (docs/PERF.md).
# Written out rather than imported so that other runs do not load hybrid/rwkv7.py;
# tests/test_arch_integration.py checks it against the preset.
_RWKV7_OVERRIDES = {
    "vocab_size": 1024, "num_layers": 8, "model_dim": 512, "mlp_mult": 2.5, "layer_pattern": "R" * 8,
    "block_style": "rwkv", "rwkv_head_size": 64, "rwkv_ffn": "cmix", "logit_softcap": 30.0,
    "tied_embed_init_std": 0.005,
    "xsa_last": 0, "ve_layers": "none", "smear": False, "bigram_buckets": 0, "ln_scale": False,
    "unet_skips": False,
}

# `--arch moe` = MOE_PRESETS["golf"]'s FFNs (hybrid/moe_presets.py: dense leaky-relu² 3x in layer 0; one
# shared expert of 256 + 4 routed experts of 192, top-1, sigmoid router with bias balancing, aux 1e-4 per
# sequence, z-loss 1e-3, in layers 1-10) on the hybrid's mixers: token shift with windowed attention every
# third layer and full attention last, "TTTWTTWTTWF" (the published hybrid's rhythm, golf PR #1007, at 11
# layers), smear and XSA on the 4 attention layers. Pattern "Tttwttwttwf": 21,284,896 params, 15,386,656
# active per token. Sized by a measured pack, not an estimate: after 60 CPU training steps the int6 zlib
# artifact was 15,235,774 + 71,084 code = 15,306,858 bytes (docs/PERF.md); the first draft (routed 256, shared
# 384: 25.2M params) would have been ≈ 17.9 MB at the measured ~0.71 byte/param. BigramHash and VE are off for
# the same reason. Written out like _RWKV7_OVERRIDES (same test).
_MOE_OVERRIDES = {
    "vocab_size": 1024, "num_layers": 11, "model_dim": 512, "num_heads": 8, "num_kv_heads": 4,
    "layer_pattern": "Tttwttwttwf", "mlp_mult": 3.0, "mlp_act": "leaky_relu2",
    "moe_num_experts": 4, "moe_top_k": 1, "moe_expert_hidden": 192, "moe_shared_experts": 1,
    "moe_shared_hidden": 256, "moe_shared_gate": False, "moe_router": "sigmoid", "moe_norm_topk": False,
    "moe_routed_scale": 1.0, "moe_aux_coef": 1e-4, "moe_balance_loss": "sequence", "moe_z_coef": 1e-3,
    "moe_bias_balancing": True, "moe_bias_rate": 1e-3, "moe_act": "leaky_relu2", "moe_dispatch": "auto",
    "bigram_buckets": 0, "ve_layers": "none",
    "qk_gain_init": 1.5,  # as fitted and measured (docs/PERF.md); not re-tuned since
    "token_mix": "shift", "xsa_last": 4,  # its mixers as fitted and measured, not the hybrid's later default
}

ARCH_DEFAULTS: dict[str, dict] = {
    "hybrid": asdict(ModelConfig()),
    "gpt": {**asdict(ModelConfig()), **_GPT_OVERRIDES},
    "rwkv7": {**asdict(ModelConfig()), **_RWKV7_OVERRIDES},
    "moe": {**asdict(ModelConfig()), **_MOE_OVERRIDES},
}


def with_model_settings(cls):
    """`cls`, a dataclass of run settings (train_gpt.Hyperparameters), extended by one field per
    ModelConfig field with the same name, type and help: the trainer's model settings, declared
    only in ModelConfig. Their default None stands for the arch's default (ARCH_DEFAULTS);
    `model_config_from` fills it in, and the trainer stores the resolved values back."""
    extra = [(f.name, f.type, field(default=None, metadata=f.metadata)) for f in fields(ModelConfig)]
    out = make_dataclass(cls.__name__, extra, bases=(cls,))
    out.__module__, out.__qualname__, out.__doc__ = cls.__module__, cls.__qualname__, cls.__doc__
    return out


def _unset(value) -> bool:
    """Not given: None (the trainer's unset model settings); "" or a negative number in the hparams
    of runs logged before the settings were declared once (2026-12-01), which used those marks."""
    return value is None or value == "" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0)


# Defaults that changed after runs were saved. Issue 11 (2026-12-02) made the T mixer "conv" and turned
# the hybrid's XSA off; every run before ran "shift" (all archs) and XSA on the last 4 attention layers
# (the hybrid; the others pin xsa_last). A saved run's settings lack such a field, or hold the old unset
# mark, so they must be read with the former value, or an old log, checkpoint or record would rebuild a
# model other than the one it holds.
FORMER_DEFAULTS: dict[str, dict] = {arch: {"token_mix": "shift"} for arch in ("hybrid", "gpt", "rwkv7", "moe")}
FORMER_DEFAULTS["hybrid"]["xsa_last"] = 4


def as_saved(values: dict) -> dict:
    """`values` (a saved run's hparams, or a logged model_config, which holds no "arch" and is read as
    the hybrid's) with each field whose default has changed since (FORMER_DEFAULTS of its arch) set to
    the former default where it is missing or unset."""
    out = dict(values)
    for name, former in FORMER_DEFAULTS.get(str(values.get("arch", "hybrid")), {}).items():
        if _unset(out.get(name)):
            out[name] = former
    return out


def model_config_from(arch: str, values: dict) -> ModelConfig:
    """The ModelConfig of an `arch` run whose settings are `values` (train_gpt.Hyperparameters as a
    dict, or the hparams a log or checkpoint saved): the arch's defaults, then every model field that
    is set. The one place the trainer, `records merge` and `records verify` turn settings into a model."""
    if arch not in ARCH_DEFAULTS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCH_DEFAULTS)}")
    base = dict(ARCH_DEFAULTS[arch])
    for f in fields(ModelConfig):
        value = values.get(f.name)
        if not _unset(value):
            base[f.name] = bool(value) if isinstance(f.default, bool) else value
    return ModelConfig(**base)
