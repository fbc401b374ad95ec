"""The paper's noise-prediction UNet, its presets, and the segment map.

The network is the "annotated diffusion" UNet built from ConvNeXt blocks, exactly as the
paper's training code defines it (see the handbook's paper.md, section 1). The module
attribute names (`init_conv`, `time_mlp`, `downs`, `mid_block1`, `mid_attn`, `mid_block2`,
`ups`, `final_conv`) are part of the wire format: parameter names travel in safetensors files
and decide each parameter's segment.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .errors import UserError

SEGMENTS: tuple[str, ...] = ("encoder", "bottleneck", "decoder")

# Top-level module name -> segment. The time MLP counts as encoder (paper.md section 1).
_SEGMENT_OF_MODULE: dict[str, str] = {
    "init_conv": "encoder",
    "time_mlp": "encoder",
    "downs": "encoder",
    "mid_block1": "bottleneck",
    "mid_attn": "bottleneck",
    "mid_block2": "bottleneck",
    "ups": "decoder",
    "final_conv": "decoder",
}


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a UNet. `dim` is the base width; the paper sets it to the image side."""

    image_size: int
    channels: int
    dim: int
    dim_mults: tuple[int, ...] = (1, 2, 4)
    init_dim: int | None = None  # None: dim // 3 * 2, as in the paper
    convnext_mult: int = 2
    # Per resolution level (shallow to deep): whether the level has a linear-attention layer.
    linear_attention: tuple[bool, ...] | None = None  # None: every level, as in the paper
    mid_attention: bool = True
    heads: int = 4
    dim_head: int = 32

    def resolved_init_dim(self) -> int:
        return self.init_dim if self.init_dim is not None else self.dim // 3 * 2

    def resolved_linear_attention(self) -> tuple[bool, ...]:
        if self.linear_attention is None:
            return (True,) * len(self.dim_mults)
        if len(self.linear_attention) != len(self.dim_mults):
            raise ValueError("linear_attention needs one flag per entry of dim_mults")
        return self.linear_attention

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    name: str
    config: UNetConfig
    description: str
    batch_size: int = 128


PRESETS: dict[str, Preset] = {
    "paper-fmnist": Preset(
        "paper-fmnist",
        UNetConfig(image_size=28, channels=1, dim=28),
        "The paper's Fashion-MNIST UNet (28x28x1, 2,996,315 parameters).",
        batch_size=128,
    ),
    "paper-celeba": Preset(
        "paper-celeba",
        UNetConfig(image_size=64, channels=3, dim=64),
        "The paper's CelebA UNet (64x64x3, 14,892,477 parameters).",
        batch_size=64,
    ),
    "tiny": Preset(
        "tiny",
        UNetConfig(
            image_size=28,
            channels=1,
            dim=16,
            dim_mults=(1, 2, 4),
            linear_attention=(False, False, True),
            mid_attention=True,
        ),
        "A CPU-sized Fashion-MNIST UNet (1,009,111 parameters), attention only at 7x7.",
        batch_size=128,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        choices = ", ".join(PRESETS)
        raise UserError(f"Unknown preset {name!r}; choose one of: {choices}.") from None


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of the diffusion step (no parameters)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError("time embedding size must be even and at least 4")
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        scale = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -scale)
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block with an optional additive time conditioning (Liu et al., 2022)."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int | None, mult: int = 2) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(time_dim, dim_in)) if time_dim else None
        self.ds_conv = nn.Conv2d(dim_in, dim_in, 7, padding=3, groups=dim_in)
        self.net = nn.Sequential(
            nn.GroupNorm(1, dim_in),
            nn.Conv2d(dim_in, dim_out * mult, 3, padding=1),
            nn.GELU(),
            nn.GroupNorm(1, dim_out * mult),
            nn.Conv2d(dim_out * mult, dim_out, 3, padding=1),
        )
        self.res_conv = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ds_conv(x)
        if self.mlp is not None and t is not None:
            h = h + self.mlp(t)[:, :, None, None]
        return self.net(h) + self.res_conv(x)


class LinearAttention(nn.Module):
    """Linear attention (Shen et al.): softmax over channels for q, over positions for k."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=1)
        q, k, v = (z.reshape(b, self.heads, -1, h * w) for z in (q, k, v))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


class Attention(nn.Module):
    """Multi-head scaled dot-product self-attention over spatial positions."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=1)
        # (b, heads, positions, dim_head)
        q, k, v = (z.reshape(b, self.heads, self.dim_head, h * w).transpose(-1, -2)
                   for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))


class PreNormResidual(nn.Module):
    """x + fn(GroupNorm(1, dim)(x)); parameter names match Residual(PreNorm(fn))."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = _PreNorm(dim, fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.norm = nn.GroupNorm(1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


# --------------------------------------------------------------------------------------
# The UNet
# --------------------------------------------------------------------------------------


class UNet(nn.Module):
    """Noise predictor eps_theta(x_t, t) of the paper. Holds parameters only, no buffers."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        init_dim = config.resolved_init_dim()
        time_dim = dim * 4
        mult = config.convnext_mult
        heads, dim_head = config.heads, config.dim_head
        attn_flags = config.resolved_linear_attention()

        self.init_conv = nn.Conv2d(config.channels, init_dim, 7, padding=3)
        self.time_mlp = nn.Sequential(
            SinusoidalTimeEmbedding(dim),
            nn.Linear(dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim),
        )

        dims = [init_dim, *(dim * m for m in config.dim_mults)]
        levels = list(zip(dims[:-1], dims[1:], strict=True))
        n_levels = len(levels)

        def linear_attn(d: int, enabled: bool) -> nn.Module:
            if not enabled:
                return nn.Identity()
            return PreNormResidual(d, LinearAttention(d, heads, dim_head))

        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(levels):
            last = i == n_levels - 1
            self.downs.append(nn.ModuleList([
                ConvNeXtBlock(d_in, d_out, time_dim, mult),
                ConvNeXtBlock(d_out, d_out, time_dim, mult),
                linear_attn(d_out, attn_flags[i]),
                nn.Conv2d(d_out, d_out, 4, 2, 1) if not last else nn.Identity(),
            ]))

        mid = dims[-1]
        self.mid_block1 = ConvNeXtBlock(mid, mid, time_dim, mult)
        self.mid_attn = (PreNormResidual(mid, Attention(mid, heads, dim_head))
                         if config.mid_attention else nn.Identity())
        self.mid_block2 = ConvNeXtBlock(mid, mid, time_dim, mult)

        # Only the deeper levels have an up path, deepest first; each upsamples.
        self.ups = nn.ModuleList()
        up_levels = list(enumerate(levels))[1:]
        for i, (d_in, d_out) in reversed(up_levels):
            self.ups.append(nn.ModuleList([
                ConvNeXtBlock(d_out * 2, d_in, time_dim, mult),
                ConvNeXtBlock(d_in, d_in, time_dim, mult),
                linear_attn(d_in, attn_flags[i]),
                nn.ConvTranspose2d(d_in, d_in, 4, 2, 1),
            ]))

        self.final_conv = nn.Sequential(
            ConvNeXtBlock(dim, dim, None, mult),
            nn.Conv2d(dim, config.channels, 1),
        )
        self._check_geometry()

    def _check_geometry(self) -> None:
        n_down = len(self.config.dim_mults) - 1
        n_up = len(self.ups)
        if n_down != n_up:
            raise ValueError("the up path must undo every downsampling")
        if self.config.image_size % (2**n_down):
            raise ValueError(f"image size must be divisible by {2**n_down}")

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.init_conv(x)
        temb = self.time_mlp(t)
        skips = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, temb)
            x = block2(x, temb)
            x = attn(x)
            skips.append(x)
            x = down(x)
        x = self.mid_block1(x, temb)
        x = self.mid_attn(x)
        x = self.mid_block2(x, temb)
        for block1, block2, attn, up in self.ups:
            x = torch.cat((x, skips.pop()), dim=1)
            x = block1(x, temb)
            x = block2(x, temb)
            x = attn(x)
            x = up(x)
        return self.final_conv(x)


def build_unet(preset: str | Preset | UNetConfig, seed: int | None = None) -> UNet:
    """Build a UNet; with `seed`, its initial weights are the same on every call."""
    if isinstance(preset, str):
        preset = get_preset(preset)
    config = preset.config if isinstance(preset, Preset) else preset
    if seed is None:
        return UNet(config)
    # PyTorch's initialisers draw from the global generator: fork it so we leave it untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(config)


# --------------------------------------------------------------------------------------
# Segments
# --------------------------------------------------------------------------------------


def segment_of(param_name: str) -> str:
    """The segment (encoder, bottleneck, decoder) a parameter name belongs to."""
    top = param_name.split(".", 1)[0]
    try:
        return _SEGMENT_OF_MODULE[top]
    except KeyError:
        raise KeyError(f"parameter {param_name!r} belongs to no segment") from None


def segment_map(model: nn.Module) -> dict[str, str]:
    """Parameter name -> segment, for every parameter of `model` (in state_dict order)."""
    return {name: segment_of(name) for name, _ in model.named_parameters()}


def segment_names(model: nn.Module, segments: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the parameters in the given segments, in state_dict order."""
    wanted = set(segments)
    unknown = wanted - set(SEGMENTS)
    if unknown:
        raise ValueError(f"unknown segments: {sorted(unknown)}")
    return [n for n, _ in model.named_parameters() if segment_of(n) in wanted]


def count_parameters(model: nn.Module) -> dict:
    """Total and per-segment parameter counts."""
    per_segment = dict.fromkeys(SEGMENTS, 0)
    for name, p in model.named_parameters():
        per_segment[segment_of(name)] += p.numel()
    return {"total_params": sum(per_segment.values()), "segments": per_segment}

