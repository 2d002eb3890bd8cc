"""`python -m records merge CKPT_A CKPT_B … --weights 0.7 0.3`: linear merge of checkpoints.

Mergekit's `linear` method: every floating-point tensor of the model (and of the EMA, when every
checkpoint has one) becomes Σ w_i · t_i, computed in float64 and cast back to the tensor's dtype.
Integer/bool buffers must be equal across the checkpoints. The checkpoints must be one architecture:
the model configs their hyperparameters resolve to must be equal, and so must the state dicts' keys
and shapes; otherwise a MergeError names the differing key. The weights must sum to 1 (within 1e-6)
unless `--no-normalize`.

The output is a training checkpoint (hybrid/training/checkpoint.py format: RESUME, bench/size.py) whose
optimizer state, loader position and step are the first checkpoint's; `merge` records the sources
and weights. `--pack` also writes an artifact of the merged export weights (EMA if present, as the
trainer exports).
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch


class MergeError(ValueError):
    pass


def _model_config(hparams: dict, source) -> dict:
    from hybrid.config import as_saved, model_config_from  # the trainer's own rule, without importing it

    try:
        return asdict(model_config_from(str(hparams.get("arch", "hybrid")), as_saved(hparams)))
    except (TypeError, ValueError, KeyError) as exc:
        raise MergeError(f"{source}: hyperparameters do not give a model config: {exc}") from None


def _merge_dicts(dicts: list[dict], weights: list[float], what: str, paths: list) -> dict:
    first = dicts[0]
    for d, p in zip(dicts[1:], paths[1:]):
        if set(d) != set(first):
            key = sorted(set(d) ^ set(first))[0]
            raise MergeError(f"{what}: key {key!r} is in only one of {paths[0]} and {p}")
        for k, t in first.items():
            if tuple(d[k].shape) != tuple(t.shape) or d[k].dtype != t.dtype:
                raise MergeError(f"{what}: key {k!r} is {tuple(t.shape)} {t.dtype} in {paths[0]} but "
                                 f"{tuple(d[k].shape)} {d[k].dtype} in {p}")
    out = {}
    for k, t in first.items():
        if t.is_floating_point():
            acc = torch.zeros(t.shape, dtype=torch.float64)
            for d, w in zip(dicts, weights):
                acc += w * d[k].detach().to("cpu", torch.float64)
            out[k] = acc.to(t.dtype)
        else:
            for d, p in zip(dicts[1:], paths[1:]):
                if not torch.equal(d[k].cpu(), t.cpu()):
                    raise MergeError(f"{what}: non-float tensor {k!r} differs between {paths[0]} and {p}")
            out[k] = t.detach().cpu().clone()
    return out


def merge_checkpoints(paths: list, weights: list[float], normalize: bool = True) -> dict:
    from hybrid.training.checkpoint import load_checkpoint

    if len(paths) < 2:
        raise MergeError("merge needs at least two checkpoints")
    if len(weights) != len(paths):
        raise MergeError(f"{len(paths)} checkpoints but {len(weights)} weights")
    if normalize and abs(sum(weights) - 1.0) > 1e-6:
        raise MergeError(f"weights {weights} sum to {sum(weights):.6g}, not 1 (pass --no-normalize to allow it)")
    states = [load_checkpoint(p) for p in paths]
    cfg0 = _model_config(states[0]["hparams"], paths[0])
    for s, p in zip(states[1:], paths[1:]):
        cfg = _model_config(s["hparams"], p)
        for k in cfg0:
            if cfg[k] != cfg0[k]:
                raise MergeError(f"architectures differ: model config {k!r} is {cfg0[k]!r} in {paths[0]} "
                                 f"but {cfg[k]!r} in {p}")
    merged = dict(states[0])
    merged["model"] = _merge_dicts([s["model"] for s in states], weights, "model", paths)
    emas = [s.get("ema") for s in states]
    if all(e is not None for e in emas):
        merged["ema"] = _merge_dicts(emas, weights, "ema", paths)
    elif any(e is not None for e in emas):
        raise MergeError("only some checkpoints have EMA weights; merge checkpoints of one recipe")
    merged["merge"] = {"sources": [str(p) for p in paths], "weights": [float(w) for w in weights]}
    return merged


def export_weights(ckpt: dict) -> dict:
    """The weights the trainer would pack: the model with its EMA copied in."""
    sd = dict(ckpt["model"])
    for k, t in (ckpt.get("ema") or {}).items():
        sd[k] = t.to(sd[k].dtype)
    return sd


def save_merged(ckpt: dict, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, out)
    return out


def pack_merged(ckpt: dict, path, compressor: str = "zlib") -> int:
    from quant.artifact import pack_model, write_artifact
    from quant.policy import make_precision_fn

    hp = ckpt["hparams"]
    fn = make_precision_fn(int(hp.get("matrix_bits", 6)), int(hp.get("embed_bits", 8)))
    return write_artifact(path, pack_model(export_weights(ckpt), fn, compressor=compressor,
                                           bitpack=bool(hp.get("bitpack", 0))))
