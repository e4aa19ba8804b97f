"""The super-resolver (MagicVideo's third stage): frames x4, steady over time.

MagicVideo samples at low resolution and raises it with a separately trained upscaler. Here
that upscaler is a one-step regression network in pixel space: it predicts a residual over
the bicubic upsample of each frame. Its body runs at the *input* resolution (3x3
convolutions, a few residual blocks) and a PixelShuffle makes the output, so it costs a few
hundred MFLOP per 64x64 frame. A 4x enlargement of this world's flat-coloured shapes is
well-posed (the edges are the unknown, not invented texture), so one pass does what a
diffusion refiner would do at many times the cost.

Temporal layers (``TemporalConv``) are small convolutions over the frame axis (3 taps by
default) inside the residual blocks, zero-initialised, so the model without them
(``UpscalerConfig.temporal=False``) is the same network minus those layers. They let a
frame see its neighbours and keep still background steady where a per-frame upscaler
flickers with its input's noise. No attention over the video: cost is linear in pixels and
frames.

    model = VideoUpscaler(UpscalerConfig())
    big = upscale(model, frames)   # [F, H, W, 3] in 0..1 -> [F, 4H, 4W, 3]

Two optional guides carry what the pipeline knows besides the frames. ``latent_channels``:
the VAE latents the frames were decoded from (``upscale(model, frames, latents=z)``), read by
a branch of residual blocks at the latent grid, raised to the frames' size by learned 2x
steps and added to the body's first features through a zero-initialised convolution.
``text_channels``: the prompt's embeddings (``text=``), pooled by a learned query and turned
into per-channel shifts of the body's first and last features (:class:`TextShift`), because
the small VideoVAE shifts background colours that the frames alone cannot tell apart and the
prompt names. Both start at zero, so such a model starts as the pixel model it was grown
from; trained with each guide left out of a share of batches, it also takes frames alone (a
loaded video). What each adds is measured in ``docs/TRAINING.md`` ("Super-resolution"): the
prompt a little, the latents nothing measurable.

:func:`upscale` runs frames in chunks that overlap by the temporal receptive field, so a
chunked run gives the frames of a whole one; frames larger than ``tile`` input pixels are
cut into overlapping tiles (each with its context around it), blended linearly across the seams.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import config

__all__ = ["UpscalerConfig", "VideoUpscaler", "TemporalConv", "upscale", "check_frames", "check_latents", "check_text",
           "MIN_SIZE", "MAX_SIZE"]

MIN_SIZE = 4  # input side: bicubic and the 3x3 convolutions' replicate padding need a few pixels
MAX_SIZE = 2048  # input side: 8192 px output, the largest a host IMAGE of sane size holds


@dataclass(frozen=True)
class UpscalerConfig:
    scale: int = 4
    channels: int = 32
    blocks: int = 4
    temporal: bool = True  # a TemporalConv in every residual block
    temporal_kernel: int = 3
    latent_channels: int = 0  # > 0: also reads the VAE latents of the frames (the default's VideoVAE: 4)
    latent_down: int = 8  # frame pixels per latent cell (a power of 2)
    latent_blocks: int = 2  # residual blocks at the latent grid
    latent_scale: float = 1.0  # multiplies the latents as given (raw VAE latents): the VAE's scaling factor
    text_channels: int = 0  # > 0: also reads the prompt's embeddings [tokens, text_channels] (the default's: 128)

    def __post_init__(self):
        if self.scale < 1 or self.channels < 1 or self.blocks < 1:
            raise ValueError(f"scale, channels and blocks must be positive: {self}")
        if self.temporal_kernel < 1 or self.temporal_kernel % 2 == 0:
            raise ValueError(f"temporal_kernel must be odd: {self.temporal_kernel}")
        if self.text_channels < 0:
            raise ValueError(f"text_channels must be >= 0: {self}")
        if self.latent_channels < 0 or self.latent_blocks < 0 or self.latent_down < 1 \
                or self.latent_down & (self.latent_down - 1):
            raise ValueError(f"latent_channels and latent_blocks must be >= 0 and latent_down a power of 2: {self}")

    @property
    def temporal_reach(self) -> int:
        """Frames on each side that an output frame depends on."""
        blocks = self.blocks + (self.latent_blocks if self.latent_channels else 0)
        return blocks * (self.temporal_kernel // 2) if self.temporal else 0

    @property
    def spatial_reach(self) -> int:
        """Input pixels on each side that an output pixel depends on (convs + bicubic; the latent
        branch's convolutions at the latent grid and its 2x steps when it has one)."""
        reach = 2 * self.blocks + 2 + 2
        if self.latent_channels:
            reach += (2 * self.latent_blocks + 2) * self.latent_down + 2 * self.latent_down.bit_length()
        return reach

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UpscalerConfig":
        return config.from_dict(cls, d)


class TemporalConv(nn.Module):
    """A per-position convolution over the frame axis: ``x + conv_t(x)`` with replicated ends.

    Zero-initialised, so a model starts as its per-frame self."""

    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv3d(channels, channels, (kernel, 1, 1))
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        v = rearrange(x, "(b f) c h w -> b c f h w", f=frames)
        pad = self.kernel // 2
        v = torch.cat([v[:, :, :1].expand(-1, -1, pad, -1, -1), v, v[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
        return x + rearrange(self.conv(v), "b c f h w -> (b f) c h w")


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, temporal: bool, kernel: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="replicate")
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="replicate")
        self.temporal = TemporalConv(channels, kernel) if temporal else None

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        if self.temporal is not None:
            y = self.temporal(y, frames)
        return x + y


class TextShift(nn.Module):
    """The prompt as per-channel shifts of the body's first and last features: its tokens pooled
    by one learned query's attention, then a small MLP whose last layer starts at zero."""

    def __init__(self, width: int, channels: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(width) / width ** 0.5)
        self.key = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * channels), nn.ReLU(), nn.Linear(2 * channels, 2 * channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """[b, tokens, width] -> [b, 2, channels, 1, 1]"""
        weights = torch.softmax(self.key(context) @ self.query / context.shape[-1] ** 0.5, dim=1)  # [b, tokens]
        pooled = (weights[..., None] * context).sum(1)
        return self.mlp(pooled).view(context.shape[0], 2, -1, 1, 1)


class VideoUpscaler(nn.Module):
    """[(b f), 3, h, w] in 0..1 -> [(b f), 3, scale h, scale w] (not clamped)."""

    def __init__(self, config: UpscalerConfig = UpscalerConfig()):
        super().__init__()
        self.config = config
        c = config.channels
        self.conv_in = nn.Conv2d(3, c, 3, padding=1, padding_mode="replicate")
        self.blocks = nn.ModuleList(ResidualBlock(c, config.temporal, config.temporal_kernel) for _ in range(config.blocks))
        self.conv_out = nn.Conv2d(c, 3 * config.scale ** 2, 3, padding=1, padding_mode="replicate")
        nn.init.zeros_(self.conv_out.weight)  # starts as bicubic
        nn.init.zeros_(self.conv_out.bias)
        self.shuffle = nn.PixelShuffle(config.scale)
        if config.text_channels:
            self.text = TextShift(config.text_channels, c)
        if config.latent_channels:
            self.latent_in = nn.Conv2d(config.latent_channels, c, 3, padding=1, padding_mode="replicate")
            self.latent_blocks = nn.ModuleList(ResidualBlock(c, config.temporal, config.temporal_kernel)
                                               for _ in range(config.latent_blocks))
            self.latent_up = nn.ModuleList(nn.Sequential(nn.Conv2d(c, 4 * c, 3, padding=1, padding_mode="replicate"),
                                                         nn.PixelShuffle(2), nn.ReLU())
                                           for _ in range(config.latent_down.bit_length() - 1))
            for conv in [self.latent_in] + [up[0] for up in self.latent_up]:  # He init: the features keep their
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")     # scale through the 2x steps
                nn.init.zeros_(conv.bias)
            self.latent_out = nn.Conv2d(c, c, 1)
            nn.init.zeros_(self.latent_out.weight)  # starts as the pixel model
            nn.init.zeros_(self.latent_out.bias)

    def forward(self, x: torch.Tensor, frames: int, latents: torch.Tensor | None = None,
                text: torch.Tensor | None = None) -> torch.Tensor:
        """``latents`` [(b f), latent_channels, h / latent_down, w / latent_down] (raw VAE latents) or None;
        ``text`` [b, tokens, text_channels] (each video's prompt embeddings) or None."""
        base = F.interpolate(x, scale_factor=self.config.scale, mode="bicubic", align_corners=False)
        h = self.conv_in(x * 2 - 1)
        shift = None
        if text is not None and self.config.text_channels:
            shift = self.text(text.to(x.dtype)).repeat_interleave(frames, dim=0)  # [(b f), 2, c, 1, 1]
            h = h + shift[:, 0]
        if latents is not None and self.config.latent_channels:
            g = F.relu(self.latent_in(latents * self.config.latent_scale))
            for block in self.latent_blocks:
                g = block(g, frames)
            for up in self.latent_up:
                g = up(g)
            h = h + self.latent_out(g)
        h = F.relu(h)
        for block in self.blocks:
            h = block(h, frames)
        if shift is not None:
            h = h + shift[:, 1]
        return base + self.shuffle(self.conv_out(h))


def check_frames(frames: torch.Tensor, scale: int = 4) -> None:
    """A ValueError naming what it takes for anything that is not [F, H, W, 3] of a size it can upscale."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"the super-resolver takes frames [frames, height, width, 3] (RGB in 0..1); got {shape}")
    f, h, w, _ = frames.shape
    if f < 1:
        raise ValueError("the super-resolver got no frames")
    if min(h, w) < MIN_SIZE or max(h, w) > MAX_SIZE:
        raise ValueError(f"the super-resolver takes frames of {MIN_SIZE} to {MAX_SIZE} pixels a side (up to "
                         f"{MAX_SIZE * scale} out at {scale}x); got {w}x{h}")


def _spans(length: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Start/end of windows of ``size`` covering ``length``, neighbours overlapping by >= ``overlap``."""
    if length <= size:
        return [(0, length)]
    step = size - overlap
    n = -(-(length - overlap) // step)
    starts = [round(i * (length - size) / (n - 1)) for i in range(n)]
    return [(s, s + size) for s in starts]


def _ramp(n: int, lo_overlap: int, hi_overlap: int) -> torch.Tensor:
    """Weights along one tile axis: linear up over the first overlap, down over the last."""
    w = torch.ones(n)
    if lo_overlap:
        w[:lo_overlap] = torch.arange(1, lo_overlap + 1) / (lo_overlap + 1)
    if hi_overlap:
        w[n - hi_overlap:] = torch.arange(hi_overlap, 0, -1) / (hi_overlap + 1)
    return w


def check_latents(model: VideoUpscaler, frames: torch.Tensor, latents: torch.Tensor | None) -> None:
    """A ValueError naming what is expected when ``latents`` do not belong to ``frames`` for this model."""
    cfg = model.config
    if latents is None:
        return
    if not cfg.latent_channels:
        raise ValueError("latents were given, but this upscaler does not read latents (latent_channels 0): "
                         "give it the frames alone or choose an upscaler trained with latents")
    f, h, w, _ = frames.shape
    d = cfg.latent_down
    want = (f, cfg.latent_channels, h // d, w // d)
    if h % d or w % d or tuple(latents.shape) != want:
        raise ValueError(f"the latents must be the frames' own: [frames, {cfg.latent_channels}, height/{d}, width/{d}] "
                         f"= {list(want)} for {f} frames of {w}x{h}; got {list(latents.shape)}")


def check_text(model: VideoUpscaler, text: torch.Tensor | None) -> None:
    """A ValueError naming what is expected when ``text`` is not prompt embeddings this model reads."""
    if text is None:
        return
    width = model.config.text_channels
    if not width:
        raise ValueError("a prompt was given, but this upscaler does not read text (text_channels 0): give it the "
                         "frames alone or choose an upscaler trained with prompts")
    if text.ndim != 3 or text.shape[0] != 1 or text.shape[-1] != width:
        raise ValueError(f"the prompt must be one video's text embeddings [1, tokens, {width}] (the text encoder "
                         f"this upscaler was trained with); got {list(text.shape)}")


def _tiled(model: VideoUpscaler, x: torch.Tensor, frames: int, tile: int, overlap: int, margin: int,
           latents: torch.Tensor | None = None, text: torch.Tensor | None = None) -> torch.Tensor:
    """x [(b f), 3, h, w] -> upscaled, in tiles of ``tile`` input pixels that overlap by ``overlap``
    and are blended linearly across it; each tile is run with ``margin`` pixels of context
    around it (cropped after), so with margin >= the spatial reach a tile is the whole's. With
    latents, tiles, overlaps and margins fall on the latent grid."""
    s = model.config.scale
    _, _, h, w = x.shape
    if h <= tile and w <= tile:
        return model(x, frames, latents, text)
    unit = model.config.latent_down if latents is not None else 1
    tile, overlap, margin = max(1, tile // unit), -(-overlap // unit), -(-margin // unit)
    ys = [(a * unit, b * unit) for a, b in _spans(h // unit, tile, overlap)]
    xs = [(a * unit, b * unit) for a, b in _spans(w // unit, tile, overlap)]
    margin *= unit
    out = torch.zeros(x.shape[0], 3, h * s, w * s, dtype=x.dtype)
    weight = torch.zeros(1, 1, h * s, w * s, dtype=x.dtype)
    for i, (y0, y1) in enumerate(ys):
        for j, (x0, x1) in enumerate(xs):
            cy0, cy1, cx0, cx1 = max(0, y0 - margin), min(h, y1 + margin), max(0, x0 - margin), min(w, x1 + margin)
            lat = None if latents is None else latents[..., cy0 // unit:cy1 // unit, cx0 // unit:cx1 // unit]
            part = model(x[..., cy0:cy1, cx0:cx1], frames, lat, text)
            part = part[..., (y0 - cy0) * s:(y1 - cy0) * s, (x0 - cx0) * s:(x1 - cx0) * s]
            oy_lo = ys[i - 1][1] - y0 if i else 0
            oy_hi = y1 - ys[i + 1][0] if i + 1 < len(ys) else 0
            ox_lo = xs[j - 1][1] - x0 if j else 0
            ox_hi = x1 - xs[j + 1][0] if j + 1 < len(xs) else 0
            wt = _ramp((y1 - y0) * s, oy_lo * s, oy_hi * s)[:, None] * _ramp((x1 - x0) * s, ox_lo * s, ox_hi * s)[None]
            out[..., y0 * s:y1 * s, x0 * s:x1 * s] += part * wt
            weight[..., y0 * s:y1 * s, x0 * s:x1 * s] += wt
    return out / weight


@torch.no_grad()
def upscale(model: VideoUpscaler, frames: torch.Tensor, *, latents: torch.Tensor | None = None,
            text: torch.Tensor | None = None, chunk: int = 16,
            tile: int = 128, overlap: int = 8, margin: int | None = None,
            callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Frames ``[F, H, W, 3]`` in 0..1 -> ``[F, 4H, 4W, 3]`` float32 in 0..1 on the CPU.

    ``latents`` ``[F, c, H/8, W/8]``: the raw VAE latents the frames were decoded from, for a
    model that reads them (``latent_channels``); without them such a model runs as its pixel self.
    ``text`` ``[1, tokens, width]``: the prompt's embeddings (the text encoder's output the
    keyframes were sampled with), for a model that reads them (``text_channels``).

    ``chunk`` output frames per pass (each pass sees ``temporal_reach`` more on each side, so
    the result does not depend on ``chunk``); frames wider or taller than ``tile`` input
    pixels go in tiles overlapping by ``overlap``, blended linearly across it, each run with
    ``margin`` pixels of context (default: the spatial reach, so the tiles agree with a whole
    run up to rounding and the blend only smooths what is left). ``callback(done, total)`` after each chunk (it may raise to
    cancel). Memory is bounded by ``chunk`` and ``tile``, not by the video.
    """
    cfg = model.config
    check_frames(frames, cfg.scale)
    check_latents(model, frames, latents)
    check_text(model, text)
    if chunk < 1 or tile < 2 * MIN_SIZE or not 0 <= overlap <= tile // 2:
        raise ValueError(f"chunk must be >= 1, tile >= {2 * MIN_SIZE} and overlap 0..tile/2; got chunk={chunk}, "
                         f"tile={tile}, overlap={overlap}")
    margin = cfg.spatial_reach if margin is None else margin
    param = next(model.parameters())
    total, reach = frames.shape[0], cfg.temporal_reach
    out = torch.empty(total, frames.shape[1] * cfg.scale, frames.shape[2] * cfg.scale, 3)
    for start in range(0, total, chunk):
        end = min(start + chunk, total)
        lo, hi = max(0, start - reach), min(total, end + reach)
        x = frames[lo:hi].movedim(-1, 1).to(param.device, param.dtype)
        lat = None if latents is None else latents[lo:hi].to(param.device, param.dtype)
        y = _tiled(model, x, hi - lo, tile, overlap, margin, lat,
                   None if text is None else text.to(param.device, param.dtype))
        out[start:end] = y[start - lo: end - lo].float().clamp(0, 1).movedim(1, -1).cpu()
        if callback is not None:
            callback(end, total)
    return out
