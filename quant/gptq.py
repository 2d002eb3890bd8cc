"""Full-Hessian GPTQ onto the per-row grid of quant/int6.py, and self-generated calibration tokens.

GPTQ (Frantar et al., arXiv:2210.17323; PR #535/#634 -> rec:2026-03-25; docs/TECHNIQUES.md "GPTQ")
--------------------------------------------------------------------------------------------------
For a linear layer y = x Wᵀ with W [R, C] and calibration inputs X [N, C], quantizing W to Ŵ should
keep the layer's output: minimise ||X Wᵀ - X Ŵᵀ||² = Σ_r (w_r - ŵ_r) H (w_r - ŵ_r)ᵀ, H = XᵀX / N.
Rows are independent given H, so all rows are processed together, one column at a time (optimal
brain surgeon, OBS): round column j onto the grid, then move the not-yet-quantized columns F to
absorb its error e_j = w_j - ŵ_j:

    w_F  -=  e_j / [H_F⁻¹]_jj · [H_F⁻¹]_{j,F}        (H_F: H restricted to j and the columns after it)

and drop j from F. The rows of the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) hold exactly these
sequential inverses: U_jj² = [H_F⁻¹]_jj and U_{j,F} / U_jj = [H_F⁻¹]_{j,F} / [H_F⁻¹]_jj, so one
factorisation replaces the C rank-one downdates. The update is applied lazily in blocks of 128
columns: inside a block column by column; the later columns get all of a block's errors at once as
one matmul, W[:, after] -= E_block @ U[block, after] (the GPTQ paper's "lazy batch" trick).

Choices, as in the records:
- damping: H += 0.01 · mean(diag H) · I before factorising (PD even with rank-deficient X);
- act-order: columns processed by diag(H) descending, the inputs with the most energy first, while
  the most columns are left to absorb their errors;
- the grid is exactly quant/int6's: fp16 row scales from `row_scales(w, bits, clip, sd_k)` on the
  *original* weight, q = clamp(round_half_even(w / s), ±qmax). Only which grid point each entry
  takes changes, so `dequantize_rows(q, s)` reads GPTQ output unchanged and the artifact format is
  the same;
- inputs that are exactly 0 on all calibration rows (diag H = 0) get H_jj = 1 before damping, so
  they round to nearest and pass no error on. (The paper zeroes those weights instead; we keep them
  in case the input is nonzero off the calibration set.)

Hessians come from forward pre-hooks on every `nn.Linear` (hybrid's CastedLinear is one) whose
weight the precision policy stores as "int", over one pass of the unquantized model on the
calibration tokens (one pass, not the paper's layer-by-layer requantized inputs). Int weights that
no hook sees (tied embeddings, RWKV-7 LoRA factors; under bf16 on CUDA also MoE experts in
grouped_mm dispatch and MLP.fc in the fused Triton MLP, which call no module) or that saw fewer rows
than columns are rounded to nearest on the same grid instead, and the returned info says which and
why. So run the Hessian pass in fp32 (no autocast): every module is then called.

Calibration (rec:2026-03-25: 64 sequences x 2048 tokens at temperature 0.8): the model samples its
own text, so no training or validation data is read at export. Each prefix runs zero-padded to a
power-of-two length (`calibration_bucket`), so a compiled forward sees O(log T) shapes, not T.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from quant.int6 import _round_div, qmax, quantize_rows, row_scales
from quant.policy import precision_clip

DAMP = 0.01
BLOCK_SIZE = 128


# ----------------------------------------------------------------------------- one matrix

def _upper_cholesky_of_inverse(h: Tensor, damp: float) -> Tensor:
    """U with UᵀU = (H + λI)⁻¹, λ = damp · mean(diag H); λ grows tenfold while H + λI is not PD."""
    c = h.shape[0]
    eye = torch.eye(c, dtype=h.dtype, device=h.device)
    lam = damp * h.diagonal().mean()
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        lam = lam * 10  # rounding can leave a barely-PSD H indefinite at the first damping
    raise ValueError(f"Hessian is not positive definite even with damping {float(lam):.3g}")


@torch.no_grad()
def gptq_rows(w: Tensor, h: Tensor, scale: Tensor, bits: int, block_size: int = BLOCK_SIZE,
              damp: float = DAMP, act_order: bool = True) -> Tensor:
    """q int8 [R, C] in [-qmax, qmax] for weight w [R, C] on the fixed grid of fp16 row scales
    `scale` [R], minimising Σ_r (w_r - q_r s_r) H (w_r - q_r s_r)ᵀ greedily (module docstring).

    Works in float64 when w is float64 (tests), else in float32.
    """
    if w.ndim != 2 or h.shape != (w.shape[1], w.shape[1]) or scale.shape != (w.shape[0],):
        raise ValueError(f"shapes w {tuple(w.shape)}, h {tuple(h.shape)}, scale {tuple(scale.shape)} do not fit")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    qm = qmax(bits)
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    cols = w.shape[1]
    s16 = scale.to(torch.float16)
    s, s_col = s16.to(dt), s16.float().unsqueeze(1)  # s_col: the divisor of int6's _grid
    W = w.detach().to(dt).clone()
    H = h.detach().to(device=W.device, dtype=dt).clone()
    diag = H.diagonal()  # a view: the dead-input fix below writes through it
    diag[diag == 0] = 1.0
    perm = (torch.argsort(diag, descending=True, stable=True) if act_order
            else torch.arange(cols, device=W.device))
    W, H = W[:, perm], H[perm][:, perm]
    U = _upper_cholesky_of_inverse(H, damp)
    Q = torch.empty_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.empty_like(W1)
        for j in range(i2 - i1):
            q = torch.clamp(_round_div(W1[:, j:j + 1], s_col), -qm, qm)[:, 0].to(dt)  # int6's _grid
            e = (W1[:, j] - q * s) / U[i1 + j, i1 + j]
            W1[:, j + 1:] -= e.unsqueeze(1) * U[i1 + j, i1 + j + 1:i2].unsqueeze(0)
            Q[:, i1 + j] = q
            E1[:, j] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].to(torch.int8)


def gptq_matrix(w: Tensor, h: Tensor, bits: int, clip: str = "mse", sd_k: float | None = None,
                block_size: int = BLOCK_SIZE, damp: float = DAMP, act_order: bool = True) -> tuple[Tensor, Tensor]:
    """(q int8 [R, C], scale fp16 [R]) like quantize_rows(w, bits, clip, sd_k), with GPTQ choosing q."""
    s = row_scales(w, bits, clip, sd_k)
    return gptq_rows(w, h, s, bits, block_size, damp, act_order), s


# ----------------------------------------------------------------------------- calibration

@contextmanager
def _ieee_fp32():
    """TF32 matmuls (on in training) keep 10 mantissa bits: too few for Hessians and the GPTQ update."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@contextmanager
def _eval_mode(model):
    was_training = getattr(model, "training", None)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        yield
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)


def _logits_fn(model) -> Callable[[Tensor], Tensor]:
    return model.forward_logits if hasattr(model, "forward_logits") else model


def _device_of(model, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def calibration_bucket(length: int, cap: int) -> int:
    """The forward length for a prefix of `length` tokens: the smallest power of two >= length,
    capped at `cap` (the longest prefix window). Every prefix then runs in one of at most
    ceil(log2(cap)) + 1 shapes, for at most 2x the exact work (about 4/3 of it summed over a sequence)."""
    if not 1 <= length <= cap:
        raise ValueError(f"prefix length {length} outside [1, {cap}]")
    return min(1 << (length - 1).bit_length(), cap)


@torch.no_grad()
def generate_calibration(model, num_seqs: int = 16, seq_len: int = 512, temperature: float = 0.8,
                         seed: int = 0, bos_id: int | None = None, batch_size: int = 16,
                         max_context: int | None = None, device=None, progress=None) -> Tensor:
    """[num_seqs, seq_len] int64 tokens sampled from the model itself (rec:2026-03-25), on `device`
    (default: the model's). `model`: a module with `forward_logits` ([B, T] int64 -> [B, T, V]), or
    such a callable; it must be causal (logits at t independent of the tokens after t). Each sequence
    starts with `bos_id` (None: a uniform random token); token t is drawn from softmax(logits /
    temperature) of the prefix (temperature 0: argmax), recomputing the whole prefix (no KV cache),
    or only its last `max_context` tokens, which bounds the O(T²) cost.
    The same seed gives the same tokens on the same device.

    Bounded shapes: a compiled forward (torch.compile(dynamic=False), or the eager model's compiled
    flex attention past the window) compiles once per input shape, so the model never sees one
    shape per prefix length. The prefix of L tokens runs zero-padded at its tail to
    `calibration_bucket(L, cap)` tokens (cap = min(seq_len, max_context)) and its logits are read at
    position L - 1, exact for a causal model; a last batch with fewer than min(batch_size,
    num_seqs) sequences is padded with zero rows that are dropped before sampling. So the model sees
    only [min(batch_size, num_seqs), bucket] inputs, at most ceil(log2(cap)) + 1 shapes, and the
    random draws (hence the tokens, up to the rounding of the longer forwards) are the unpadded ones.
    progress(tokens_done, tokens_total), if given, is called after each batch (a console bar).
    """
    if num_seqs < 1 or seq_len < 1 or batch_size < 1 or temperature < 0:
        raise ValueError("num_seqs, seq_len and batch_size must be >= 1 and temperature >= 0")
    if max_context is not None and max_context < 1:
        raise ValueError(f"max_context must be >= 1 or None, got {max_context}")
    dev = _device_of(model, device)
    logits_fn = _logits_fn(model)
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = torch.empty(num_seqs, seq_len, dtype=torch.int64, device=dev)
    rows = min(batch_size, num_seqs)  # every forward's batch
    cap = seq_len if max_context is None else min(seq_len, max_context)
    with _eval_mode(model):
        # zeros: the padding is any valid id (never read back for a causal model)
        vocab = None if bos_id is not None else logits_fn(
            torch.zeros(rows, calibration_bucket(1, cap), dtype=torch.int64, device=dev)).shape[-1]
        for b0 in range(0, num_seqs, batch_size):
            n = min(batch_size, num_seqs - b0)
            buf = torch.zeros(rows, seq_len, dtype=torch.int64, device=dev)
            x = buf[:n]
            if bos_id is None:
                x[:, 0] = torch.randint(vocab, (n,), generator=gen, device=dev)
            else:
                x[:, 0] = bos_id
            for t in range(1, seq_len):
                lo = 0 if max_context is None else max(0, t - max_context)
                length = t - lo
                ids = buf[:, lo:lo + calibration_bucket(length, cap)].contiguous()
                logits = logits_fn(ids)[:n, length - 1].float()
                if temperature == 0:
                    x[:, t] = logits.argmax(dim=-1)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    x[:, t] = torch.multinomial(probs, 1, generator=gen)[:, 0]
            out[b0:b0 + n] = x
            if progress is not None:
                progress((b0 + n) * seq_len, num_seqs * seq_len)
    return out


@torch.no_grad()
def collect_hessians(model: nn.Module, calib_tokens: Tensor, modules: dict[str, nn.Module],
                     batch_size: int = 8) -> dict[str, tuple[Tensor, int]]:
    """{name: (H = XᵀX / n fp32 [C, C], n rows)} over the inputs every module in `modules` sees while
    the model runs `forward_logits` on `calib_tokens` [N, T] in batches. Names that share one module
    share one Hessian; a module never called gets n = 0 (and H = 0)."""
    acc: dict[int, list] = {}
    for m in modules.values():
        if id(m) not in acc:
            c = m.weight.shape[1]
            acc[id(m)] = [torch.zeros(c, c, dtype=torch.float32, device=m.weight.device), 0]

    def hook(mod: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        entry = acc[id(mod)]
        entry[0].addmm_(x.T, x)
        entry[1] += x.shape[0]  # a shape, not a value: no host sync

    unique = {id(m): m for m in modules.values()}
    handles = [m.register_forward_pre_hook(hook) for m in unique.values()]
    dev = _device_of(model, None)
    logits_fn = _logits_fn(model)
    try:
        with _eval_mode(model), _ieee_fp32():
            for b0 in range(0, calib_tokens.shape[0], batch_size):
                logits_fn(calib_tokens[b0:b0 + batch_size].to(dev))
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, m in modules.items():
        h, n = acc[id(m)]
        out[name] = (h / max(n, 1), n)
    return out


# ----------------------------------------------------------------------------- whole model

def gptq_quantize(model: nn.Module, calib_tokens: Tensor, precision_fn: Callable, batch_size: int = 8,
                  block_size: int = BLOCK_SIZE, damp: float = DAMP, act_order: bool = True,
                  hessian_diag: dict[str, Tensor] | None = None,
                  ) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, str]]:
    """Quantize every int-precision 2-D tensor of `model.state_dict()` (names as its keys).

    Returns (quantized, method): quantized[name] = (q int8 [R, C], scale fp16 [R]) on the CPU, on
    the grid of precision_fn(name, tensor) (bits, clip, sd_k), ready for the artifact writer;
    method[name] = "gptq", or "rtn: <why>" for tensors rounded to nearest (module docstring).
    Pass the uncompiled model; it is run in eval mode and restored.
    hessian_diag: a dict to fill with diag(H) (float32 [C], CPU, before damping and before the
    dead-input fix) of every tensor that got GPTQ, e.g. for quant/fit.py's pruning cost.
    """
    state = model.state_dict()
    targets = {}
    for name, t in state.items():
        p = precision_fn(name, t)
        if p[0] == "int" and t.ndim == 2:
            targets[name] = p
    linears = {f"{n}.weight" if n else "weight": m
               for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.Linear)}
    hooked = {name: linears[name] for name in targets if name in linears}
    hessians = collect_hessians(model, calib_tokens, hooked, batch_size) if hooked else {}
    quantized, method = {}, {}
    with _ieee_fp32():
        for name, p in targets.items():
            bits, (clip, sd_k) = int(p[1]), precision_clip(p)
            w = state[name]
            h, n = hessians.get(name, (None, 0))
            if h is None:
                why = "rtn: not an nn.Linear weight"
            elif n == 0:
                why = "rtn: its module was never called (a fused or grouped kernel bypassed it)"
            elif n < w.shape[1]:
                why = f"rtn: {n} calibration rows < {w.shape[1]} input columns"
            else:
                q, s = gptq_matrix(w, h, bits, clip, sd_k, block_size, damp, act_order)
                quantized[name], method[name] = (q.cpu(), s.cpu()), "gptq"
                if hessian_diag is not None:
                    hessian_diag[name] = h.diagonal().to(device="cpu", dtype=torch.float32, copy=True)
                continue
            q, s = quantize_rows(w, bits, clip, sd_k)
            quantized[name], method[name] = (q.cpu(), s.cpu()), why
    return quantized, method
