"""VideoVAE: Stable Diffusion's AutoencoderKL with directed temporal attention in the decoder.

The 2D part is SD's KL autoencoder in the LDM key layout (``encoder.*``, ``decoder.*``,
``quant_conv.*``, ``post_quant_conv.*``), so an SD VAE state dict loads by name. MagicVideo
adds ``temporal_layers`` :class:`DirectedTemporalAttention` layers to the decoder: at every
spatial position frame p attends to frames q <= p. Their output projection starts at zero,
so an SD VAE decodes exactly as before until the temporal layers are trained.

Where the temporal layers sit: layer 0 after the decoder's middle block, layer i >= 1 after
the blocks of up level ``num_levels - i`` (before its upsample), i.e. they climb from the
lowest resolution. With the default two layers both run at latent resolution, where they
are cheap and where their key/value cache (below) is small.

Chunked decoding: frames are decoded ``chunk_size`` at a time to bound memory. Because the
temporal attention is causal, a frame's output depends only on itself and earlier frames,
so each temporal layer keeps a cache of the keys and values of the frames already decoded
(per video) and a chunk's queries attend to cache + chunk. Chunked decoding therefore
equals unchunked decoding (up to float rounding) for every chunk size. The cache grows with
the number of frames but lives at latent resolution: 2 layers x (k, v) x C x h x w per
frame, 32 MB per frame for SD's 512-channel decoder at 512x512 in fp32, against
several hundred MB of full-resolution activations per decoded frame. The temporal layers
carry no frame position embedding: they are the same for every chunk and any video length.

Images are float in [-1, 1], channels first, frames in the batch dimension: ``[(b f), 3, H, W]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import config

__all__ = ["VAEConfig", "VideoVAE", "DirectedTemporalAttention", "latent_to_rgb"]


@dataclass
class VAEConfig:
    """Architecture of a :class:`VideoVAE`; defaults are Stable Diffusion 1.x's VAE."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215
    temporal_layers: int = 2
    temporal_head_dim: int = 64

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if self.temporal_layers > len(self.ch_mult):
            raise ValueError(
                f"temporal_layers can be at most {len(self.ch_mult)} (one after the middle block "
                f"and one per up level but the last), got {self.temporal_layers}"
            )

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return config.from_dict(cls, d)


# ----------------------------------------------------------------------------- 2D blocks (LDM layout)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over the h*w positions of each frame."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (rearrange(m(y), "n c h w -> n 1 (h w) c") for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = rearrange(y, "n 1 (h w) c -> n c h w", h=h, w=w)
        return x + self.proj_out(y)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # some SD VAE files store the 1x1 attention convs as linear weights [c, c]
        for name in ("q", "k", "v", "proj_out"):
            key = f"{prefix}{name}.weight"
            if key in state_dict and state_dict[key].ndim == 2:
                state_dict[key] = state_dict[key][:, :, None, None]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, groups)
    return mid


# ----------------------------------------------------------------------------- temporal


class DirectedTemporalAttention(nn.Module):
    """Causal self-attention over the frame axis at every spatial position (MagicVideo).

    ``x`` is ``[(b f), c, h, w]``; frame p attends to frames q <= p of the same video. With a
    ``cache`` dict, the keys and values of earlier chunks are prepended and this chunk's are
    appended, so chunk-by-chunk calls give the same result as one call over all frames. A
    cache with a ``"context"`` of n frames lets each frame see only itself and the n - 1
    frames before it and keeps only those keys: the cost and memory of a long video's
    decode then stay flat, whatever its length.
    The output projection is zero-initialised: a fresh layer is the identity.
    """

    def __init__(self, channels: int, groups: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        if channels % self.heads:
            raise ValueError(f"temporal attention: {channels} channels do not split into {self.heads} heads")
        self.norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, num_frames: int, cache: dict | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = rearrange(self.norm(x), "(b f) c h w -> (b h w) f c", f=num_frames)
        q, k, v = (
            rearrange(m(y), "n f (heads d) -> n heads f d", heads=self.heads)
            for m in (self.to_q, self.to_k, self.to_v)
        )
        past = kept = 0
        context = None
        if cache is not None:
            past, context = cache.get("seen", 0), cache.get("context")
            if "k" in cache:
                kept = cache["k"].shape[2]
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            keep = k.shape[2] if context is None else min(k.shape[2], context - 1)
            cache["k"], cache["v"], cache["seen"] = k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:], past + num_frames
        if kept == 0 and context is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # query i is frame past + i: it sees the keys of frames past + i - context + 1 .. past + i
            q_pos = torch.arange(past, past + num_frames, device=x.device)[:, None]
            k_pos = torch.arange(past - kept, past + num_frames, device=x.device)[None]
            mask = k_pos <= q_pos
            if context is not None:
                mask &= k_pos > q_pos - context
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = self.proj_out(rearrange(y, "n heads f d -> n f (heads d)"))
        return x + rearrange(y, "(b h w) f c -> (b f) c h w", h=h, w=w)


# ----------------------------------------------------------------------------- encoder / decoder


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        g = c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = c.ch
        for level, mult in enumerate(c.ch_mult):
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                down.block.append(ResnetBlock(block_in, c.ch * mult, g))
                block_in = c.ch * mult
            if level != len(c.ch_mult) - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = _mid(block_in, g)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * c.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        g = c.norm_groups
        levels = len(c.ch_mult)
        block_in = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, g)
        temporal_channels = [block_in]  # after the middle block
        up_list = []
        for level in reversed(range(levels)):
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, c.ch * c.ch_mult[level], g))
                block_in = c.ch * c.ch_mult[level]
            temporal_channels.append(block_in)  # after this level's blocks
            if level != 0:
                up.upsample = Upsample(block_in)
            up_list.insert(0, up)
        self.up = nn.ModuleList(up_list)  # LDM order: up[0] is the full-resolution level
        self.temporal = nn.ModuleList(
            DirectedTemporalAttention(ch, g, c.temporal_head_dim) for ch in temporal_channels[: c.temporal_layers]
        )
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, num_frames: int, caches: list[dict] | None = None) -> torch.Tensor:
        caches = caches if caches is not None else [None] * len(self.temporal)

        def temporal(i, h):
            return self.temporal[i](h, num_frames, caches[i]) if i < len(self.temporal) else h

        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = temporal(0, h)
        for i, up in enumerate(reversed(self.up), start=1):
            for block in up.block:
                h = block(h)
            h = temporal(i, h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- the VAE


class VideoVAE(nn.Module):
    """SD's KL autoencoder (LDM keys) whose decoder also attends causally across frames.

    ``encode(images)`` -> scaled latents, ``decode(latents, num_frames)`` -> images; both work
    ``chunk_size`` frames at a time. ``encode_dist`` / ``decode_raw`` are the unscaled,
    unchunked-by-default forms the trainer uses. Inputs are moved to the VAE's device and
    dtype; outputs come back in the VAE's dtype on its device.
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self._latent_rgb: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    # -- encode

    def _check_images(self, images: torch.Tensor):
        c = self.config
        if images.ndim != 4 or images.shape[1] != c.in_channels:
            raise ValueError(f"VideoVAE.encode expects images [frames, {c.in_channels}, H, W], got shape {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % c.downscale or W % c.downscale:
            raise ValueError(
                f"image size {W}x{H} (width x height) is not divisible by {c.downscale}: the VAE needs "
                f"both sides to be multiples of {c.downscale}, e.g. "
                f"{W // c.downscale * c.downscale or c.downscale}x{H // c.downscale * c.downscale or c.downscale}"
            )

    def encode_dist(self, images: torch.Tensor, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images [F, 3, H, W] in [-1, 1] -> (mean, logvar), each [F, embed_dim, H/8, W/8], unscaled."""
        self._check_images(images)
        images = images.to(self.device, self.dtype)
        step = chunk_size or images.shape[0]
        moments = torch.cat([self.quant_conv(self.encoder(x)) for x in images.split(step)])
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(
        self,
        images: torch.Tensor,
        chunk_size: int | None = 8,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """images [F, 3, H, W] in [-1, 1] -> scaled latents [F, embed_dim, H/8, W/8].

        The posterior mean by default; ``sample=True`` draws from the posterior with
        ``generator`` (noise made on the generator's device, then moved).
        """
        mean, logvar = self.encode_dist(images, chunk_size)
        z = mean
        if sample:
            gen_device = generator.device if generator is not None else mean.device
            eps = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=mean.dtype).to(mean.device)
            z = mean + (0.5 * logvar).exp() * eps
        return z * self.config.scaling_factor

    # -- decode

    def decode_raw(self, z: torch.Tensor, num_frames: int | None = None, chunk_size: int | None = None,
                   context: int | None = None) -> torch.Tensor:
        """Unscaled latents [(b f), embed_dim, h, w] -> images [(b f), 3, 8h, 8w] in about [-1, 1].

        ``num_frames`` frames per video (default: all of them are one video). Without
        ``chunk_size`` all frames go through at once (training); with it, each video is
        decoded ``chunk_size`` frames at a time, the temporal layers carrying a key/value
        cache of earlier frames, which gives the same result. ``context``: each frame's
        temporal layers see at most this many frames (itself and those just before it);
        None = every earlier frame of its video.
        """
        return torch.cat(list(self.decode_chunks(z, num_frames, chunk_size, context)))

    def decode_chunks(self, z: torch.Tensor, num_frames: int | None = None, chunk_size: int | None = None,
                      context: int | None = None):
        """:meth:`decode_raw` one chunk at a time (a generator): the long-video writer's decode."""
        c = self.config
        if z.ndim != 4 or z.shape[1] != c.embed_dim:
            raise ValueError(
                f"the VAE expects latents [frames, {c.embed_dim}, h, w], got shape {tuple(z.shape)}"
                + (" (a latent of another model family?)" if z.ndim == 4 else "")
            )
        num_frames = num_frames or z.shape[0]
        if z.shape[0] % num_frames:
            raise ValueError(f"{z.shape[0]} latent frames do not split into videos of num_frames={num_frames}")
        if context is not None and context < 1:
            raise ValueError(f"the decoder's temporal context must be at least 1 frame, got {context}")
        if context is None and (not chunk_size or chunk_size >= num_frames):
            if not chunk_size:  # every frame at once (training)
                yield self.decoder(self.post_quant_conv(z.to(self.device, self.dtype)), num_frames)
                return
            for video in z.split(num_frames):  # bound memory: one video at a time
                yield self.decoder(self.post_quant_conv(video.to(self.device, self.dtype)), num_frames)
            return
        for video in z.split(num_frames):
            caches = [{"context": context} for _ in self.decoder.temporal]
            for chunk in video.split(chunk_size or num_frames):
                chunk = chunk.to(self.device, self.dtype)
                yield self.decoder(self.post_quant_conv(chunk), chunk.shape[0], caches)

    def decode(self, latents: torch.Tensor, num_frames: int | None = None, chunk_size: int | None = 8,
               context: int | None = None) -> torch.Tensor:
        """Scaled latents [(b f), embed_dim, h, w] -> images [(b f), 3, 8h, 8w] in about [-1, 1]."""
        return self.decode_raw(latents / self.config.scaling_factor, num_frames, chunk_size, context)

    # -- preview

    @torch.no_grad()
    def latent_rgb(self) -> torch.Tensor:
        """A cheap linear map from scaled latents to RGB, ``[embed_dim + 1, 3]`` (last row: bias).

        Fitted once by least squares on the latents of flat colours, so it suits any VAE
        (SD's or a small trained one). For progress previews, see :func:`latent_to_rgb`.
        """
        if self._latent_rgb is None:
            levels = torch.tensor([-1.0, 0.0, 1.0])
            colours = torch.cartesian_prod(levels, levels, levels)  # 27 colours in [-1, 1]
            size = 4 * self.config.downscale
            images = colours[:, :, None, None].expand(-1, -1, size, size)
            z = self.encode(images)[..., 1:-1, 1:-1].float().mean(dim=(2, 3)).cpu()  # away from the borders
            a = torch.cat([z, torch.ones(len(z), 1)], dim=1)
            self._latent_rgb = torch.linalg.lstsq(a, colours).solution
        return self._latent_rgb


def latent_to_rgb(latents: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Scaled latents [F, c, h, w] -> rough RGB [F, h, w, 3] in 0..1 through a [c + 1, 3] map."""
    x = rearrange(latents.float(), "f c h w -> f h w c")
    rgb = x @ factors[:-1].to(x.device) + factors[-1].to(x.device)
    return ((rgb + 1) / 2).clamp(0, 1)
