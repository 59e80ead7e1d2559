"""FICGAN training: ``pyfici train ficgan`` and :func:`train_ficgan`.

Warm-up (the first ``recon_warmup`` steps): E_attr + G as an autoencoder,
L1(G(E_attr(x), z), x) only (at ``warmup_lr``). With the masked attribute input
(E_attr sees the identity ellipse only as a 4x4 low-pass) the inner face can
only come from the identity code, so G learns to draw a face from its code
before any adversarial or identity loss acts.

GAN step (batch x, identities z = E_id(x), frozen):
  targets z_t: z rolled by one inside the batch for a ``swap_prob`` fraction
  of the samples (identity swap; with ``mix_prob`` some swapped targets are the
  spherical mean of two faces' codes), z itself for the rest;
  fake = G(E_attr(x), z_t);
  D: softplus(D(fake)) + softplus(-D(x)), lazy R1 (gamma/2 * |grad D(x)|^2)
  every ``r1_every`` steps;
  G/E_attr: adversarial softplus(-D(fake)) + w_id * identity loss
  + w_rec * L1(fake, x) on the non-swapped samples
  + w_lowpass * L1(pool8(fake), pool8(x)) and w_chroma * L1(chroma(fake), chroma(x))
    on the swapped samples
  + w_attr * mean_l MSE(E_attr(fake)_l, E_attr(x)_l).
  Identity loss (``id_loss``), on a random view of the output (``id_augment``:
  scale, shift, rotation, grey mix; optional blur ``id_blur``): "cos"
  1 - cos(E_id(view), z_t); "centered" the same after subtracting the training
  set's mean embedding mu from both; "contrastive" (default) centred 1 - cos +
  InfoNCE (temperature ``id_tau``) of the centred E_id(view) against every
  training image and mirror.
  With ``center_identity`` G modulates by normalize(z - mu) (mu stored in G).
Data sampling, flips, swaps and views come from generators seeded by (seed,
step), so a resumed run continues exactly as an uninterrupted one.

The defaults are the recipe measured on the built-in faces (docs/ficgan.md,
section 5, run D); they were not tuned on a real aligned-face set.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from pyfici.deid.metrics import luma
from pyfici.engine import UserError
from pyfici.engine.config import (
    RunConfig,
    add_config_arguments,
    add_json_argument,
    config_from_args,
    emit_json,
    option,
    validate,
)
from pyfici.engine.errors import user_errors
from pyfici.engine.files import load_checkpoint
from pyfici.engine.loop import CallbackHook, Trainer
from pyfici.engine.rundir import RunDir, check_resume_config
from pyfici.engine.runtime import log, resolve_device, seed_everything, setup, torch_threads
from pyfici.methods.ficgan.data import load_face_folder, save_grid
from pyfici.methods.ficgan.model import FICGAN, FICGANConfig
from pyfici.optim import LayerwiseAdamW

_RESUME_IGNORE = ("steps", "out", "resume", "device", "sample_every", "checkpoint_every", "log_every", "amp", "quiet")
KIND_TRAIN, KIND_FINAL = "ficgan-train", "ficgan"
BUILTIN_QUICK_STEPS = 500
BUILTIN_QUICK_THREADS = 1  # measured: 2 threads are several times slower on a busy 2-core CPU


def make_optimizer(params, lr: float, betas=(0.0, 0.99)):
    """``pyfici.optim.LayerwiseAdamW`` (the name is written to metrics.json)."""
    return LayerwiseAdamW(params, lr=lr, betas=betas, weight_decay=0.0), "pyfici.optim.LayerwiseAdamW"


def _int_list(text: str) -> list[int]:
    try:
        return [int(q) for q in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


@dataclass
class FICGANTrainConfig(RunConfig):
    """Every setting of a FICGAN run; ``pyfici train ficgan`` has one flag per field."""

    out: str | None = option("runs/ficgan", "output folder (checkpoint.pt, final.pt, metrics.json, samples/)")
    resume: bool = option(False, "continue from OUT/checkpoint.pt (an error when there is none)")
    quiet: bool = option(False, "no progress bar")
    data: str = option("builtin", "folder of aligned face crops, or 'builtin' (the built-in faces)")
    size: int = option(64, "image size (power of two, 64..256)", min=16)
    steps: int = option(10000, f"training steps (default 10000; with --data builtin and no other size option the "
                               f"quick built-in run: {BUILTIN_QUICK_STEPS} steps of train_builtin's CPU recipe)", min=0)
    batch_size: int = option(8, "images per step (at least 2: the identity swap needs two faces)", min=2)
    lr: float = option(1e-3)
    base_channels: int = option(32)
    max_channels: int = option(128)
    attr_channels: int = option(8)
    attr_group_channels: tuple[int, ...] | None = option(
        (2, 2, 0), "attribute-map widths of the coarse,middle,fine levels (default 2,2,0: no 64x64 and finer map; "
                   "0 removes a group's map)", parse=_int_list)
    attr_input: str = option("masked", "what the attribute encoder sees: the full image, or the image with the "
                             "identity ellipse (eyes, nose, mouth) replaced by its 4x4 low-pass",
                             choices=("full", "masked"))
    attr_mask_scale: float = option(1.55, "with --attr-input masked: radii of the masked ellipse relative to the "
                                    "metrics' identity region")
    id_spatial: int = option(32, "levels up to this resolution also get a linear map of the identity code as input "
                             "channels (0: off)")
    id_spatial_channels: int = option(8, "channels of those identity maps")
    recon_warmup: int = option(2000, "the first N steps train E_attr + G as an autoencoder only (L1 reconstruction, "
                               "no D, no identity loss)")
    warmup_lr: float | None = option(5e-3, "learning rate of the warm-up (default: --lr)")
    id_augment: bool = option(True, "identity loss on the output itself, not on a random view (scale, shift, "
                              "rotation, grey mix)")
    mix_prob: float = option(0.0, "fraction of identity-swapped samples whose target is the spherical mean of two "
                             "faces' codes (the kind of code de-identification feeds G)")
    id_blur: float = option(0.0, "Gaussian blur (sigma, pixels) of the output before the identity loss: identity "
                            "must come from face structure, not from pixel-level patterns (use about the data's "
                            "native blur)")
    center_identity: bool = option(True, "do not centre identity codes on the training set's mean embedding")
    id_loss: str = option("contrastive", choices=("cos", "centered", "contrastive"))
    id_tau: float = option(0.05, "temperature of the contrastive identity loss")
    swap_prob: float = option(0.5)
    w_id: float = option(2.0)
    w_rec: float = option(10.0)
    w_attr: float = option(1.0)
    w_adv: float = option(1.0)
    w_lowpass: float = option(10.0, "weight of the L1 between 8x8 low-pass images of output and input on "
                              "identity-swapped samples")
    w_chroma: float = option(10.0, "weight of the L1 between the colour (RGB minus luma) of output and input on "
                             "identity-swapped samples")
    r1_gamma: float = option(1.0)
    r1_every: int = option(4, min=1)
    sample_every: int = option(100, "write a sample grid PNG every N steps", min=0)
    checkpoint_every: int = option(200, min=0)
    log_every: int = option(10, min=1)
    amp: bool = option(True, "disable bf16 autocast on GPU")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    # --steps: no CLI default, so that --data builtin alone can pick the quick built-in run
    add_config_arguments(p, FICGANTrainConfig, skip=("workers",), defaults={"steps": None},
                         required=("data", "out"))
    add_json_argument(p)


def _emit(metrics: dict, target: str | None) -> None:
    emit_json({k: metrics[k] for k in ("final", "steps_done", "sec_per_step", "device")} | {"out": metrics["config"]["out"]},
              target)


def train_main(args) -> int:
    cfg = config_from_args(FICGANTrainConfig, args)
    if cfg.steps is None and cfg.data == "builtin":
        log(f"--data builtin without --steps: the quick built-in run, {BUILTIN_QUICK_STEPS} steps of train_builtin's "
            f"CPU recipe (16/64 channels, batch 6, 60 % reconstruction warm-up; on the CPU {BUILTIN_QUICK_THREADS} "
            "torch thread: these small convolutions run faster on one); give --steps for the full recipe")
        with torch_threads(BUILTIN_QUICK_THREADS if resolve_device(cfg.device).type == "cpu" else None):
            _emit(train_builtin(out=cfg.out, steps=BUILTIN_QUICK_STEPS, size=cfg.size, device=cfg.device,
                                resume=cfg.resume, quiet=cfg.quiet, seed=cfg.seed), args.json)
        return 0
    if cfg.steps is None:
        cfg.steps = FICGANTrainConfig.steps
    _emit(run_ficgan(cfg), args.json)
    return 0


def _step_generator(seed: int, step: int, rank: int, stream: int = 0) -> torch.Generator:
    """CPU generator of one step's random draws (``stream`` 0: the batch, 17: the identity-loss views):
    a function of (seed, step, rank) only, so a resumed run draws what an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + rank + stream)


def _step_batch(n_data: int, batch: int, seed: int, step: int, rank: int, swap_prob: float, mix_prob: float = 0.0):
    g = _step_generator(seed, step, rank)
    idx = torch.randint(0, n_data, (batch,), generator=g)
    flip = torch.rand(batch, generator=g) < 0.5
    swap = torch.rand(batch, generator=g) < swap_prob
    mix = (torch.rand(batch, generator=g) < mix_prob) & swap if mix_prob > 0 else torch.zeros(batch, dtype=torch.bool)
    return idx, flip, swap, mix


def train_ficgan(data: str = "builtin", size: int = 64, steps: int = 10000, out: str = "runs/ficgan", *,
                 identity_encoder=None, **settings) -> dict:
    """Train FICGAN; returns the metrics dict (also in ``out/metrics.json``).

    ``settings``: any other field of :class:`FICGANTrainConfig` (batch_size, lr, device,
    resume, seed, the loss weights...), defaults as there. ``identity_encoder``: a callable
    images -> embeddings replacing the dlib face encoder.

    Writes the run folder ``out``: ``checkpoint.pt`` (atomic, resumable with
    ``resume=True``), ``final.pt`` (final weights + model config),
    ``metrics.json``, ``samples/step_XXXXXX.png`` (rows: input, reconstruction
    with own identity, identity of the neighbour in the batch). Under
    ``torchrun`` gradients are averaged over ranks (data parallel).
    """
    return run_ficgan(FICGANTrainConfig(data=data, size=size, steps=steps, out=out, **settings), identity_encoder)


def run_ficgan(cfg: FICGANTrainConfig, identity_encoder=None) -> dict:
    """Train FICGAN as configured (see :func:`train_ficgan`)."""
    validate(cfg)
    if cfg.workers:
        raise UserError("--workers: FICGAN holds its images in memory and loads no data while training")
    cfg_run = {k: v for k, v in asdict(cfg).items() if k != "workers"}
    if cfg.attr_group_channels is not None:
        cfg_run["attr_group_channels"] = [int(c) for c in cfg.attr_group_channels]
    steps, recon_warmup = cfg.steps, cfg.recon_warmup
    with setup(cfg.device) as rt, RunDir(cfg.out, inputs=[("--data", cfg.data)], resume=cfg.resume, main=rt.main) as rd:
        seed_everything(cfg.seed)
        t = _FICGANTrainer(cfg_run, rt, rd, identity_encoder)
        t.hooks.append(CallbackHook(after_epoch=_after_step))
        if rt.main and 0 < steps <= recon_warmup:
            rt.log(f"pyfici train ficgan: note: all {steps} steps are the reconstruction warm-up (--recon-warmup "
                   f"{recon_warmup}); the GAN and identity losses start after it")
        t.t0 = time.time()
        t.train(t.start, steps, desc="ficgan", quiet=cfg.quiet, main=rt.main)
        return t.finish()


class _FICGANTrainer(Trainer):
    """One step per unit: the reconstruction warm-up, then a D step and a G/E_attr step."""

    def __init__(self, c: dict, rt, rd: RunDir, identity_encoder):
        super().__init__()
        self.c, self.rt, self.rd, self.dev = c, rt, rd, rt.device
        with user_errors():
            self.images, _names = load_face_folder(c["data"], c["size"])
        if len(self.images) < 2:
            raise UserError(f"--data {c['data']}: need at least 2 face images, found {len(self.images)}")
        # the model's structure: the FICGANConfig fields among the run's settings
        cfg = FICGANConfig(**{f.name: c[f.name] for f in fields(FICGANConfig) if f.name in c and f.name != "identity_encoder"},
                           identity_encoder="dlib" if identity_encoder is None else getattr(identity_encoder, "name", "custom"))
        if identity_encoder is not None:
            cfg.id_dim = int(identity_encoder(self.images[:2]).shape[1])
        self.cfg = cfg
        self.model = model = FICGAN(cfg, identity_encoder).to(self.dev)
        if isinstance(model.E_id, torch.nn.Module):
            model.E_id.to(self.dev)
        self.gen_params = list(model.E_attr.parameters()) + list(model.G.parameters())
        self.opt_g, self.opt_name = make_optimizer(self.gen_params, c["lr"])
        self.opt_d, _ = make_optimizer(model.D.parameters(), c["lr"])
        self.log_rows: list[dict] = []
        self.start = 0
        ck = rd.resume_checkpoint(KIND_TRAIN)
        if ck is not None:
            check_resume_config(ck["run"], c, ignore=_RESUME_IGNORE)
            model.load_weights(ck["weights"])
            self.opt_g.load_state_dict(ck["opt_g"])
            self.opt_d.load_state_dict(ck["opt_d"])
            self.start = int(ck["step"])
            self.log_rows = list(ck.get("history", []))
            if self.start > c["steps"]:
                raise UserError(f"--resume: checkpoint is at step {self.start}, beyond --steps {c['steps']}")
        model.train()
        if rt.distributed:
            _broadcast_params(self.gen_params + list(model.D.parameters()))
        self.use_amp = c["amp"] and self.dev.type == "cuda"
        self.ac = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if self.use_amp
                   else torch.autocast("cpu", enabled=False))
        self.sample_x = self.images[: min(8, len(self.images))].to(self.dev)
        self.images_dev = self.images.to(self.dev)
        self._embed_all()
        self.last: dict = {}

    @torch.no_grad()
    def _embed_all(self) -> None:
        """E_id is frozen and the data fixed: embed every image and its mirror once."""
        model, imgs, n = self.model, self.images_dev, len(self.images)
        self.z_all = torch.cat([model.identity(imgs[i:i + 32]) for i in range(0, n, 32)])
        self.z_all_flip = torch.cat([model.identity(imgs[i:i + 32].flip(-1)) for i in range(0, n, 32)])
        mean_all = torch.cat([self.z_all, self.z_all_flip]).mean(0)
        if self.c["center_identity"] and self.start == 0:
            model.G.id_mean.copy_(mean_all)  # the training set's mean identity (images and mirrors), saved with G
        self.mu = model.G.id_mean.clone() if self.c["center_identity"] else mean_all
        self.bank = F.normalize(torch.cat([self.z_all, self.z_all_flip]) - self.mu, dim=1)  # centred identity bank

    def run_epoch(self, step: int) -> None:
        c, dev = self.c, self.dev
        idx, flip, swap, mix = _step_batch(len(self.images), c["batch_size"], c["seed"], step, self.rt.rank,
                                           c["swap_prob"], c["mix_prob"])
        x = self.images_dev[idx.to(dev)]
        flip, swap, mix = flip.to(dev), swap.to(dev), mix.to(dev)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        z = torch.where(flip[:, None], self.z_all_flip[idx.to(dev)], self.z_all[idx.to(dev)])
        warm = step < c["recon_warmup"]
        for grp in self.opt_g.param_groups:  # the warm-up may run at its own learning rate
            grp["lr"] = c["warmup_lr"] if (warm and c["warmup_lr"] is not None) else c["lr"]
        self.last = self._warmup_step(step, x, z) if warm else self._gan_step(step, x, z, idx, flip, swap, mix)
        return None

    def _warmup_step(self, step: int, x, z) -> dict:
        """E_attr + G as an autoencoder (L1 reconstruction with the own code, no D, no identity loss)."""
        with self.ac:
            fake = self.model.G(self.model.E_attr(x), z)
        rec = F.l1_loss(fake.float(), x)
        self.opt_g.zero_grad(set_to_none=True)
        rec.backward()
        if self.rt.distributed:
            _allreduce_grads(self.gen_params, self.rt.world)
        self.opt_g.step()
        if not math.isfinite(float(rec.detach())):
            raise FloatingPointError(f"non-finite reconstruction loss at step {step + 1}")
        zero = 0.0
        return {"step": step + 1, "d_loss": zero, "r1": zero, "g_adv": zero, "id_loss": zero,
                "rec_l1": float(rec.detach()), "lowpass_l1": zero, "chroma_l1": zero, "attr_mse": zero,
                "sec": round(time.time() - self.t0, 2), "phase": "warmup"}

    def _targets(self, z, idx, flip, swap, mix):
        """Identity targets: swapped inside the batch for ``swap``, spherical means of two faces for ``mix``."""
        n, mu, bank = len(self.images), self.mu, self.bank
        z_t = torch.where(swap[:, None], z.roll(1, 0), z)
        bank_idx = idx.to(self.dev) + flip.long() * n
        t_idx = torch.where(swap, bank_idx.roll(1, 0), bank_idx)
        t2_idx = torch.where(mix, bank_idx.roll(2, 0), t_idx)  # second face of a mixed target (= t_idx when not mixed)
        if mix.any():
            # surrogate-like targets, as de-identification uses: the spherical mean of two faces' codes
            raw_mix = F.normalize(z.roll(1, 0) + z.roll(2, 0), dim=1)
            # G centres its input: mu + v becomes normalize(v), the spherical mean in the centred space
            m_code = mu + F.normalize(bank[t_idx] + bank[t2_idx], dim=1) if self.c["center_identity"] else raw_mix
            z_t_raw = torch.where(mix[:, None], raw_mix, z_t)  # the target of the plain "cos" identity loss
            z_t = torch.where(mix[:, None], m_code, z_t)
        else:
            z_t_raw = z_t
        return z_t, z_t_raw, t_idx, t2_idx

    def _d_step(self, step: int, x, z_t):
        c, D = self.c, self.model.D
        with self.ac:
            with torch.no_grad():
                fake = self.model.G(self.model.E_attr(x), z_t)
            d_loss = F.softplus(D(fake.float())).mean() + F.softplus(-D(x)).mean()
        r1 = torch.zeros((), device=self.dev)
        if c["r1_gamma"] > 0 and step % c["r1_every"] == 0:
            xr = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(D(xr).sum(), xr, create_graph=True)
            r1 = g.pow(2).sum(dim=(1, 2, 3)).mean() * (c["r1_gamma"] / 2) * c["r1_every"]
        self.opt_d.zero_grad(set_to_none=True)
        (d_loss.float() + r1).backward()
        if self.rt.distributed:
            _allreduce_grads(D.parameters(), self.rt.world)
        self.opt_d.step()
        return d_loss, r1

    def _identity_loss(self, step: int, fake, z_t_raw, t_idx, t2_idx):
        """Identity loss on a random view of the output (see the module docstring)."""
        c, mu, bank, n = self.c, self.mu, self.bank, len(self.images)
        view = fake.float()
        if c["id_blur"] > 0:
            view = _gaussian_blur(view, c["id_blur"])
        if c["id_augment"]:
            view = _augment(view, step, c["seed"], self.rt.rank)
        e_fake = self.model.identity(view)
        if c["id_loss"] == "cos":
            return (1 - (e_fake * z_t_raw).sum(1)).mean()
        # cosine in the centred identity space: different people of one face set are far apart there
        e_c = F.normalize(e_fake - mu, dim=1)
        t_vec = F.normalize(bank[t_idx] + bank[t2_idx], dim=1)  # = bank[t_idx] for a single target
        loss = (1 - (e_c * t_vec).sum(1)).mean()
        if c["id_loss"] != "contrastive":
            return loss
        # InfoNCE over every training identity: the output must be closer to its target than to any
        # other face, in particular to its source (a mixed target: equally close to both of its faces)
        logits = e_c @ bank.T / c["id_tau"]
        not_neg = torch.zeros_like(logits, dtype=torch.bool)
        for ti in (t_idx, t2_idx):  # the targets' mirrors: same people, not negatives
            not_neg.scatter_(1, ((ti + n) % (2 * n))[:, None], True)
        for ti in (t_idx, t2_idx):  # ... unless that mirror is itself a target
            not_neg.scatter_(1, ti[:, None], False)
        logits = logits.masked_fill(not_neg, float("-inf"))
        p_t = torch.zeros_like(logits).scatter_add_(1, t_idx[:, None], torch.full_like(e_c[:, :1], 0.5))
        p_t = p_t.scatter_add_(1, t2_idx[:, None], torch.full_like(e_c[:, :1], 0.5))
        return loss - (p_t * torch.log_softmax(logits, dim=1).clamp_min(-1e4)).sum(1).mean()

    def _gan_step(self, step: int, x, z, idx, flip, swap, mix) -> dict:
        c, model, dev = self.c, self.model, self.dev
        z_t, z_t_raw, t_idx, t2_idx = self._targets(z, idx, flip, swap, mix)
        d_loss, r1 = self._d_step(step, x, z_t)
        with self.ac:
            a = model.E_attr(x)
            fake = model.G(a, z_t)
            adv = F.softplus(-model.D(fake)).mean()
            a_fake = model.E_attr(fake)
            pairs = [(af, ar) for af, ar in zip(a_fake, a) if ar.shape[1] > 0]  # levels of width 0 carry nothing
            attr = sum((F.mse_loss(af.float(), ar.detach().float()) for af, ar in pairs),
                       torch.zeros((), device=dev)) / max(1, len(pairs))
        id_loss = self._identity_loss(step, fake, z_t_raw, t_idx, t2_idx)
        keep = ~swap
        zero = torch.zeros((), device=dev)
        rec = F.l1_loss(fake[keep].float(), x[keep]) if keep.any() else zero
        # swapped samples: only the 8x8 low-pass image (layout, lighting, colour; no identity detail) must match
        lowpass = (F.l1_loss(F.adaptive_avg_pool2d(fake[swap].float(), 8), F.adaptive_avg_pool2d(x[swap], 8))
                   if swap.any() and c["w_lowpass"] > 0 else zero)
        # swapped samples: colour (RGB minus luma) must stay the source's, at full resolution: an identity is
        # a face structure, and colour is where a recognizer-fooling pattern is cheapest to paint
        chroma = (F.l1_loss(_chroma(fake[swap].float()), _chroma(x[swap])) if swap.any() and c["w_chroma"] > 0 else zero)
        g_loss = (c["w_adv"] * adv.float() + c["w_id"] * id_loss + c["w_rec"] * rec + c["w_attr"] * attr.float()
                  + c["w_lowpass"] * lowpass + c["w_chroma"] * chroma)
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        if self.rt.distributed:
            _allreduce_grads(self.gen_params, self.rt.world)
        self.opt_g.step()
        if not all(math.isfinite(float(v.detach())) for v in (g_loss, d_loss)):
            raise FloatingPointError(f"non-finite loss at step {step + 1}: g={float(g_loss)} d={float(d_loss)}")
        return {"step": step + 1, "d_loss": float(d_loss.detach()), "r1": float(r1.detach()),
                "g_adv": float(adv.detach()), "id_loss": float(id_loss.detach()), "rec_l1": float(rec.detach()),
                "lowpass_l1": float(lowpass.detach()), "chroma_l1": float(chroma.detach()),
                "attr_mse": float(attr.detach()), "sec": round(time.time() - self.t0, 2)}

    def checkpoint(self, step: int) -> dict:
        return {"kind": KIND_TRAIN, "config": self.model.cfg.to_dict(), "run": self.c, "weights": self.model.weights(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "step": step,
                "history": self.log_rows}

    def finish(self) -> dict:
        c, steps = self.c, self.c["steps"]
        elapsed = time.time() - self.t0
        metrics = {"config": c, "model": self.cfg.to_dict(), "optimizer": self.opt_name, "device": str(self.dev),
                   "world_size": self.rt.world, "amp_bf16": self.use_amp, "images": len(self.images),
                   "steps_done": steps, "steps_this_run": steps - self.start, "seconds_this_run": round(elapsed, 2),
                   "sec_per_step": round(elapsed / max(1, steps - self.start), 4), "final": self.last,
                   "history": self.log_rows}
        if self.rt.main:
            if steps == self.start and not self.rd.checkpoint.exists():
                self.rd.save_checkpoint(self.checkpoint(steps))
            self.rd.save_final({"kind": KIND_FINAL, "config": self.cfg.to_dict(), "weights": self.model.weights(),
                                "step": steps})
            self.rd.write_metrics(metrics)
        self.rt.barrier()
        return metrics


def _after_step(t: _FICGANTrainer, step: int, _record) -> None:
    """Rank 0 after each step: history / progress bar, sample grid, atomic checkpoint."""
    if not t.rt.main:
        return
    c, done, last = t.c, step + 1, t.last
    if done % c["log_every"] == 0 or done == c["steps"]:
        t.log_rows.append(last)
        if hasattr(t.bar, "set_postfix"):
            if last.get("phase") == "warmup":
                t.bar.set_postfix(phase="warm-up", rec=f"{last['rec_l1']:.3f}")
            else:
                t.bar.set_postfix(id=f"{last['id_loss']:.3f}", rec=f"{last['rec_l1']:.3f}", d=f"{last['d_loss']:.2f}")
    if c["sample_every"] and (done % c["sample_every"] == 0 or done == c["steps"]):
        _write_samples(t.model, t.sample_x, t.rd.file("samples") / f"step_{done:06d}.png")
    if c["checkpoint_every"] and (done % c["checkpoint_every"] == 0 or done == c["steps"]):
        t.rd.save_checkpoint(t.checkpoint(done))


def _chroma(x: torch.Tensor) -> torch.Tensor:
    """RGB minus its luma (BT.601): the colour of an image without its brightness; 0 for grey images."""
    return x - luma(x)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (sigma in pixels, reflect padding), differentiable."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _augment(x: torch.Tensor, step: int, seed: int, rank: int) -> torch.Tensor:
    """Random differentiable view of the generated faces for the identity loss: scale 0.9..1.1, shift up to
    6 % of the side, rotation up to 5 degrees, and a random mix towards grey (0..1). A pattern that fools the
    recognizer in one exact view only (the colour blobs of runs e2/e10 in docs/ficgan.md) does not survive
    it, a face does. Seeded by (seed, step, rank) like the batch, so resumed runs stay exact."""
    g = _step_generator(seed, step, rank, stream=17)
    n = x.shape[0]
    u = torch.rand(n, 5, generator=g).to(x.device, x.dtype)
    sc = 0.9 + 0.2 * u[:, 0]
    ang = (u[:, 1] - 0.5) * (2 * math.pi * 5 / 180)
    tx, ty = (u[:, 2] - 0.5) * 0.12, (u[:, 3] - 0.5) * 0.12
    theta = torch.stack([torch.stack([sc * torch.cos(ang), -sc * torch.sin(ang), tx], 1),
                         torch.stack([sc * torch.sin(ang), sc * torch.cos(ang), ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    grey = luma(y).expand_as(y)
    w = u[:, 4].view(n, 1, 1, 1)
    return y * (1 - w) + grey * w


def _broadcast_params(params) -> None:
    import torch.distributed as dist

    for p in params:
        dist.broadcast(p.data, src=0)


def _allreduce_grads(params, world: int) -> None:
    """Average gradients over ranks (what DDP does; see docs/ficgan.md for why
    the DDP wrapper itself is not used: several D calls per backward and the R1
    double-backward)."""
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


@torch.no_grad()
def _write_samples(model: FICGAN, x: torch.Tensor, path: Path) -> None:
    was = model.training
    model.eval()
    z = model.identity(x)
    rows = [x, model.generate(x, z), model.generate(x, z.roll(1, 0))]
    save_grid(rows, path)
    model.train(was)


def load_ficgan(checkpoint: str | os.PathLike, identity_encoder=None, device: str | torch.device = "cpu") -> FICGAN:
    """Load ``final.pt`` (or a training ``checkpoint.pt``) into an eval-mode :class:`FICGAN`."""
    ck = load_checkpoint(checkpoint, kind=(KIND_FINAL, KIND_TRAIN), what="FICGAN checkpoint")
    if "config" not in ck or "weights" not in ck:
        raise UserError(f"{checkpoint}: not a FICGAN checkpoint (written by pyfici train ficgan)")
    cfg = FICGANConfig(**ck["config"])
    model = FICGAN(cfg, identity_encoder)
    try:
        model.load_weights(ck["weights"])
    except (RuntimeError, KeyError, TypeError):
        raise UserError(f"{checkpoint}: its weights do not match its FICGAN configuration") from None
    model.to(device).eval()
    if isinstance(model.E_id, torch.nn.Module):
        model.E_id.to(device)
    return model


def train_builtin(out: str | os.PathLike = "runs/ficgan_builtin", steps: int = 1000, size: int = 64,
                  device: str = "cpu", **kw) -> dict:
    """Short FICGAN run on the built-in faces: :func:`train_ficgan`'s recipe at
    CPU-friendly widths (base 16 / max 64 channels, batch 6) with the first
    60 % of the steps as the reconstruction warm-up. About 2.5 min for 1,000
    steps on one CPU thread (docs/ficgan.md, section 5, run D). Returns the
    metrics; weights in ``out/final.pt``."""
    kw.setdefault("base_channels", 16)
    kw.setdefault("max_channels", 64)
    kw.setdefault("batch_size", 6)
    kw.setdefault("recon_warmup", int(round(0.6 * steps)))
    kw.setdefault("sample_every", max(1, steps // 5))
    kw.setdefault("checkpoint_every", max(1, steps // 5))
    return train_ficgan("builtin", size=size, steps=steps, out=str(out), device=device, **kw)
