"""quant/fit.py: the budget fit at export, on tiny state dicts and a tiny HybridGPT, on CPU."""
from __future__ import annotations

import math

import pytest
import torch

from quant.artifact import pack_model, unpack_model
from quant.fit import BudgetError, _search, fit_to_budget
from quant.int6 import dequantize_rows, quantize_rows
from quant.policy import FP32, Precision, make_precision_fn
from conftest import randomize_

LIMIT = 16_000_000
SDCLIP = make_precision_fn(6, 8, clip="sdclip", sd_k_matrix=12.85, sd_k_embed=20.0)


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two int6 block matrices (mlp, attn), an int8 embedding table and fp32 vectors."""
    g = torch.Generator().manual_seed(seed)
    return {
        "tok_emb.weight": torch.randn(64, 96, generator=g) * 0.05,
        "blocks.0.mlp.fc.weight": torch.randn(128, 96, generator=g) * 0.03,
        "blocks.0.mixer.c_q.weight": torch.randn(96, 96, generator=g) * 0.03,
        "blocks.0.attn_scale": torch.randn(96, generator=g),
    }


def grid_values(blob: bytes, name: str, scale: torch.Tensor) -> torch.Tensor:
    """The int values of `name` in an artifact, from its reloaded weights and known row scales."""
    w = unpack_model(blob)[name].float()
    q = w / scale.float().unsqueeze(1)
    assert torch.equal(q, q.round()), name
    return q.round().to(torch.int8)


@pytest.mark.parametrize("clip", ["sdclip", "mse"])
def test_over_budget_prunes_to_fit_and_reports(clip):
    fn = SDCLIP if clip == "sdclip" else make_precision_fn(6, 8)
    sd = small_state()
    before = len(pack_model(sd, fn))
    code = LIMIT - before + 100  # 100 bytes over
    blob, rep = fit_to_budget(sd, fn, code_bytes=code, resolution=1)
    assert code + len(blob) <= LIMIT
    assert not rep.fits_before and rep.bytes_before == before and rep.bytes_after == len(blob)
    assert rep.margin == LIMIT - code - len(blob) >= 0
    assert 0 < rep.pruned < rep.candidates and rep.resolution == 1 and rep.packs == len(rep.probes) <= 16
    # the smallest fitting count: one fewer pruned value was packed and did not fit
    sizes = dict(rep.probes)
    assert sizes[rep.pruned] == len(blob) and code + sizes[rep.pruned - 1] > LIMIT
    # only block matrices: the embedding table and the fp32 vector come back as pack_model stores them,
    # and the matrices differ from pack_model's values only where a ±1 became 0
    plain, fitted = unpack_model(pack_model(sd, fn)), unpack_model(blob)
    for name in ("tok_emb.weight", "blocks.0.attn_scale"):
        assert torch.equal(plain[name], fitted[name]), name
    changed = 0
    for name in rep.per_tensor:
        scale = quantize_rows(sd[name], 6, clip, 12.85 if clip == "sdclip" else None)[1].float().unsqueeze(1)
        cut = plain[name] != fitted[name]
        assert bool((fitted[name][cut] == 0).all()), name
        assert torch.equal((plain[name] / scale)[cut].abs(), torch.ones(int(cut.sum()))), name
        changed += int(cut.sum())
    assert changed == rep.pruned
    assert set(rep.per_tensor) == {"blocks.0.mlp.fc.weight", "blocks.0.mixer.c_q.weight"}
    assert sum(n for n, _ in rep.per_tensor.values()) == rep.pruned
    assert sum(m for _, m in rep.per_tensor.values()) == rep.candidates
    lines = rep.lines()
    assert lines[0].startswith("budget_fit: ")
    for key in ("fits_before:0", f"bytes_before:{before}", f"bytes_after:{len(blob)}", f"pruned:{rep.pruned}",
                f"candidates:{rep.candidates}", f"margin:{rep.margin}", f"packs:{rep.packs}", "hessian_tensors:0/2"):
        assert key in lines[0].split(), key
    assert all(line.startswith("budget_fit_tensor:blocks.0.") for line in lines[1:]) and len(lines) >= 2


@pytest.mark.parametrize("bitpack", [False, True])
def test_under_budget_is_pack_model_byte_for_byte(bitpack):
    sd = small_state(1)
    name = "blocks.0.mlp.fc.weight"
    q, s = quantize_rows(sd[name], 6, "sdclip", 12.85)
    given = {name: (torch.flip(q, dims=[1]), s)}  # prequantized values unlike the rounding's
    ref = pack_model(sd, SDCLIP, compressor="zlib", bitpack=bitpack, prequantized=given)
    blob, rep = fit_to_budget(sd, SDCLIP, code_bytes=LIMIT - len(ref), compressor="zlib", bitpack=bitpack,
                              prequantized=given)
    assert blob == ref  # exactly at the limit still fits
    assert rep.fits_before and rep.pruned == 0 and rep.packs == 1 and rep.margin == 0 and rep.candidates is None
    assert rep.lines() == [f"budget_fit: fits_before:1 bytes_before:{len(ref)} bytes_after:{len(ref)} "
                           f"code_bytes:{LIMIT - len(ref)} limit:{LIMIT} margin:0 pruned:0 packs:1 "
                           f"time:{1000 * rep.seconds:.0f}ms"]


def test_round_trip_of_a_fitted_hybrid_with_gptq_hessians():
    from hybrid.config import ModelConfig
    from hybrid.model import HybridGPT
    from quant.gptq import collect_hessians, generate_calibration, gptq_quantize

    cfg = ModelConfig(vocab_size=64, num_layers=4, layer_pattern="TWTF", model_dim=128, num_heads=2,
                      num_kv_heads=1, attn_window=16, mlp_mult=2.0, bigram_buckets=64)
    torch.manual_seed(0)
    model = randomize_(HybridGPT(cfg), std=0.05, seed=0)
    sd = model.state_dict()
    calib = generate_calibration(model, num_seqs=2, seq_len=80, seed=1, batch_size=2)
    diag: dict = {}
    quantized, method = gptq_quantize(model, calib, SDCLIP, batch_size=2, hessian_diag=diag)
    # gptq records diag(H) of exactly the tensors it ran on, before damping
    assert set(diag) == {n for n, m in method.items() if m == "gptq"} and len(diag) >= 20
    assert method["blocks.3.mlp.proj.weight"].startswith("rtn")  # 160 calibration rows < 256 inputs
    linear = dict(model.named_modules())["blocks.3.mixer.c_q"]
    [(h, n)] = collect_hessians(model, calib, {"x": linear}, batch_size=2).values()
    assert n == 160 and torch.allclose(diag["blocks.3.mixer.c_q.weight"], h.diagonal(), rtol=1e-5, atol=0)
    assert all(d.dtype == torch.float32 and d.device.type == "cpu" for d in diag.values())

    before = len(pack_model(sd, SDCLIP, prequantized=quantized))
    code = LIMIT - before + 2000
    blob, rep = fit_to_budget(sd, SDCLIP, code_bytes=code, prequantized=quantized, hessian_diag=diag)
    assert code + len(blob) <= LIMIT and rep.pruned > 0
    assert rep.hessian_tensors == sum(n in diag for n in rep.per_tensor) == len(rep.per_tensor) - 4  # mlp.proj: no H
    assert not any(".table." in n or n.startswith("tok_emb") for n in rep.per_tensor)  # embeddings stay
    fresh = HybridGPT(cfg)
    fresh.load_state_dict(unpack_model(blob), strict=True)
    reloaded = fresh.state_dict()
    changed = 0
    for name, (q, s) in quantized.items():
        qq = grid_values(blob, name, s)
        cut = qq != q
        assert bool((qq[cut] == 0).all() and (q[cut].abs() == 1).all()), name  # only ±1 -> 0
        pruned = torch.where(cut, torch.zeros_like(q), q)
        assert torch.equal(reloaded[name], dequantize_rows(pruned, s, dtype=sd[name].dtype)), name
        assert int(cut.sum()) == rep.per_tensor.get(name, (0, 0))[0], name
        changed += int(cut.sum())
    assert changed == rep.pruned
    for name, t in sd.items():  # everything else is what pack_model alone stores
        if name not in quantized:
            assert torch.equal(reloaded[name], unpack_model(pack_model(sd, SDCLIP))[name]), name


def test_pruning_follows_the_cost_order():
    """Hand-built q, scales and Hessian diagonals: the zeroed entries are exactly the `pruned`
    cheapest ±1 entries by s_r²·H_cc (H_cc = 1 for the tensor without a diagonal), ties in
    state-dict order, then row-major."""
    g = torch.Generator().manual_seed(3)

    def prec(name, t):
        return Precision("int", 6) if t.ndim == 2 else FP32

    quantized, hdiag, sd = {}, {}, {}
    for name, rows, cols in (("blocks.0.mlp.fc.weight", 24, 40), ("blocks.0.mixer.c_k.weight", 16, 48)):
        q = torch.clamp(torch.round(torch.randn(rows, cols, generator=g) * 2.5), -31, 31).to(torch.int8)
        s = (0.01 + 0.02 * torch.rand(rows, generator=g)).to(torch.float16)
        quantized[name] = (q, s)
        sd[name] = dequantize_rows(q, s)
    hdiag["blocks.0.mlp.fc.weight"] = torch.rand(40, generator=g) * 3
    sd["norm.gain"] = torch.ones(8)
    cost, tie = {}, {}
    for i, (name, (q, s)) in enumerate(quantized.items()):
        for r in range(q.shape[0]):
            for c in range(q.shape[1]):
                if abs(int(q[r, c])) == 1:
                    h = float(hdiag[name][c]) if name in hdiag else 1.0
                    cost[name, r, c] = float(s[r]) ** 2 * h
                    tie[name, r, c] = (cost[name, r, c], i, r * q.shape[1] + c)
    assert len(cost) > 300 and len(set(cost.values())) > 200  # ties: only within a row of the tensor without H
    before = len(pack_model(sd, prec, prequantized=quantized))
    code = LIMIT - before + 60
    blob, rep = fit_to_budget(sd, prec, code_bytes=code, prequantized=quantized, hessian_diag=hdiag, resolution=1)
    assert code + len(blob) <= LIMIT and 0 < rep.pruned < len(cost) == rep.candidates
    zeroed = set()
    for name, (q, s) in quantized.items():
        qq = grid_values(blob, name, s)
        zeroed |= {(name, int(r), int(c)) for r, c in (qq != q).nonzero().tolist()}
    cheapest = set(sorted(cost, key=tie.get)[:rep.pruned])
    assert zeroed == cheapest
    assert rep.cost_max == pytest.approx(max(cost[k] for k in cheapest))
    assert rep.cost_sum == pytest.approx(sum(cost[k] for k in cheapest))


def test_impossible_budget_raises_with_the_shortfall():
    sd = small_state(2)
    before = len(pack_model(sd, SDCLIP))
    code = LIMIT - before // 2  # half the model would have to go
    with pytest.raises(BudgetError) as info:
        fit_to_budget(sd, SDCLIP, code_bytes=code)
    err = info.value
    rep = err.report
    total = rep.candidates
    all_pruned = dict(rep.probes)[total]  # pruning every candidate was packed, and did not fit
    assert err.over_by == code + all_pruned - LIMIT > 0
    msg = str(err)
    for part in (f"{err.over_by} bytes over", f"all {total} ±1", "SD_K_MATRIX", "MLP_MULT", "COMPRESSOR=brotli"):
        assert part in msg, part
    assert rep.packs <= 4  # the size model sees the shortfall and jumps to everything at once


@pytest.mark.parametrize("curve", ["convex", "linear", "steps"])
def test_search_finds_the_boundary_in_few_packs(curve):
    """_search on synthetic sizes (no packing), with a savings model that is off by 2x: the bracket
    closes to the resolution, hi fits and lo does not, within the pack limit."""
    total, size0, res = 10_000_000, 14_000_000, 1000
    saved = {"convex": lambda k: 0.04 * k + 0.3e-7 * k * k, "linear": lambda k: 0.08 * k,
             "steps": lambda k: 0.05 * k + 40 * math.sin(k / 900.0)}[curve]
    for over in (20_000, 400_000):
        target = size0 - over
        calls = []

        def size_at(k):
            calls.append(k)
            return size0 - int(saved(k))

        hi, lo = _search(size_at, total, target, size0, res, 16, lambda k: 0.02 * k)
        assert len(calls) <= 12, (curve, over, calls)
        assert hi is not None and 0 < hi - lo <= res
        assert size_at(hi) <= target < (size0 if lo == 0 else size_at(lo))
