"""VideoUNet: the Stable Diffusion 1.x UNet, made to see time (MagicVideo, arXiv 2211.11018).

The 2D part is the SD1.x UNet in the LDM key layout (``input_blocks.*``, ``middle_block.*``,
``output_blocks.*``, ``time_embed.*``, ``out.*``), so SD1.5 weights load by name. Three
ideas are added, each with its own keys and each initialised so that a fresh model equals
the image model exactly:

- ``FrameAdaptor`` after every 2D convolution: ``z_i = S_i * Conv2d(z_i) + B_i`` with a
  per-frame, per-channel scale and shift (S=1, B=0 at start). Keys contain ``adaptor``.
- ``DirectedTemporalAttention`` beside the spatial self-attention of every transformer
  block, summed as the paper does (``z = z + S-Attn(z) + T-Attn(z)``): attention over the
  frame axis at each spatial position, frame p sees frames q <= p. Zero-initialised output
  projection. Keys contain ``temporal``.
- Optional ``TemporalConv`` (``temporal_conv=True``) after every ResBlock: a residual
  kernel-3 convolution over the frame axis at each spatial position (ModelScope T2V's
  temporal conv, kept 1D), zero-initialised output. Attention at one spatial position
  weighs frames by content; the conv gives every layer a fixed local window in time, the
  prior that keeps an object in place from one frame to the next. Keys contain ``temporal``.
- Optional ``DirectedSpatioTemporalAttention`` (``spatiotemporal_resolutions``, at coarse
  levels): attention over every position of every frame q <= p, with frame and 2D
  position encodings. Temporal attention at one position can carry content forward in
  time but not move it sideways; this branch lets frame p take frame q's content from
  another place, which is what "moving left" asks for. Zero-initialised output, keys
  ``spatiotemporal_attn`` (so ``temporal`` too).
- fps conditioning ``Linear(SiLU(Linear(sinusoid(fps))))`` added to the timestep embedding,
  last Linear zero-initialised. Keys contain ``fps_embed``.
- Optional caption-timed frame embedding (``caption_time_embed=True``): an MLP of the mean
  text conditioning and the frame's clip time (0 at the first frame, 1 at the last) added
  to each frame's timestep embedding, last Linear zero-initialised. Every ResBlock then gets
  a per-frame scale and shift that depends on what the caption asks and how far into the
  clip the frame is: what growing, shrinking or turning needs (the object's size or angle
  at frame p), which cross-attention (the same for every frame) and the steering (a
  translation) cannot give. Keys ``temporal_caption_embed``.

Optional conditioning channels (Magic 1-For-1's image prior: reference latents + mask) go
through ``cond_in``, a zero-initialised conv summed with ``input_blocks.0.0``: a conv over
``concat(x, cond)`` equals ``conv_x(x) + conv_cond(cond)`` (split its weight along input
channels), so this is the channel-concat model while SD1.5's input conv keeps its shape.

Frames ride in the batch dimension, ``[(b f), c, h, w]``; every layer that mixes or
indexes frames receives ``num_frames`` explicitly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import config
from .attention import (
    CrossAttention,
    DirectedSpatioTemporalAttention,
    DirectedTemporalAttention,
    FeedForward,
    mean_caption,
    sinusoidal_embedding,
)

# Substrings that mark the parameters the image model does not have. Together they are
# the motion-only file (adaptors + temporal attention + fps embedding + conditioning conv).
MOTION_KEY_MARKERS = ("adaptor", "temporal", "fps_embed", "cond_in.")

PREDICTION_TYPES = ("epsilon", "v_prediction")


# ----------------------------------------------------------------------------- config


@dataclass
class UNetConfig:
    """Architecture of a VideoUNet. Defaults are SD1.5 plus MagicVideo's video fields."""

    # the SD1.x image UNet
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors with a transformer
    num_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 768
    norm_groups: int = 32
    # MagicVideo
    max_frames: int = 16  # frames a FrameAdaptor has parameters for (MagicVideo's 16 keyframes)
    temporal_bidirectional: bool = False  # ablation: every frame sees every frame
    temporal_position: bool = True  # sinusoidal frame-index encoding on temporal queries/keys
    temporal_conv: bool = False  # a residual kernel-3 conv over frames after every ResBlock
    spatiotemporal_resolutions: tuple[int, ...] = ()  # downsampling factors with spatio-temporal attention
    motion_steering: bool = False  # the caption tilts where each spatio-temporal head looks back
    motion_field: bool = False  # each steered query adds a velocity read from its own features
    motion_tokens: bool = False  # each steered query adds a velocity read from the caption words it attends to
    caption_time_embed: bool = False  # per-frame embedding from (mean caption, clip time) added to the timestep's
    fps_embed: bool = True
    default_fps: float = 8.0  # used when forward() gets fps=None
    cond_channels: int = 0  # e.g. 5 = reference latents (4) + mask (1)
    prediction_type: str = "epsilon"  # metadata for the sampler: "epsilon" | "v_prediction"
    noise_sharing: float = 0.0  # metadata: the noise prior it was trained with (sampling.video_noise)
    image_first: bool = False  # metadata: trained to continue clean given first frames (sampling.sample)
    # metadata: a few-step student's own timesteps, from noise to clean (training/distill.py); () = a many-step model
    student_timesteps: tuple[int, ...] = ()

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(sorted({int(r) for r in self.attention_resolutions}, reverse=True))
        self.spatiotemporal_resolutions = tuple(sorted({int(r) for r in self.spatiotemporal_resolutions}, reverse=True))
        self.student_timesteps = tuple(int(t) for t in self.student_timesteps)
        ts = self.student_timesteps
        if ts and (list(ts) != sorted(set(ts), reverse=True) or not 0 < ts[-1] <= ts[0] < 1000):
            raise ValueError(f"student_timesteps must fall strictly from noise to clean within 1..999, got {list(ts)}")
        if set(self.spatiotemporal_resolutions) - set(self.attention_resolutions) - {2 ** (len(self.channel_mult) - 1)}:
            raise ValueError(f"spatiotemporal_resolutions {list(self.spatiotemporal_resolutions)} must be levels with a "
                             f"transformer: attention_resolutions {list(self.attention_resolutions)} or the middle block")
        if self.motion_steering and not self.spatiotemporal_resolutions:
            raise ValueError("motion_steering steers the spatio-temporal attention: set spatiotemporal_resolutions too")
        if self.motion_field and not self.motion_steering:
            raise ValueError("motion_field adds to the motion steering: set motion_steering too")
        if self.motion_tokens and not self.motion_steering:
            raise ValueError("motion_tokens adds to the motion steering: set motion_steering too")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {self.max_frames}")
        if not 0.0 <= self.noise_sharing < 1.0:
            raise ValueError(f"noise_sharing must be at least 0 and below 1, got {self.noise_sharing}")
        for mult in self.channel_mult:
            ch = self.model_channels * mult
            if ch % self.norm_groups:
                raise ValueError(f"channels {ch} are not divisible by norm_groups {self.norm_groups}")
            if ch % self.num_heads:
                raise ValueError(f"channels {ch} are not divisible by num_heads {self.num_heads}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        d["spatiotemporal_resolutions"] = list(self.spatiotemporal_resolutions)
        if self.student_timesteps:  # absent from a many-step model's file, which older packs read as before
            d["student_timesteps"] = list(self.student_timesteps)
        else:
            del d["student_timesteps"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return config.from_dict(cls, d)

    @property
    def image_fields(self) -> dict:
        """The fields that shape the 2D (SD) part; the rest are MagicVideo's."""
        names = ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                 "attention_resolutions", "num_heads", "transformer_depth", "context_dim", "norm_groups")
        return {k: getattr(self, k) for k in names}


def is_motion_key(name: str) -> bool:
    """True for parameters MagicVideo adds to the image UNet (the motion-only file)."""
    return any(marker in name for marker in MOTION_KEY_MARKERS)


def motion_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The motion-only part of a VideoUNet's state dict (adaptors, temporal, fps, cond)."""
    return {k: v for k, v in unet.state_dict().items() if is_motion_key(k)}


def check_num_frames(num_frames: int, max_frames: int) -> None:
    if num_frames > max_frames:
        raise ValueError(
            f"{num_frames} frames requested but this model supports at most max_frames={max_frames}; "
            "use fewer frames per window (e.g. the sliding window) or a model with a larger max_frames"
        )
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")


def zero_last_layer_(mlp: nn.Sequential) -> None:
    """Re-initialise a Linear-SiLU-Linear embedding with its output Linear at zero (adds nothing)."""
    mlp[0].reset_parameters()
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)


# ----------------------------------------------------------------------------- frame adaptor


class FrameAdaptor(nn.Module):
    """Per-frame, per-channel affine map after a shared conv: ``z_i = S_i * z_i + B_i``."""

    def __init__(self, channels: int, max_frames: int):
        super().__init__()
        self.max_frames = max_frames
        self.scale = nn.Parameter(torch.empty(max_frames, channels))
        self.shift = nn.Parameter(torch.empty(max_frames, channels))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.scale)
        nn.init.zeros_(self.shift)

    def forward(self, h: torch.Tensor, num_frames: int) -> torch.Tensor:
        check_num_frames(num_frames, self.max_frames)
        scale = self.scale[:num_frames].to(h.dtype)
        shift = self.shift[:num_frames].to(h.dtype)
        h = rearrange(h, "(b f) c h w -> b f c h w", f=num_frames)
        h = torch.addcmul(shift[:, :, None, None], h, scale[:, :, None, None])
        return rearrange(h, "b f c h w -> (b f) c h w")


class FramewiseConv2d(nn.Conv2d):
    """A 2D conv shared by all frames, followed by its FrameAdaptor.

    The conv keeps nn.Conv2d's own keys (``weight``, ``bias``) so SD weights load by name;
    the adaptor's parameters sit under ``<conv>.adaptor.*``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, *, max_frames: int, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.adaptor = FrameAdaptor(out_channels, max_frames)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.adaptor(super().forward(x), num_frames)


# ----------------------------------------------------------------------------- blocks


@dataclass
class BlockInputs:
    """What every block needs besides the features: passed explicitly, never global."""

    emb: torch.Tensor  # [(b f), time_embed_dim]
    context: torch.Tensor  # [(b f), seq, context_dim]
    num_frames: int


class TemporalConv(nn.Module):
    """``z + Conv1d_t(SiLU(GroupNorm(z)))`` over the frame axis at every spatial position.

    Kernel 3 with zero padding, so frame p sees p-1, p, p+1; the conv's output is
    zero-initialised, so a model that gains it (``VideoUNet.grown``) is unchanged at first.
    """

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self):
        self.norm.reset_parameters()
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = F.silu(self.norm(x))
        h = rearrange(h, "(b f) c h w -> (b h w) c f", f=num_frames)
        h = rearrange(self.conv(h), "(b h w) c f -> (b f) c h w", h=height, w=width)
        return x + h


class ResBlock(nn.Module):
    """SD's residual block (LDM keys: in_layers, emb_layers, out_layers, skip_connection)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, cfg: UNetConfig):
        super().__init__()
        g, mf = cfg.norm_groups, cfg.max_frames
        self.in_layers = nn.Sequential(
            nn.GroupNorm(g, channels),
            nn.SiLU(),
            FramewiseConv2d(channels, out_channels, 3, padding=1, max_frames=mf),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(g, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),  # kept so the conv sits at index 3 as in LDM checkpoints
            FramewiseConv2d(out_channels, out_channels, 3, padding=1, max_frames=mf),
        )
        if out_channels == channels:
            self.skip_connection = None
        else:
            self.skip_connection = FramewiseConv2d(channels, out_channels, 1, max_frames=mf)
        self.temporal_conv = TemporalConv(out_channels, g) if cfg.temporal_conv else None

    def forward(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        f = inputs.num_frames
        norm, act, conv = self.in_layers
        h = conv(act(norm(x)), f)
        h = h + self.emb_layers(inputs.emb).to(h.dtype)[:, :, None, None]
        norm, act, drop, conv = self.out_layers
        h = conv(drop(act(norm(h))), f)
        skip = x if self.skip_connection is None else self.skip_connection(x, f)
        h = skip + h
        return h if self.temporal_conv is None else self.temporal_conv(h, f)


class Downsample(nn.Module):
    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.op = FramewiseConv2d(channels, channels, 3, stride=2, padding=1, max_frames=cfg.max_frames)

    def forward(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        return self.op(x, inputs.num_frames)


class Upsample(nn.Module):
    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.conv = FramewiseConv2d(channels, channels, 3, padding=1, max_frames=cfg.max_frames)

    def forward(self, x: torch.Tensor, inputs: BlockInputs, size=None) -> torch.Tensor:
        # `size` is the skip connection's spatial size, so odd latent sizes round-trip
        size = tuple(size) if size is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x, inputs.num_frames)


class TransformerBlock(nn.Module):
    """LDM's BasicTransformerBlock with a directed temporal branch beside self-attention."""

    def __init__(self, dim: int, heads: int, cfg: UNetConfig, spatiotemporal: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, heads)
        self.temporal_attn = DirectedTemporalAttention(
            dim, heads, bidirectional=cfg.temporal_bidirectional, position=cfg.temporal_position
        )
        self.spatiotemporal_attn = None
        if spatiotemporal:
            self.spatiotemporal_attn = DirectedSpatioTemporalAttention(
                dim, heads, bidirectional=cfg.temporal_bidirectional, position=cfg.temporal_position,
                steering_dim=cfg.context_dim if cfg.motion_steering else None, field=cfg.motion_field,
                tokens=cfg.motion_tokens,
            )
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim=cfg.context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int, size: tuple[int, int]) -> torch.Tensor:
        h = x + self.attn1(self.norm1(x)) + self.temporal_attn(x, num_frames)  # z + S-Attn(z) + T-Attn(z)
        st = self.spatiotemporal_attn
        x = h if st is None else h + st(x, num_frames, size, context)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """LDM's SpatialTransformer (1x1 conv proj_in/proj_out, as SD1.x; both frame-adapted)."""

    def __init__(self, channels: int, cfg: UNetConfig, spatiotemporal: bool = False):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        self.proj_in = FramewiseConv2d(channels, channels, 1, max_frames=cfg.max_frames)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, cfg.num_heads, cfg, spatiotemporal) for _ in range(cfg.transformer_depth)
        )
        self.proj_out = FramewiseConv2d(channels, channels, 1, max_frames=cfg.max_frames)

    def forward(self, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        f = inputs.num_frames
        h = self.proj_in(self.norm(x), f)
        height, width = h.shape[-2:]
        h = rearrange(h, "n c h w -> n (h w) c")
        for block in self.transformer_blocks:
            h = block(h, inputs.context, f, (height, width))
        h = rearrange(h, "n (h w) c -> n c h w", h=height, w=width)
        return self.proj_out(h, f) + x


class UNetBlock(nn.ModuleList):
    """One entry of input_blocks / output_blocks: layers applied in order."""

    def forward(self, h: torch.Tensor, inputs: BlockInputs, skip_size=None) -> torch.Tensor:
        for layer in self:
            h = layer(h, inputs, skip_size) if isinstance(layer, Upsample) else layer(h, inputs)
        return h


# ----------------------------------------------------------------------------- the UNet

class VideoUNet(nn.Module):
    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or UNetConfig()
        mc, mf = cfg.model_channels, cfg.max_frames
        emb_dim = mc * 4
        self.gradient_checkpointing = False

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.fps_embed = None
        if cfg.fps_embed:
            self.fps_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.temporal_caption_embed = None
        if cfg.caption_time_embed:
            self.temporal_caption_embed = nn.Sequential(
                nn.Linear(cfg.context_dim + mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
            )
        self.cond_in = None
        if cfg.cond_channels:
            # no bias: input_blocks.0.0 already has one; together they are one conv over concat(x, cond)
            self.cond_in = nn.Conv2d(cfg.cond_channels, mc, 3, padding=1, bias=False)

        def res(ch_in, ch_out):
            return ResBlock(ch_in, emb_dim, ch_out, cfg)

        self.input_blocks = nn.ModuleList([UNetBlock([FramewiseConv2d(cfg.in_channels, mc, 3, padding=1, max_frames=mf)])])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(ch, cfg, ds in cfg.spatiotemporal_resolutions))
                self.input_blocks.append(UNetBlock(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(UNetBlock([Downsample(ch, cfg)]))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = UNetBlock([res(ch, ch), SpatialTransformer(ch, cfg, ds in cfg.spatiotemporal_resolutions),
                                       res(ch, ch)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(ch, cfg, ds in cfg.spatiotemporal_resolutions))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch, cfg))
                    ds //= 2
                self.output_blocks.append(UNetBlock(layers))

        self.out = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, ch),
            nn.SiLU(),
            FramewiseConv2d(mc, cfg.out_channels, 3, padding=1, max_frames=mf),
        )
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)
        self.reset_motion_parameters()

    @classmethod
    def for_loading(cls, config: UNetConfig, device="cpu", dtype=torch.float32, layout=None) -> "VideoUNet":
        """A model whose 2D weights are left uninitialised (fast): load them next.

        Built on the meta device and materialised empty; only the MagicVideo layers get
        their identity initialisation. SD1.5's 860M parameters take seconds to initialise
        randomly, which a loader that overwrites them all should not pay.
        """
        with torch.device("meta"):
            model = cls(config).to(dtype)  # free on meta; memory is allocated once, below
            if layout is not None:  # e.g. int8 layers (quant.restructure): never allocated in full precision
                layout(model)
        model = model.to_empty(device=device)
        if layout is None:  # a changed layout comes whole from a file: nothing to initialise
            model.reset_motion_parameters()
        return model

    # -- the new layers

    @torch.no_grad()
    def reset_motion_parameters(self):
        """Initialise every MagicVideo layer so the model equals its image model.

        Adaptors to identity, temporal output projections and the last fps Linear and the
        conditioning conv to zero. Called by __init__, and by the checkpoint loader after
        it builds the model without initialising (on the meta device).
        """
        for m in self.modules():
            if isinstance(m, (FrameAdaptor, DirectedTemporalAttention, TemporalConv)):
                m.reset_parameters()
        for mlp in (self.fps_embed, self.temporal_caption_embed):
            if mlp is not None:
                zero_last_layer_(mlp)
        if self.cond_in is not None:
            nn.init.zeros_(self.cond_in.weight)

    def grown(self, **changes) -> "VideoUNet":
        """This model with MagicVideo layers added (e.g. ``temporal_conv=True``), same function.

        Only changes that add identity-initialised motion layers (or zero-initialised image-prior
        input channels, ``cond_channels``) are accepted: every weight
        of this model is kept, the new ones start as identity, so training goes on from
        exactly this model.
        """
        allowed = {"temporal_conv", "spatiotemporal_resolutions", "motion_steering", "motion_field",
                   "motion_tokens", "caption_time_embed", "cond_channels"}
        bad = sorted(set(changes) - allowed)
        if bad:
            raise ValueError(f"grown() can add {sorted(allowed)}; cannot change {bad} of a trained model")
        cfg = UNetConfig.from_dict({**self.config.to_dict(), **changes})
        p = next(self.parameters())
        model = VideoUNet(cfg).to(device=p.device, dtype=p.dtype)
        missing, unexpected = model.load_state_dict(self.state_dict(), strict=False)
        if unexpected or any(not is_motion_key(k) for k in missing):
            raise ValueError(f"grown({changes}): cannot keep the weights (missing {missing}, unexpected {unexpected})")
        return model

    def set_temporal_bidirectional(self, bidirectional: bool) -> "VideoUNet":
        """Let every frame's temporal attention see later frames too (or only earlier ones again).

        No weights change; the function does, so a model switched this way is fine-tuned after.
        The interpolator is: the frames between two keyframes must see the keyframe after them,
        which directed attention hides (``temporal_bidirectional`` travels in the file)."""
        self.config.temporal_bidirectional = bool(bidirectional)
        for m in self.modules():
            if isinstance(m, DirectedTemporalAttention):
                m.bidirectional = bool(bidirectional)
        return self

    def motion_parameters(self):
        return [p for n, p in self.named_parameters() if is_motion_key(n)]

    # -- forward

    def _per_frame(self, t: torch.Tensor, b: int, f: int, what: str) -> torch.Tensor:
        """Accept a per-video [b, ...] or per-frame [(b f), ...] tensor; return per-frame."""
        if t.shape[0] == b * f:
            return t
        if t.shape[0] == b:
            return repeat(t, "b ... -> (b f) ...", f=f)
        raise ValueError(f"{what} has batch {t.shape[0]}; expected {b} videos or {b * f} frames ({b} x {f})")

    def forward(self, x, timesteps, context, num_frames: int, fps=None, cond=None):
        """x [(b f), in, h, w]; timesteps [(b f)] or [b] or scalar; context [b | (b f), seq, dim];
        fps number, [(b f)] or [b] or None (config default); cond [(b f), cond_channels, h, w]."""
        cfg = self.config
        f = int(num_frames)
        check_num_frames(f, cfg.max_frames)
        if x.shape[0] % f:
            raise ValueError(f"batch of {x.shape[0]} frames is not a whole number of {f}-frame videos")
        b = x.shape[0] // f

        timesteps = torch.as_tensor(timesteps, device=x.device)
        timesteps = self._per_frame(timesteps.reshape(-1).expand(b) if timesteps.numel() == 1 else timesteps, b, f, "timesteps")
        emb = self.time_embed(sinusoidal_embedding(timesteps, cfg.model_channels).to(x.dtype))
        if self.fps_embed is not None:
            fps = torch.as_tensor(cfg.default_fps if fps is None else fps, device=x.device, dtype=torch.float32)
            fps = self._per_frame(fps.reshape(-1).expand(b) if fps.numel() == 1 else fps, b, f, "fps")
            emb = emb + self.fps_embed(sinusoidal_embedding(fps, cfg.model_channels).to(x.dtype))
        context = self._per_frame(context, b, f, "context").to(x.dtype)
        if self.temporal_caption_embed is not None:
            emb = emb + self.caption_time(context, f)
        inputs = BlockInputs(emb=emb, context=context, num_frames=f)

        # input_blocks.0.0, with the conditioning channels as the rest of one wider conv
        conv_in = self.input_blocks[0][0]
        h = nn.Conv2d.forward(conv_in, x)
        if self.cond_in is not None:
            if cond is None:
                raise ValueError(f"this model takes {cfg.cond_channels} conditioning channels; pass cond (zeros for none)")
            if cond.shape[1] != cfg.cond_channels:
                raise ValueError(f"cond has {cond.shape[1]} channels; this model takes {cfg.cond_channels}")
            h = h + self.cond_in(cond.to(x.dtype))
        elif cond is not None:
            raise ValueError("cond given but this model has cond_channels=0")
        h = conv_in.adaptor(h, f)

        skips = [h]
        for block in self.input_blocks[1:]:
            h = self._run(block, h, inputs)
            skips.append(h)
        h = self._run(self.middle_block, h, inputs)
        for block in self.output_blocks:
            skip = skips.pop()
            h = self._run(block, torch.cat([h, skip], dim=1), inputs, skips[-1].shape[-2:] if skips else None)
        norm, act, conv = self.out
        return conv(act(norm(h)), f)

    def caption_time(self, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """[(b f), seq, dim] conditioning -> [(b f), emb] from the video's mean caption and
        each frame's clip time (frame / (frames - 1), so amounts per clip hold at any count)."""
        f = num_frames
        pooled = mean_caption(context, f)
        clip_time = torch.arange(f, device=context.device, dtype=torch.float32) / max(f - 1, 1)
        when = sinusoidal_embedding(100.0 * clip_time, self.config.model_channels).to(context.dtype)
        b = pooled.shape[0]
        both = torch.cat([repeat(pooled, "b c -> (b f) c", f=f), repeat(when, "f c -> (b f) c", b=b)], dim=-1)
        return self.temporal_caption_embed(both)

    def _run(self, block: UNetBlock, h, inputs: BlockInputs, skip_size=None):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, inputs, skip_size, use_reentrant=False)
        return block(h, inputs, skip_size)
