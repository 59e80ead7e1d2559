"""Triton kernels for family 2: layer-wise SGD / AdamW steps with pruning masks, and
weight variation.

One launch per tensor (the per-tensor lr, hyper-parameters, step count and AMP
scalars are read from device memory inside the kernel, so there is still no
host sync and nothing to recompile when they change). A frozen tensor (lr == 0
and weight decay == 0) or a step with found_inf != 0 masks every load and
store off: no memory traffic. The fused multi-tensor path is the CUDA backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _sgd_kernel(P, G, B, M, LR, H, GS, FI, t, n,
                HAS_MASK: tl.constexpr, HAS_MOM: tl.constexpr, HAS_GS: tl.constexpr, HAS_FI: tl.constexpr,
                BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lr = tl.load(LR + t)
    wd = tl.load(H + t * 6 + 0)
    c_buf = tl.load(H + t * 6 + 2)
    c_grad = tl.load(H + t * 6 + 3)
    c_dg = tl.load(H + t * 6 + 4)
    c_db = tl.load(H + t * 6 + 5)
    lim = tl.where((lr != 0.0) | (wd != 0.0), n, 0)
    if HAS_FI:
        lim = tl.where(tl.load(FI) == 0.0, lim, 0)
    valid = offs < lim
    g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_GS:
        g = g * (1.0 / tl.load(GS))
    if HAS_MASK:
        mk = (tl.load(M + offs, mask=valid, other=0) != 0).to(tl.float32)
        g = g * mk
    p = tl.load(P + offs, mask=valid, other=0.0).to(tl.float32)
    g = g + wd * p
    d = g
    if HAS_MOM:
        b = tl.load(B + offs, mask=valid, other=0.0)
        b = c_buf * b + c_grad * g
        tl.store(B + offs, b, mask=valid)
        d = c_dg * g + c_db * b
    p = p - lr * d
    if HAS_MASK:
        p = p * mk
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=valid)


@triton.jit
def _adamw_kernel(P, G, EA, EAS, M, LR, STEPS, H, GS, FI, t, n,
                  HAS_MASK: tl.constexpr, HAS_GS: tl.constexpr, HAS_FI: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lr = tl.load(LR + t)
    b1 = tl.load(H + t * 4 + 0)
    b2 = tl.load(H + t * 4 + 1)
    eps = tl.load(H + t * 4 + 2)
    wd = tl.load(H + t * 4 + 3)
    lim = tl.where((lr != 0.0) | (wd != 0.0), n, 0)
    if HAS_FI:
        lim = tl.where(tl.load(FI) == 0.0, lim, 0)
    valid = offs < lim
    step = tl.load(STEPS + t).to(tl.float64) + 1.0
    lr64 = lr.to(tl.float64)
    bc1 = 1.0 - tl.exp(step * tl.log(b1.to(tl.float64)))
    bc2 = 1.0 - tl.exp(step * tl.log(b2.to(tl.float64)))
    step_size = (lr64 / bc1).to(tl.float32)
    bc2_sqrt = tl.sqrt(bc2).to(tl.float32)
    decay = (1.0 - lr64 * wd.to(tl.float64)).to(tl.float32)
    g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_GS:
        g = g * (1.0 / tl.load(GS))
    if HAS_MASK:
        mk = (tl.load(M + offs, mask=valid, other=0) != 0).to(tl.float32)
        g = g * mk
    p = tl.load(P + offs, mask=valid, other=0.0).to(tl.float32) * decay
    m = tl.load(EA + offs, mask=valid, other=0.0)
    v = tl.load(EAS + offs, mask=valid, other=0.0)
    m = m + (1.0 - b1) * (g - m)
    v = v * b2 + (1.0 - b2) * (g * g)
    tl.store(EA + offs, m, mask=valid)
    tl.store(EAS + offs, v, mask=valid)
    p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
    if HAS_MASK:
        p = p * mk
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=valid)


@triton.jit
def _sqdiff_kernel(A, B, OUT, n, IS64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    if IS64:
        d = tl.load(A + offs, mask=valid, other=0.0).to(tl.float64) - tl.load(B + offs, mask=valid, other=0.0).to(tl.float64)
    else:
        d = tl.load(A + offs, mask=valid, other=0.0).to(tl.float32) - tl.load(B + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(OUT + pid, tl.sum(d * d, axis=0))


def _mask_arg(m: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    if m is None:
        return dummy
    return m.view(torch.uint8) if m.dtype == torch.bool else m


def layerwise_sgd_step_(params, grads, bufs, lrs, hyper, masks, grad_scale, found_inf) -> None:
    dev = params[0].device
    hyper_d = hyper.to(dev)
    mom = hyper[:, 1].tolist()
    dummy = lrs
    for t, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        has_mom = mom[t] != 0
        grid = (triton.cdiv(n, BLOCK),)
        _sgd_kernel[grid](
            p, grads[t] if grads[t].numel() else p, bufs[t] if has_mom else dummy, _mask_arg(masks[t], dummy),
            lrs, hyper_d, grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy, t, n,
            HAS_MASK=masks[t] is not None, HAS_MOM=has_mom, HAS_GS=grad_scale is not None,
            HAS_FI=found_inf is not None, BLOCK=BLOCK)


def layerwise_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, lrs, steps, hyper, masks, grad_scale, found_inf) -> None:
    dev = params[0].device
    hyper_d = hyper.to(dev)
    dummy = lrs
    for t, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        grid = (triton.cdiv(n, BLOCK),)
        _adamw_kernel[grid](
            p, grads[t] if grads[t].numel() else p, exp_avgs[t], exp_avg_sqs[t], _mask_arg(masks[t], dummy),
            lrs, steps, hyper_d, grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy, t, n,
            HAS_MASK=masks[t] is not None, HAS_GS=grad_scale is not None, HAS_FI=found_inf is not None,
            BLOCK=BLOCK)
    # advance the step count of every stepped tensor (no host sync)
    active = (lrs != 0) | (hyper_d[:, 3] != 0)
    active &= torch.tensor([p.numel() > 0 for p in params], device=dev)
    if found_inf is not None:
        active &= found_inf.reshape(()) == 0
    steps.add_(active.to(steps.dtype))


def weight_variation(params, snapshots) -> torch.Tensor:
    dev = params[0].device
    out_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    vals = []
    for a, b in zip(params, snapshots):
        n = a.numel()
        is64 = a.dtype == torch.float64
        if n == 0:
            vals.append(torch.zeros((), dtype=out_dtype, device=dev))
            continue
        nb = triton.cdiv(n, BLOCK)
        part = torch.empty(nb, dtype=torch.float64 if is64 else torch.float32, device=dev)
        _sqdiff_kernel[(nb,)](a, b, part, n, IS64=is64, BLOCK=BLOCK)
        vals.append(part.sum().to(out_dtype))
    return torch.stack(vals)
