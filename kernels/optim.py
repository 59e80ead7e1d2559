"""Triton kernels for family 2: layer-wise SGD / AdamW steps with pruning masks, and
weight variation.

One launch per tensor (the per-tensor lr, hyper-parameters, step count and AMP
scalars are read from device memory inside the kernel, so there is still no
host sync and nothing to recompile when they change). A frozen tensor (lr == 0
and weight decay == 0) or a step with found_inf != 0 masks every load and
store off: no memory traffic. float64 params step in float64 math, the other
dtypes in float32. A tensor is one flat buffer (param, grad, state and mask share
strides), so any dense layout works. The fused multi-tensor path is the CUDA backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _grad_scale_sign(GS, maxi, HAS_GS: tl.constexpr):
    """The factor the gradient is multiplied by: 1 / grad_scale (float32, as GradScaler
    computes it), negated for maximize."""
    s = tl.where(maxi != 0, -1.0, 1.0)
    if HAS_GS:
        s = s * (1.0 / tl.load(GS))
    return s


@triton.jit
def _sgd_kernel(P, G, B, M, LR, H, GS, FI, t, n,
                HAS_MASK: tl.constexpr, KIND: tl.constexpr, HAS_WD: tl.constexpr, HAS_GS: tl.constexpr,
                HAS_FI: tl.constexpr, IS64: tl.constexpr, BLOCK: tl.constexpr):
    # KIND: 0 no momentum, 1 momentum, 2 Nesterov, 3 first step (buf = g), 4 first step + Nesterov
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lr64 = tl.load(LR + t)
    wd64 = tl.load(H + t * 6 + 0)
    mom64 = tl.load(H + t * 6 + 1)
    damp64 = tl.load(H + t * 6 + 2)
    maxi = tl.load(H + t * 6 + 5)
    lim = tl.where((lr64 != 0.0) | (wd64 != 0.0), n, 0)
    if HAS_FI:
        lim = tl.where(tl.load(FI) == 0.0, lim, 0)
    valid = offs < lim
    s = _grad_scale_sign(GS, maxi, HAS_GS)
    if IS64:
        lr = lr64
        wd = wd64
        mom = mom64
        omd = 1.0 - damp64
        g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float64) * s.to(tl.float64)
        p = tl.load(P + offs, mask=valid, other=0.0).to(tl.float64)
    else:
        lr = lr64.to(tl.float32)
        wd = wd64.to(tl.float32)
        mom = mom64.to(tl.float32)
        omd = (1.0 - damp64).to(tl.float32)
        g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float32) * s
        p = tl.load(P + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(M + offs, mask=valid, other=0) != 0
        g = tl.where(keep, g, 0.0)
    if HAS_WD:
        g = g + wd * p
    d = g
    if KIND != 0:
        if KIND >= 3:
            b = g
        else:
            b = tl.load(B + offs, mask=valid, other=0.0)
            b = b * mom + omd * g
        tl.store(B + offs, b, mask=valid)
        if KIND == 2 or KIND == 4:
            d = g + mom * b
        else:
            d = b
    p = p - lr * d
    if HAS_MASK:
        p = tl.where(keep, p, 0.0)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=valid)


@triton.jit
def _adamw_kernel(P, G, EA, EAS, EMX, M, LR, STEPS, H, GS, FI, t, n,
                  HAS_MASK: tl.constexpr, AMS: tl.constexpr, HAS_GS: tl.constexpr, HAS_FI: tl.constexpr,
                  IS64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lr64 = tl.load(LR + t)
    b1 = tl.load(H + t * 6 + 0)
    b2 = tl.load(H + t * 6 + 1)
    eps64 = tl.load(H + t * 6 + 2)
    wd = tl.load(H + t * 6 + 3)
    maxi = tl.load(H + t * 6 + 5)
    lim = tl.where((lr64 != 0.0) | (wd != 0.0), n, 0)
    if HAS_FI:
        lim = tl.where(tl.load(FI) == 0.0, lim, 0)
    valid = offs < lim
    step = tl.load(STEPS + t).to(tl.float64) + 1.0
    bc1 = 1.0 - tl.exp(step * tl.log(b1))
    bc2_sqrt64 = tl.sqrt(1.0 - tl.exp(step * tl.log(b2)))
    s = _grad_scale_sign(GS, maxi, HAS_GS)
    if IS64:
        step_size = lr64 / bc1
        bc2_sqrt = bc2_sqrt64
        decay = 1.0 - lr64 * wd
        w1 = 1.0 - b1
        beta2 = b2
        w2 = 1.0 - b2
        eps = eps64
        g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float64) * s.to(tl.float64)
        p = tl.load(P + offs, mask=valid, other=0.0).to(tl.float64)
    else:
        step_size = (lr64 / bc1).to(tl.float32)
        bc2_sqrt = bc2_sqrt64.to(tl.float32)
        decay = (1.0 - lr64 * wd).to(tl.float32)
        w1 = (1.0 - b1).to(tl.float32)
        beta2 = b2.to(tl.float32)
        w2 = (1.0 - b2).to(tl.float32)
        eps = eps64.to(tl.float32)
        g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float32) * s
        p = tl.load(P + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(M + offs, mask=valid, other=0) != 0
        g = tl.where(keep, g, 0.0)
    p = p * decay
    m = tl.load(EA + offs, mask=valid, other=0.0)
    v = tl.load(EAS + offs, mask=valid, other=0.0)
    diff = g - m
    # torch's lerp: start + w * (end - start) for |w| < 0.5, else end - (end - start) * (1 - w)
    w1c = 1.0 - w1
    m = tl.where(w1 < 0.5, m + w1 * diff, g - diff * w1c)
    v = v * beta2 + w2 * g * g
    tl.store(EA + offs, m, mask=valid)
    tl.store(EAS + offs, v, mask=valid)
    second = v
    if AMS:
        second = tl.maximum(tl.load(EMX + offs, mask=valid, other=0.0), v, propagate_nan=tl.PropagateNan.ALL)
        tl.store(EMX + offs, second, mask=valid)
    p = p - step_size * (m / (tl.sqrt(second) / bc2_sqrt + eps))
    if HAS_MASK:
        p = tl.where(keep, p, 0.0)
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
    rows = hyper.tolist()
    dummy = lrs
    is64 = params[0].dtype == torch.float64
    for t, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        wd, mom, _, nest, init, _ = rows[t]
        kind = 0 if mom == 0 else (3 if init else 1) + (1 if nest else 0)
        grid = (triton.cdiv(n, BLOCK),)
        _sgd_kernel[grid](
            p, grads[t] if grads[t].numel() else p, bufs[t] if kind else dummy, _mask_arg(masks[t], dummy),
            lrs, hyper_d, grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy, t, n,
            HAS_MASK=masks[t] is not None, KIND=kind, HAS_WD=wd != 0, HAS_GS=grad_scale is not None,
            HAS_FI=found_inf is not None, IS64=is64, BLOCK=BLOCK)


def layerwise_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lrs, steps, hyper, masks,
                          grad_scale, found_inf) -> None:
    dev = params[0].device
    hyper_d = hyper.to(dev)
    ams = hyper[:, 4].tolist()
    dummy = lrs
    is64 = params[0].dtype == torch.float64
    for t, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        grid = (triton.cdiv(n, BLOCK),)
        _adamw_kernel[grid](
            p, grads[t] if grads[t].numel() else p, exp_avgs[t], exp_avg_sqs[t],
            max_exp_avg_sqs[t] if ams[t] else dummy, _mask_arg(masks[t], dummy),
            lrs, steps, hyper_d, grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy, t, n,
            HAS_MASK=masks[t] is not None, AMS=ams[t] != 0, HAS_GS=grad_scale is not None,
            HAS_FI=found_inf is not None, IS64=is64, BLOCK=BLOCK)
    # advance the step count of every stepped tensor (no host sync)
    active = (lrs != 0) | (hyper_d[:, 3] != 0)
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
