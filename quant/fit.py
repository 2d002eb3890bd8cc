"""Budget fit at export: prune the cheapest ±1 int values until code + model bytes fit the limit.

How this works
--------------
`fit_to_budget` first packs exactly as `pack_model` would. If code_bytes + that artifact fit the limit
(quant/budget.py ARTIFACT_LIMIT), it returns that blob unchanged. Otherwise it gives up the least
accuracy it can, like the golf records' selective pruning:

- candidates: every int value equal to ±1 in the int tensors of the block matrices (every int
  group but "embed"). Embedding tables are left alone by default (`include_embeddings`): the tied
  table is both the input lookup and the output head, has no GPTQ Hessian to rank its entries, and
  is int8 (its ±1 are already tiny); the records prune block matrices only.
- cost of zeroing entry (r, c) of a weight with fp16 row scale s_r: s_r² · H_cc, with H = XᵀX/N the
  GPTQ Hessian of the layer's inputs (`hessian_diag[name]` = diag H, before damping). That is the
  layer-output error the pruning itself adds, ||X δᵀ||²/N for δ = the one changed entry; cross terms
  with the rounding error and with other pruned entries are ignored (as in the records). A tensor
  without a Hessian gets H_cc = 1, i.e. the plain squared weight error s_r², which is the same
  thing for inputs of unit mean square (RMS-normed). An input dead on the calibration set
  (H_cc = 0) costs 0 and goes first.
- candidates are zeroed in order of increasing cost (ties: state-dict order, then row-major), and
  the count k is searched on the REAL packed size: every probe is a full `pack_model` call with the
  same compressor, bitpack and level, every int tensor passed as `prequantized` (the given q, or
  quant/int6.py's `quantize_rows` with the tensor's bits/clip/sd_k exactly as pack_model rounds it),
  with the first k candidates zeroed. The returned blob is the fitting probe itself.
- the search keeps a bracket lo < hi (lo: packed and over, hi: packed and fitting) and stops when
  hi - lo <= `resolution` (default max(1, candidates // 10000)): the smallest fitting count then lies
  in (lo, hi], and hi is returned (exactly the smallest with resolution=1, where size falls with k).
  Packs are few: 5-7 with pack 0 on a full-size model (docs/ARTIFACT.md "Budget fit"), at most
  `max_packs` once bracketed. The size is modelled as linear in u(k), the drop of the order-0
  entropy of each int section's values (which the compressors track closely, docs/ARTIFACT.md §9)
  scaled by that section's packed/entropy ratio in pack 0; the first probe extrapolates from pack 0
  and aims 5% past, then regula falsi in u between the bracket ends (Illinois rule), each probe
  nudged half a resolution toward the farther end so that it can close the bracket, with a
  bisection after 3 probes that did not halve it.
- if even pruning every candidate does not fit, `BudgetError` says by how many bytes and what to
  change.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from quant.artifact import artifact_sections, pack_model
from quant.budget import ARTIFACT_LIMIT
from quant.int6 import qmax
from quant.policy import quantize_precision, tensor_group


class BudgetError(ValueError):
    """The artifact cannot fit the limit even with every candidate pruned: `over_by` bytes too many;
    `report` is the FitReport of the packs made."""

    def __init__(self, message: str, over_by: int, report: FitReport | None = None):
        super().__init__(message)
        self.over_by, self.report = over_by, report


@dataclass
class FitReport:
    """What the fit did. bytes_* are model (artifact) bytes; margin = limit - code_bytes - bytes_after.
    candidates is None when the first pack fit (nothing was counted). The smallest fitting count lies
    in (pruned - resolution, pruned]. per_tensor: name -> (pruned, candidates) of every candidate
    tensor. probes: (pruned count, model bytes) of every pack, in order."""

    fits_before: bool
    bytes_before: int
    bytes_after: int
    code_bytes: int
    limit: int
    candidates: int | None = None
    pruned: int = 0
    resolution: int = 0
    packs: int = 1
    seconds: float = 0.0
    cost_sum: float = 0.0  # Σ s²·H_cc over the pruned entries
    cost_max: float = 0.0  # the largest pruned cost (the threshold)
    hessian_tensors: int = 0  # candidate tensors ranked with a Hessian diagonal
    per_tensor: dict[str, tuple[int, int]] = field(default_factory=dict)
    probes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def margin(self) -> int:
        return self.limit - self.code_bytes - self.bytes_after

    def lines(self) -> list[str]:
        """`key:value` log lines: one summary, then `budget_fit_tensor:` per tensor with pruned values."""
        line = (f"budget_fit: fits_before:{int(self.fits_before)} bytes_before:{self.bytes_before} "
                f"bytes_after:{self.bytes_after} code_bytes:{self.code_bytes} limit:{self.limit} "
                f"margin:{self.margin} pruned:{self.pruned}")
        if self.candidates is not None:
            line += (f" candidates:{self.candidates} resolution:{self.resolution} cost_sum:{self.cost_sum:.6g} "
                     f"cost_max:{self.cost_max:.6g} hessian_tensors:{self.hessian_tensors}/{len(self.per_tensor)}")
        out = [line + f" packs:{self.packs} time:{1000 * self.seconds:.0f}ms"]
        out += [f"budget_fit_tensor:{name} pruned:{n} candidates:{m}" for name, (n, m) in self.per_tensor.items() if n]
        return out


# ----------------------------------------------------------------------------- candidates

def quantize_int_tensors(state_dict: dict[str, Tensor], precision_fn: Callable,
                         prequantized: dict | None = None) -> dict[str, tuple[Tensor, Tensor, object]]:
    """{name: (q int8, scale fp16, precision)} of every int-precision tensor, exactly the values
    pack_model stores: the given prequantized pair, else quantize_rows with the precision's clip."""
    prequantized = prequantized or {}
    out = {}
    for name, tensor in state_dict.items():
        t = tensor.detach().cpu().contiguous()
        p = precision_fn(name, t)
        if p[0] != "int":
            continue
        if name in prequantized:
            q, s = (x.detach().cpu() for x in prequantized[name])
            q = q.to(torch.int8).contiguous()
        else:
            q, s = quantize_precision(t, p)  # as quant/artifact.py _encode
        out[name] = (q, s, p)
    return out


@dataclass
class _Plan:
    """Candidates in cost order: per tensor its ±1 flat positions and their ranks in the global order."""

    names: list[str]
    positions: list[Tensor]  # int64 flat indices of the ±1 entries, per tensor
    ranks: list[Tensor]  # int64 rank of each of those entries in the cost order
    sorted_cost: Tensor  # float64 [M], ascending
    hessian_tensors: int
    classes: list[tuple[str, int, Tensor]]  # (section, +1 or -1, sorted ranks of its members)

    @property
    def total(self) -> int:
        return self.sorted_cost.numel()

    def pruned(self, quantized: dict, k: int) -> dict[str, tuple[Tensor, Tensor]]:
        """{name: (q, s)} of every int tensor with the first k candidates zeroed."""
        out = {name: (q, s) for name, (q, s, _) in quantized.items()}
        for name, pos, rank in zip(self.names, self.positions, self.ranks):
            cut = pos[rank < k]
            if cut.numel():
                q = out[name][0].clone()
                q.view(-1)[cut] = 0
                out[name] = (q, out[name][1])
        return out


def _section(name: str, t: Tensor, p) -> str:
    return f"int{int(p[1])}.{tensor_group(name, t)}"  # pack_model's int section name


def plan_pruning(state_dict: dict[str, Tensor], quantized: dict, hessian_diag: dict | None = None,
                 include_embeddings: bool = False) -> _Plan:
    """The ±1 candidates of `quantized` (from quantize_int_tensors) in increasing cost s_r²·H_cc
    (H_cc = 1 without a Hessian diagonal), ties in state-dict then row-major order."""
    hessian_diag = hessian_diag or {}
    unknown = sorted(set(hessian_diag) - set(state_dict))
    if unknown:
        raise ValueError(f"hessian_diag names not in the state dict: {unknown[:5]}")
    names, positions, costs, signs, sections, with_h = [], [], [], [], [], 0
    for name, (q, s, p) in quantized.items():
        section = _section(name, state_dict[name], p)
        if section.endswith(".embed") and not include_embeddings:
            continue
        rows, cols = q.shape
        pos = (q.abs() == 1).view(-1).nonzero().squeeze(1)
        s2 = s.double().square()[pos // cols]
        if name in hessian_diag:
            h = torch.as_tensor(hessian_diag[name]).detach().cpu().double().reshape(-1)
            if h.numel() != cols or not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
                raise ValueError(f"{name}: hessian_diag must be {cols} finite values >= 0, got shape "
                                 f"{tuple(hessian_diag[name].shape)}")
            s2 = s2 * h[pos % cols]
            with_h += 1
        names.append(name)
        positions.append(pos)
        costs.append(s2)
        signs.append(q.view(-1)[pos] > 0)
        sections.append(section)
    cost = torch.cat(costs) if costs else torch.zeros(0, dtype=torch.float64)
    sorted_cost, order = torch.sort(cost, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    ranks = list(torch.split(rank, [p.numel() for p in positions]))
    classes = []
    for section in dict.fromkeys(sections):
        for sign in (1, -1):
            members = [r[g if sign > 0 else ~g] for r, g, sec in zip(ranks, signs, sections) if sec == section]
            classes.append((section, sign, torch.sort(torch.cat(members)).values))
    return _Plan(names, positions, ranks, sorted_cost, with_h, classes)


# ----------------------------------------------------------------------------- size model

def _xlogx(c: Tensor) -> Tensor:
    return torch.where(c > 0, c * torch.log2(c.clamp(min=1)), torch.zeros_like(c))


def _savings_model(plan: _Plan, quantized: dict, state_dict: dict, blob: bytes) -> Callable[[int], float]:
    """k -> modelled bytes saved by pruning the first k candidates: per int section, the drop of the
    order-0 entropy of its values, times that section's packed bytes / entropy in `blob`."""
    hist: dict[str, Tensor] = {}
    for name, (q, _, p) in quantized.items():
        section, qm = _section(name, state_dict[name], p), qmax(int(p[1]))
        h = torch.bincount((q.view(-1).to(torch.int64) + qm), minlength=2 * qm + 1).double()
        hist[section] = hist[section] + h if section in hist else h
    packed = {row["name"]: row["compressed_bytes"] for row in artifact_sections(blob)}
    ratio = {}
    for section, h in hist.items():
        n = h.sum()
        entropy = float(n * torch.log2(n) - _xlogx(h).sum()) / 8 if n > 0 else 0.0
        ratio[section] = packed.get(section, entropy) / entropy if entropy > 0 else 1.0
    tables = {}  # section -> counts of -1, 0, +1
    for section, h in hist.items():
        qm = (h.numel() - 1) // 2
        tables[section] = (float(h[qm - 1]), float(h[qm]), float(h[qm + 1]))

    def f(c: float) -> float:
        return c * math.log2(c) if c > 0 else 0.0

    def savings(k: int) -> float:
        moved: dict[str, list[int]] = {}
        for section, sign, ranks in plan.classes:
            moved.setdefault(section, [0, 0])[sign > 0] += int(torch.searchsorted(ranks, k))
        total = 0.0
        for section, (neg, pos) in moved.items():
            cm, c0, cp = tables[section]
            gain = f(cm - neg) + f(c0 + neg + pos) + f(cp - pos) - f(cm) - f(c0) - f(cp)
            total += ratio[section] * gain / 8  # Σ c log c grows by `gain` bits: entropy drops by it
        return total

    return savings


# ----------------------------------------------------------------------------- search

def _search(size_at: Callable[[int], int], total: int, target: int, size0: int, resolution: int,
            max_packs: int, savings: Callable[[int], float]) -> tuple[int | None, int]:
    """(hi, lo): size_at(hi) <= target < size_at(lo) with hi - lo <= resolution (or max_packs probes
    made once bracketed); hi is None when not even size_at(total) fits. size_at(0) = size0 > target.
    Sizes are taken as linear in the modelled savings u(k) between probes."""
    sizes = {0: size0}

    def inverse(goal: float, a: int, b: int) -> int:
        """The smallest k in [a, b] with savings(k) >= goal (savings rises with k), else b."""
        while a < b:
            mid = (a + b) // 2
            a, b = (a, mid) if savings(mid) >= goal else (mid + 1, b)
        return a

    lo, hi, prev = 0, None, None
    while hi is None:  # find a fitting count: extrapolate from the last two misses, aim 5% past
        if lo >= total:
            return None, lo
        slope = 1.0  # packed bytes per modelled byte; 1 = the model as it is
        if prev is not None and savings(lo) > savings(prev) and sizes[prev] > sizes[lo]:
            slope = (sizes[prev] - sizes[lo]) / (savings(lo) - savings(prev))
        m = inverse(savings(lo) + (sizes[lo] - target) / slope, lo, total)
        m = m + m // 20 + resolution
        if prev:
            m = max(m, 2 * lo)  # a second miss: at least double
        m = min(max(m, lo + 1), total)
        sizes[m] = size_at(m)
        if sizes[m] <= target:
            hi = m
        else:
            lo, prev = m, lo
    # Bracketed: regula falsi in u with the Illinois rule (an end kept twice in a row has its
    # distance to the target halved), each probe nudged half a resolution toward the farther end
    # so that it can close the bracket; a bisection after 3 probes that did not halve it.
    # f: distance to the target + 0.5 bytes, never 0 (a probe exactly at the target fits)
    f_lo, f_hi, side, slow = sizes[lo] - target - 0.5, sizes[hi] - target - 0.5, 0, 0
    while hi - lo > resolution and len(sizes) < max_packs:
        width = hi - lo
        u_lo, u_hi = savings(lo), savings(hi)
        if slow >= 3 or not u_hi > u_lo:
            m, slow = (lo + hi) // 2, 0
        else:
            k = inverse(u_lo + (u_hi - u_lo) * f_lo / (f_lo - f_hi), lo, hi)
            m = k + (resolution + 1) // 2 if k - lo <= hi - k else k - (resolution + 1) // 2
        m = min(max(m, lo + 1), hi - 1)
        sizes[m] = size_at(m)
        if sizes[m] <= target:
            hi, f_hi = m, sizes[m] - target - 0.5
            f_lo, side = f_lo / 2 if side == 1 else f_lo, 1
        else:
            lo, f_lo = m, sizes[m] - target - 0.5
            f_hi, side = f_hi / 2 if side == -1 else f_hi, -1
        slow = slow + 1 if 2 * (hi - lo) > width else 0
    return hi, lo


# ----------------------------------------------------------------------------- the fit

def fit_to_budget(state_dict: dict[str, Tensor], precision_fn: Callable, *, code_bytes: int,
                  limit: int = ARTIFACT_LIMIT, compressor: str = "zlib", bitpack: bool | str = False,
                  level: int | None = None, prequantized: dict | None = None, hessian_diag: dict | None = None,
                  include_embeddings: bool = False, resolution: int | None = None,
                  max_packs: int = 16) -> tuple[bytes, FitReport]:
    """(artifact, report): pack_model(state_dict, precision_fn, compressor, bitpack, level, prequantized)
    if code_bytes + its size <= limit (byte for byte that blob), else the smallest pruning of ±1 values
    (module docstring) that fits. hessian_diag: {name: diag(H) [C]}, e.g. filled by
    quant.gptq.gptq_quantize(..., hessian_diag=d). BudgetError if nothing fits."""
    t0 = time.perf_counter()
    if not isinstance(code_bytes, int) or code_bytes < 0:
        raise ValueError(f"code_bytes must be an int >= 0, got {code_bytes!r}")
    pack = dict(compressor=compressor, bitpack=bitpack, level=level)
    blob = pack_model(state_dict, precision_fn, prequantized=prequantized, **pack)
    target = limit - code_bytes
    report = FitReport(fits_before=len(blob) <= target, bytes_before=len(blob), bytes_after=len(blob),
                       code_bytes=code_bytes, limit=limit, probes=[(0, len(blob))])
    if report.fits_before:
        report.seconds = time.perf_counter() - t0
        return blob, report

    quantized = quantize_int_tensors(state_dict, precision_fn, prequantized)
    plan = plan_pruning(state_dict, quantized, hessian_diag, include_embeddings)
    total = plan.total
    report.candidates, report.hessian_tensors = total, plan.hessian_tensors
    resolution = max(1, total // 10000) if resolution is None else max(1, int(resolution))
    blobs = {0: blob}

    def size_at(k: int) -> int:
        b = pack_model(state_dict, precision_fn, prequantized=plan.pruned(quantized, k), **pack)
        report.probes.append((k, len(b)))
        if len(b) <= target:
            blobs.clear()  # the search only ever moves to a smaller fitting count
            blobs[k] = b
        return len(b)

    hi, lo = (None, 0) if total == 0 else _search(size_at, total, target, len(blob), resolution, max_packs,
                                                  _savings_model(plan, quantized, state_dict, blob))
    report.packs = len(report.probes)
    report.seconds = time.perf_counter() - t0
    if hi is None:
        smallest = min(size for _, size in report.probes)
        over = code_bytes + smallest - limit
        raise BudgetError(
            f"budget_fit: cannot fit the {limit}-byte limit: code {code_bytes} + model {smallest} bytes is "
            f"{over} bytes over even with all {total} ±1 int values of the block matrices zeroed "
            f"(model {len(blob)} bytes before pruning). Make the model smaller: a larger SD_K_MATRIX "
            f"(coarser int grid), a smaller MLP_MULT, or COMPRESSOR=brotli", over, report)
    report.pruned, report.resolution = hi, hi - lo
    report.bytes_after = len(blobs[hi])
    if hi:
        report.cost_sum = float(plan.sorted_cost[:hi].sum())
        report.cost_max = float(plan.sorted_cost[hi - 1])
    report.per_tensor = {name: (int((rank < hi).sum()), rank.numel()) for name, rank in zip(plan.names, plan.ranks)}
    report.seconds = time.perf_counter() - t0
    return blobs[hi], report
