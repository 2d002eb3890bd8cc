"""Late QAT switch: point each quantizable linear at the export grid, or back at plain weights.

A module takes part if it has an int attribute `qat_bits` (duck typing; hybrid's `CastedLinear`
has one and, when it is > 0, runs its weight through `quant.int6.fake_quant(w, qat_bits, ...)`). The bit
width comes from the same precision policy the exporter uses, called with the state-dict name of the
module's weight (or, for a handle like RWKV-7's LoRA factors, the name its `qat_tensor_name(module
name)` returns), so the grid trained against is the grid written to the artifact.

Setting an int attribute (rather than a class-level flag) matters under torch.compile: dynamo guards
on module attributes, so the switch costs one recompile instead of being constant-folded away (the
failure of rec:2026-03-21's late QAT; docs/TECHNIQUES.md, "Late QAT").
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

# Prefixes that torch.compile (OptimizedModule) and DDP add to module names; the state dict the
# exporter sees has neither, so they are dropped before asking the policy.
WRAPPER_PREFIXES: tuple[str, ...] = ("_orig_mod.", "module.")


def _plain_name(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def set_qat(model: nn.Module, enabled: bool, precision_fn: Callable[[str, Tensor], tuple]) -> int:
    """Set `qat_bits` (and `qat_clip`, `qat_sd_k`: the export's row-scale rule) on every module
    that has `qat_bits`; returns how many now fake-quantize (bits > 0).

    With `enabled`, a module gets the policy's bits when its weight is stored as "int", else 0.
    With `enabled=False` every such module is reset to 0 (and 0 is returned).
    """
    switched_on = 0
    for name, module in model.named_modules():
        if not hasattr(module, "qat_bits"):
            continue
        bits, clip, sd_k = 0, "mse", 0.0
        weight = getattr(module, "weight", None)
        if enabled and isinstance(weight, Tensor):
            name = _plain_name(name)
            if hasattr(module, "qat_tensor_name"):  # a handle for a tensor stored under another name
                weight_name = module.qat_tensor_name(name)
            else:
                weight_name = f"{name}.weight" if name not in ("", "_orig_mod", "module") else "weight"
            precision = precision_fn(weight_name, weight)
            if precision[0] == "int":
                bits = int(precision[1])
                # the row-scale rule too (quant.policy.Precision.clip / sd_k), when the policy has one
                clip = getattr(precision, "clip", "mse")
                sd_k = float(getattr(precision, "sd_k", 0.0))
        module.qat_bits = bits
        module.qat_clip, module.qat_sd_k = clip, sd_k
        switched_on += bits > 0
    return switched_on
