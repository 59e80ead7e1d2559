"""FICGAN networks (our design; the paper publishes no code, see docs/ficgan.md).

- :class:`AttributeEncoder` E_attr: image -> attribute maps at every
  resolution from ``size`` down to 8x8 (narrow: ``attr_channels`` each).
- :class:`Generator` G(attr maps, identity codes): from 8x8 up to ``size``;
  each resolution is one *level* with two 3x3 convs, each followed by
  AdaIN-style modulation (instance norm, then per-channel scale/shift predicted
  from that level's identity code). The attribute map of the level is
  concatenated before the convs. Levels are split into three contiguous groups
  ``coarse`` / ``middle`` / ``fine``; each group may take its own identity
  code (attribute-wise control).
- :class:`Discriminator` D: PatchGAN (strided convs to an (size/8)^2 map of
  logits), non-saturating loss with R1.
- Identity encoder E_id: any frozen callable ``[N,3,S,S] in [-1,1] -> [N,D]``
  L2-normalised (default :class:`pyfici.models.dlib_face.DlibFaceEncoder`).

Shapes: images ``[N, 3, S, S]`` float in [-1, 1]; identity codes ``[N, D]``
unit-norm; ``S`` a power of two in 64..256.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = ("coarse", "middle", "fine")


@dataclass
class FICGANConfig:
    size: int = 64
    id_dim: int = 128
    base_channels: int = 32  # generator / discriminator width at the highest resolution
    max_channels: int = 128
    attr_channels: int = 8  # width of each attribute map (the bottleneck that limits identity leakage)
    identity_encoder: str = "dlib"
    # attribute-map width per level group (coarse, middle, fine); None: attr_channels everywhere. 0 removes
    # the attribute input of that group entirely (no identity can pass there).
    attr_group_channels: list[int] | None = None
    # centre identity codes on the training set's mean embedding (stored as G.id_mean) before modulation
    center_identity: bool = False
    # what E_attr sees: "full" image, or "masked": the central identity ellipse (eyes, nose, mouth) replaced
    # by a 4x4 low-pass of the image (lighting / skin tone only), feathered, so fine identity cannot pass
    attr_input: str = "full"
    attr_mask_scale: float = 1.0  # radii of the masked ellipse relative to the identity region of pyfici.deid.metrics
    # identity also enters spatially: at every level with resolution <= id_spatial, a linear map of that
    # level's identity code to a [id_spatial_channels, r, r] map is concatenated to the level input
    # (0: modulation only). Gives G a direct route from the code to the face layout of that identity.
    id_spatial: int = 0
    id_spatial_channels: int = 16

    def validate(self) -> None:
        if self.size < 64 or self.size > 256 or self.size & (self.size - 1):
            raise ValueError(f"size must be a power of two between 64 and 256, got {self.size}")
        for k in ("id_dim", "base_channels", "max_channels", "attr_channels"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1")
        if self.id_spatial and (self.id_spatial < 8 or self.id_spatial & (self.id_spatial - 1) or self.id_spatial_channels < 1):
            raise ValueError(f"id_spatial must be 0 or a power of two >= 8 (and id_spatial_channels >= 1), got {self.id_spatial}")
        if not 0.5 <= self.attr_mask_scale <= 2.0:
            raise ValueError(f"attr_mask_scale must be in [0.5, 2], got {self.attr_mask_scale}")
        if self.attr_input not in ("full", "masked"):
            raise ValueError(f"attr_input must be 'full' or 'masked', got {self.attr_input!r}")
        if self.attr_group_channels is not None and (len(self.attr_group_channels) != 3 or min(self.attr_group_channels) < 0):
            raise ValueError(f"attr_group_channels must be three widths >= 0 (coarse, middle, fine), got {self.attr_group_channels}")

    @property
    def resolutions(self) -> list[int]:
        return [8 * 2**i for i in range(int(math.log2(self.size // 8)) + 1)]

    def channels(self, res: int) -> int:
        return min(self.max_channels, self.base_channels * self.size // res)

    def attr_widths(self) -> list[int]:
        """Attribute-map width of every level, coarse to fine."""
        n = len(self.resolutions)
        if self.attr_group_channels is None:
            return [self.attr_channels] * n
        out = [0] * n
        for gi, idx in enumerate(level_groups(n).values()):
            for i in idx:
                out[i] = int(self.attr_group_channels[gi])
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def level_groups(n_levels: int) -> dict[str, list[int]]:
    """Split level indices 0..n-1 (coarse to fine) into three contiguous groups."""
    idx = list(range(n_levels))
    sizes = [n_levels // 3 + (1 if i < n_levels % 3 else 0) for i in range(3)]
    out, s = {}, 0
    for g, n in zip(GROUPS, sizes):
        out[g] = idx[s : s + n]
        s += n
    return out


def identity_mask(size: int, feather: float = 0.15, scale: float = 1.0) -> torch.Tensor:
    """``[1, 1, size, size]`` soft mask, 1 inside the identity ellipse of
    :func:`pyfici.deid.metrics` (centre 0.55 H / 0.5 W, radii 0.32 H / 0.27 W),
    falling to 0 over ``feather`` of the radius outside it; ``scale`` multiplies both radii."""
    from pyfici.deid.metrics import identity_region_r2

    r = torch.sqrt(identity_region_r2(size, scale))
    return ((1 + feather - r) / feather).clamp(0, 1)[None, None]


def mask_identity_region(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace the identity ellipse of ``x`` by its 4x4 low-pass image (feathered)."""
    low = F.interpolate(F.adaptive_avg_pool2d(x, 4), size=x.shape[-2:], mode="bilinear", align_corners=False)
    m = mask.to(x.dtype)
    return x * (1 - m) + low * m


class AttributeEncoder(nn.Module):
    def __init__(self, cfg: FICGANConfig):
        super().__init__()
        self.masked = cfg.attr_input == "masked"
        if self.masked:
            self.register_buffer("mask", identity_mask(cfg.size, scale=cfg.attr_mask_scale), persistent=False)
        res = cfg.resolutions[::-1]  # size ... 8
        widths = cfg.attr_widths()[::-1]  # fine ... coarse
        self.stem = nn.Conv2d(3, cfg.channels(res[0]), 3, padding=1)
        self.down = nn.ModuleList()
        self.heads = nn.ModuleList([nn.Conv2d(cfg.channels(res[0]), max(1, widths[0]), 1)])
        self.widths = widths
        for w, r_in, r_out in zip(widths[1:], res[:-1], res[1:]):
            self.down.append(nn.Sequential(
                nn.Conv2d(cfg.channels(r_in), cfg.channels(r_out), 4, stride=2, padding=1),
                nn.LeakyReLU(0.2),
                nn.Conv2d(cfg.channels(r_out), cfg.channels(r_out), 3, padding=1),
                nn.LeakyReLU(0.2),
            ))
            self.heads.append(nn.Conv2d(cfg.channels(r_out), max(1, w), 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """-> attribute maps coarse to fine: ``[N, attr_channels, r, r]`` for
        r = 8 ... size, bounded to (-1, 1) by tanh (keeps the attribute
        consistency loss on a fixed scale). A level of width 0 gets an empty
        ``[N, 0, r, r]`` map."""
        if self.masked:
            x = mask_identity_region(x, self.mask)
        h = F.leaky_relu(self.stem(x), 0.2)

        def head_out(head, h, w):
            return torch.tanh(head(h)) if w > 0 else h.new_zeros(h.shape[0], 0, h.shape[2], h.shape[3])

        maps = [head_out(self.heads[0], h, self.widths[0])]
        for d, head, w in zip(self.down, self.heads[1:], self.widths[1:]):
            h = d(h)
            maps.append(head_out(head, h, w))
        return maps[::-1]


class ModConv(nn.Module):
    """3x3 conv -> instance norm -> identity-predicted scale/shift -> LeakyReLU."""

    def __init__(self, cin: int, cout: int, id_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.style = nn.Linear(id_dim, 2 * cout)
        nn.init.zeros_(self.style.weight)
        nn.init.zeros_(self.style.bias)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = F.instance_norm(self.conv(x))
        gamma, beta = self.style(z)[:, :, None, None].chunk(2, dim=1)
        return F.leaky_relu(h * (1 + gamma) + beta, 0.2)


class Generator(nn.Module):
    def __init__(self, cfg: FICGANConfig):
        super().__init__()
        self.cfg = cfg
        res = cfg.resolutions
        self.const = nn.Parameter(torch.randn(1, cfg.channels(res[0]), 8, 8) * 0.1)
        self.levels = nn.ModuleList()
        prev = cfg.channels(res[0])
        self.id_maps = nn.ModuleList()
        for r, aw in zip(res, cfg.attr_widths()):
            c = cfg.channels(r)
            sw = cfg.id_spatial_channels if r <= cfg.id_spatial else 0
            if sw:
                self.id_maps.append(nn.Linear(cfg.id_dim, sw * r * r))
            self.levels.append(nn.ModuleList([ModConv(prev + aw + sw, c, cfg.id_dim), ModConv(c, c, cfg.id_dim)]))
            prev = c
        self.to_rgb = nn.Conv2d(prev, 3, 1)
        self.groups = level_groups(len(res))
        # training-set mean identity embedding (zeros: no centring); see center_codes
        self.register_buffer("id_mean", torch.zeros(cfg.id_dim))

    def center_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Map unit identity embeddings into the generator's code space:
        ``normalize(z - id_mean)`` with ``center_identity``, else ``z``. The
        dlib embeddings of one face set are concentrated around their mean, so
        centring spreads identities over the whole sphere."""
        if not self.cfg.center_identity:
            return z
        return F.normalize(z - self.id_mean.to(z.dtype), dim=-1)

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    def per_level_codes(self, codes: torch.Tensor | dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One identity code ``[N, D]`` for every level from a single code or a
        dict ``{"coarse": z1, "middle": z2, "fine": z3}``."""
        if isinstance(codes, torch.Tensor):
            return [codes] * self.n_levels
        missing = [g for g in GROUPS if g not in codes]
        if missing:
            raise ValueError(f"identity codes missing for groups {missing}")
        out = [None] * self.n_levels
        for g, idx in self.groups.items():
            for i in idx:
                out[i] = codes[g]
        return out  # type: ignore[return-value]

    def forward(self, attrs: list[torch.Tensor], codes: torch.Tensor | dict[str, torch.Tensor],
                centered: bool = False) -> torch.Tensor:
        """``codes``: identity embeddings (``centered=False``) or codes already
        mapped by :meth:`center_codes` (``centered=True``)."""
        zs = self.per_level_codes(codes)
        if not centered:
            zs = [self.center_codes(z) for z in zs]
        n = attrs[0].shape[0]
        h = self.const.expand(n, -1, -1, -1)
        for i, (level, a, z) in enumerate(zip(self.levels, attrs, zs)):
            if i > 0:
                h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
            parts = [h, a]
            if i < len(self.id_maps):
                r = h.shape[-1]
                parts.append(self.id_maps[i](z.to(h.dtype)).view(n, -1, r, r))
            h = level[0](torch.cat(parts, dim=1), z)
            h = level[1](h, z)
        return torch.tanh(self.to_rgb(h))


class Discriminator(nn.Module):
    def __init__(self, cfg: FICGANConfig):
        super().__init__()
        res = cfg.resolutions[::-1]
        layers: list[nn.Module] = [nn.Conv2d(3, cfg.channels(res[0]), 3, padding=1), nn.LeakyReLU(0.2)]
        for r_in, r_out in zip(res[:-1], res[1:]):
            layers += [nn.Conv2d(cfg.channels(r_in), cfg.channels(r_out), 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(cfg.channels(res[-1]), 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """-> patch logits ``[N, 1, 8, 8]``."""
        return self.net(x)


class FICGAN(nn.Module):
    """E_attr + G + D, with a (frozen, not saved) identity encoder attached."""

    def __init__(self, cfg: FICGANConfig, identity_encoder: nn.Module | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.E_attr = AttributeEncoder(cfg)
        self.G = Generator(cfg)
        self.D = Discriminator(cfg)
        self._E_id = [identity_encoder]  # list: not a registered submodule, not in state_dict

    @property
    def E_id(self):
        if self._E_id[0] is None:
            self._E_id[0] = default_identity_encoder(self.cfg.identity_encoder)
        return self._E_id[0]

    def set_identity_encoder(self, enc) -> None:
        self._E_id[0] = enc

    def identity(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised identity embeddings ``[N, id_dim]``."""
        z = self.E_id(x)
        if z.dim() != 2 or z.shape[1] != self.cfg.id_dim:
            raise ValueError(f"identity encoder returned shape {tuple(z.shape)}, expected [N, {self.cfg.id_dim}]")
        return F.normalize(z.float(), dim=1)

    def generate(self, x: torch.Tensor, codes: torch.Tensor | dict[str, torch.Tensor], centered: bool = False) -> torch.Tensor:
        return self.G(self.E_attr(x), codes, centered=centered)

    def center_codes(self, z: torch.Tensor) -> torch.Tensor:
        return self.G.center_codes(z)

    def weights(self) -> dict:
        return {"E_attr": self.E_attr.state_dict(), "G": self.G.state_dict(), "D": self.D.state_dict()}

    def load_weights(self, w: dict) -> None:
        self.E_attr.load_state_dict(w["E_attr"])
        g = dict(w["G"])
        g.setdefault("id_mean", torch.zeros(self.cfg.id_dim))  # checkpoints from before identity centring
        self.G.load_state_dict(g)
        self.D.load_state_dict(w["D"])


_ENCODERS: dict[str, nn.Module] = {}


def default_identity_encoder(name: str = "dlib") -> nn.Module:
    """The identity encoder named in a config (``"dlib"``: the pyfici port of
    dlib's face-recognition ResNet, 128-d). Other encoders are passed as objects."""
    if name not in _ENCODERS:
        if name != "dlib":
            raise ValueError(f"identity encoder {name!r} is not built in; pass the encoder object (identity_encoder=...)")
        from pyfici.models.dlib_face import DlibFaceEncoder

        _ENCODERS[name] = DlibFaceEncoder()
    return _ENCODERS[name]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between unit vectors (rows), ``t`` in [0, 1]."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    if t <= 0:
        return a
    if t >= 1:
        return b
    dot = (a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7)
    om = torch.acos(dot)
    so = torch.sin(om)
    out = torch.where(so > 1e-6, (torch.sin((1 - t) * om) * a + torch.sin(t * om) * b) / so.clamp_min(1e-12), (1 - t) * a + t * b)
    return F.normalize(out, dim=-1)
