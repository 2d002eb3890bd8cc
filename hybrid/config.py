"""Model configuration: one dataclass, the layer-pattern grammar, and the two named architectures.

`ModelConfig()` is the project's hybrid (token-shift + short-window attention, TECHNIQUES.md §1);
`ModelConfig(**ARCH_DEFAULTS["gpt"])` is the challenge's naive baseline (GOLF.md §3.3), which must
have exactly 17,059,912 parameters. Every field is validated on construction (`__post_init__`), so a
bad env override fails before any tensor is allocated, with a message that names the field.

Layer pattern: one letter per layer, written out at full length (no tiling), e.g. "TTTWTTWTTWTF":
  T  token-shift mixer (one-token lookback, no attention)       TECHNIQUES.md §1.4
  W  causal attention over a sliding window of `attn_window` tokens (the query and the w-1 before it)
  F  full causal attention
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

LAYER_KINDS = {
    "T": "token-shift mixer",
    "W": "sliding-window causal attention",
    "F": "full causal attention",
}
MLP_ACTIVATIONS = ("leaky_relu2", "relu2")


def parse_layer_pattern(pattern: str, num_layers: int) -> list[str]:
    """"TTWF" -> ["T", "T", "W", "F"]; ValueError (naming the allowed letters and both lengths) otherwise."""
    allowed = ", ".join(f"{k} = {v}" for k, v in LAYER_KINDS.items())
    bad = sorted({c for c in pattern if c not in LAYER_KINDS})
    if bad:
        raise ValueError(
            f"layer_pattern {pattern!r} contains invalid letter(s) {bad}; allowed letters: {allowed}"
        )
    if len(pattern) != num_layers:
        raise ValueError(
            f"layer_pattern {pattern!r} has {len(pattern)} letters but num_layers is {num_layers}; "
            f"write one letter per layer ({allowed})"
        )
    return list(pattern)


@dataclass
class ModelConfig:
    """Shape and feature switches of `HybridGPT`. Defaults are the hybrid; see ARCH_DEFAULTS["gpt"]."""

    vocab_size: int = 1024
    num_layers: int = 12
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    # MLP hidden width = mlp_mult * model_dim, which must be a whole number: we never round, so the
    # parameter count is exactly what the multiplier says (2.0 -> 1024, 2.5 -> 1280, 3.0 -> 1536).
    mlp_mult: float = 3.0
    mlp_act: str = "leaky_relu2"  # leaky_relu(x, 0.5)**2, golf PR #493; "relu2" = the baseline's relu(x)**2
    layer_pattern: str = "TTTWTTWTTWTF"
    attn_window: int = 128  # W layers: each query sees exactly the last 128 tokens, itself included
    rope_dims: int = 16  # partial RoPE on the first 16 of 64 head dims, golf PR #315; 0 = all head dims
    rope_base: float = 10000.0
    qk_gain_init: float = 1.5  # baseline value
    # Learned per-dim gain after the q/k RMS norm (the project issue's "q/k RMS norm with learned
    # gain"). Neither the baseline nor the published hybrid has it, so "gpt" turns it off.
    qk_norm_gain: bool = True
    xsa_last: int = 4  # XSA on the last N attention (W or F) layers; 0 = off; N > #attention = all
    ve_layers: str = ""  # "" = the last 2 attention layers, "none" = off, or "9,11"
    ve_dim: int = 128
    smear: bool = True
    bigram_buckets: int = 2048  # 0 = off
    bigram_dim: int = 128
    ln_scale: bool = True  # scale block i's normed inputs by 1/sqrt(i+1), golf PR #315
    unet_skips: bool = False  # the hybrid README: removing them helped
    logit_softcap: float = 30.0
    tied_embed_init_std: float = 0.005
    ortho_init: bool = True

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived shapes ------------------------------------------------------------------------

    @property
    def layer_kinds(self) -> list[str]:
        return parse_layer_pattern(self.layer_pattern, self.num_layers)

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
        return [i for i, kind in enumerate(self.layer_kinds) if kind in "WF"]

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
        kinds = self.layer_kinds  # raises its own ValueError
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
        need("W" not in kinds or self.attn_window >= 1,
             f"attn_window must be >= 1 when the pattern has W layers, got {self.attn_window}")
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


_GPT_OVERRIDES = {
    # GOLF.md §3.3: 9 x (512 wide, 8/4 heads, relu^2 MLP 2x), full RoPE, U-Net skips, default init.
    "num_layers": 9,
    "mlp_mult": 2.0,
    "mlp_act": "relu2",
    "layer_pattern": "F" * 9,
    "rope_dims": 0,  # full RoPE over all 64 head dims; 0 keeps it full if the width changes
    "qk_norm_gain": False,
    "xsa_last": 0,
    "ve_layers": "none",
    "smear": False,
    "bigram_buckets": 0,
    "ln_scale": False,
    "unet_skips": True,
    "ortho_init": False,
}

ARCH_DEFAULTS: dict[str, dict] = {
    "hybrid": asdict(ModelConfig()),
    "gpt": {**asdict(ModelConfig()), **_GPT_OVERRIDES},
}
