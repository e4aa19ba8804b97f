"""Guidance: small wrappers around a denoiser, composed by the generation path.

A denoiser is ``denoiser(x_in, t, progress) -> (output, x_in)`` (see ``sampling.sample``).
:class:`VideoDenoiser` is the VideoUNet on one request; each kind of guidance wraps a
denoiser and is itself one, so a new guidance is a new piece and the sampler loop never
changes (as ComfyUI's model patches and k-diffusion's wrapped denoisers):

- :class:`ClassifierFreeGuidance`: ``uncond + scale * (cond - uncond)`` on the steps of an
  interval of the schedule, both halves in one batch; other steps run the conditional half.
- :class:`MotionGuidance`: on the early steps, move the noisy latent so that each object's
  cross-attention blob travels the path its words ask for. The bundled default's words bind
  to their object (its binding loss, docs/TRAINING.md): the cells of a red circle attend to
  "red", "circle" and its motion words. Sampling from noise, the model lays the objects out in
  the first steps, and with two objects their motions often go wrong. What each object's words
  ask for comes from the prompt through the text encoder's lexicon
  (``TextEncoder.motion_request``); on each steered step the latent moves down the gradient of
  how far the blobs' centroids are from those paths, as Attend-and-Excite (Chefer et al. 2023)
  moves it to bring out missing subjects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange, repeat

from . import lexicon

MOTION_KEY = "magicvideo_motion"  # CONDITIONING dict key: TextEncoder.motion_request of the prompt

# the text encoders that give common context widths, for error messages
_CONTEXT_SOURCES = {
    768: "an SD1.x checkpoint's CLIP through CLIPTextEncode",
    1024: "an SD2.x checkpoint's OpenCLIP through CLIPTextEncode",
    2048: "SDXL's CLIP pair through CLIPTextEncode",
}


def frame_context(c: torch.Tensor, name: str, *, videos: int, frames: int, width: int) -> torch.Tensor:
    """Text embeddings [1 or b, tokens, width] -> one per frame [(b f), tokens, width], with clear errors."""
    if c.ndim == 2:
        c = c[None]
    if c.ndim != 3:
        raise ValueError(f"{name} conditioning must be [batch, tokens, width]; got shape {tuple(c.shape)}")
    if c.shape[-1] != width:
        source = _CONTEXT_SOURCES.get(width, "the model file's built-in text encoder (MagicVideo Text Encode)")
        raise ValueError(
            f"the model expects text embeddings of width {width} (e.g. from {source}), "
            f"got {c.shape[-1]} in the {name} conditioning"
        )
    if c.shape[0] not in (1, videos):
        raise ValueError(f"{name} conditioning has batch {c.shape[0]}; expected 1 or one per video ({videos})")
    return repeat(c.expand(videos, -1, -1), "b s d -> (b f) s d", f=frames)


def same_length(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat token sequences to a common length; attention over repeated keys is unchanged."""
    la, lb = a.shape[1], b.shape[1]
    if la == lb:
        return a, b
    n = math.lcm(la, lb)
    return a.repeat(1, n // la, 1), b.repeat(1, n // lb, 1)


class VideoDenoiser:
    """The VideoUNet on one request: the positive text per frame, the frame rate and the
    conditioning channels (``cond`` [(b f), cond_channels, h, w] or None)."""

    def __init__(self, unet: torch.nn.Module, positive: torch.Tensor, *, num_frames: int, fps: float | None,
                 cond: torch.Tensor | None = None):
        param = next(unet.parameters())
        self.unet, self.device, self.dtype = unet, param.device, param.dtype
        self.num_frames, self.fps, self.cond = num_frames, fps, cond
        self.positive = positive
        self.context = None  # per frame, set on the first call (the batch size is known then)

    def run(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.unet(x.to(self.dtype), t, context, num_frames=self.num_frames, fps=self.fps, cond=cond).float()

    def frame_context(self, c: torch.Tensor, name: str, batch: int) -> torch.Tensor:
        return frame_context(c, name, videos=batch // self.num_frames, frames=self.num_frames,
                             width=self.unet.config.context_dim).to(self.device, self.dtype)

    def check(self, batch: int) -> None:
        """Shape errors before any work: the positive conditioning against a latent batch."""
        self.context = self.frame_context(self.positive, "positive", batch)

    def __call__(self, x_in, t, progress):
        if self.context is None:
            self.check(x_in.shape[0])
        return self.run(x_in, t, self.context, self.cond), x_in


class ClassifierFreeGuidance:
    """``uncond + scale * (cond - uncond)`` on the steps where ``options.guided(progress)``,
    the two halves as one batch through the UNet; the conditional half alone elsewhere."""

    def __init__(self, base: VideoDenoiser, negative: torch.Tensor, scale: float, guided):
        self.base, self.negative, self.scale, self.guided = base, negative, scale, guided
        self.context = None

    def check(self, batch: int) -> None:
        self.base.check(batch)
        neg, pos = same_length(self.base.frame_context(self.negative, "negative", batch), self.base.context)
        self.context = torch.cat([neg, pos])

    def __call__(self, x_in, t, progress):
        if not self.guided(progress):
            return self.base(x_in, t, progress)
        if self.context is None:
            self.check(x_in.shape[0])
        cond = None if self.base.cond is None else torch.cat([self.base.cond, self.base.cond])
        uncond, cond_out = self.base.run(torch.cat([x_in, x_in]), torch.cat([t, t]), self.context, cond).chunk(2)
        return uncond + self.scale * (cond_out - uncond), x_in


@dataclass(frozen=True)
class ObjectTarget:
    """One object to steer: its token indices in the context and its asked path [frames, 3]: centre
    x, y (fractions of the frame side) and log radius, each less its mean over frames."""

    tokens: tuple[int, ...]
    path: torch.Tensor


def targets(request: dict | None, frames: int) -> list[ObjectTarget]:
    """The objects of a ``TextEncoder.motion_request`` as targets for a video of ``frames`` frames."""
    if not request:
        return []
    return [ObjectTarget(tuple(o["tokens"]), lexicon.path(o["path"], frames)) for o in request["objects"]]


MIN_SIDE = 8  # cross-attention grids coarser than this are not searched for blobs


def finest_attention_side(config, latent_height: int, latent_width: int) -> int:
    """The side (in cells) of a UNet's finest cross-attention grid on latents of that size
    (``config.attention_resolutions`` are the downsampling factors that have attention)."""
    levels = tuple(getattr(config, "attention_resolutions", ()) or ())
    return min(latent_height, latent_width) // min(levels) if levels else 0


def object_maps(probs: torch.Tensor, tokens: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Per object, the attention (mean over heads) each cell gives its tokens: ``probs`` [n, heads,
    cells, tokens] -> [n, cells] each."""
    look = probs.mean(1)
    return [look[..., list(t)].sum(-1) for t in tokens]


def track_loss(probs: list[torch.Tensor], targets: list[ObjectTarget], num_frames: int, unit_travel: float) -> torch.Tensor:
    """How far each object's attention blob moves from its asked path.

    Per cross-attention block of at least 8x8 cells and object: the blob is the object's map less
    its mean over the frame (negative parts dropped), normalised to sum 1; its centroid per frame,
    less its mean over the video's frames, is compared with the object's path: mean squared
    distance over frames, in units of ``unit_travel`` squared; mean over blocks, objects and videos."""
    losses = []
    for p in probs:
        side = math.isqrt(p.shape[2])
        if side < MIN_SIDE or side * side != p.shape[2]:
            continue
        grid = (torch.arange(side, dtype=p.dtype, device=p.device) + 0.5) / side
        gy, gx = torch.meshgrid(grid, grid, indexing="ij")
        pos = torch.stack([gx.flatten(), gy.flatten()], -1)  # [cells, 2] as (x, y)
        for a, target in zip(object_maps(p, [t.tokens for t in targets]), targets):
            blob = (a - a.mean(-1, keepdim=True)).clamp_min(0)
            blob = blob / blob.sum(-1, keepdim=True).clamp_min(1e-8)
            c = rearrange(blob @ pos, "(b f) d -> b f d", f=num_frames)
            c = c - c.mean(1, keepdim=True)
            if target.path.shape[0] != num_frames:
                raise ValueError(f"motion guidance: a path of {target.path.shape[0]} frames for a video of {num_frames}")
            path = target.path.to(c.device, c.dtype)
            losses.append(((c - path[:, :2]) ** 2).sum(-1).mean() / unit_travel**2)
    if not losses:
        raise ValueError(f"motion guidance needs cross-attention blocks of at least {MIN_SIDE}x{MIN_SIDE} latent cells; "
                         "this model and size have none (set motion_guidance to 0)")
    return torch.stack(losses).mean()


class MotionGuidance:
    """Steers the latent on the early steps, then runs ``inner`` on the moved latent.

    ``base``: the :class:`VideoDenoiser` whose UNet and positive text are steered against.
    ``strength``: how far each step moves the latent, in units of the gradient scaled to unit
    RMS (the latent itself has unit RMS at the start). ``until``: steer the steps up to this
    point of the schedule (0 pure noise, 1 clean), where the layout is decided. ``frozen`` (bool
    [(b f)]): frames that stay where they are (given frames). ``losses`` records the loss before
    each steered step."""

    def __init__(self, inner, base: VideoDenoiser, targets: list[ObjectTarget], *, strength: float, until: float,
                 unit_travel: float, frozen: torch.Tensor | None = None):
        self.inner, self.base, self.targets, self.strength, self.until = inner, base, targets, strength, until
        self.unit_travel, self.frozen = unit_travel, frozen
        self.blocks = [m.attn2 for m in base.unet.modules() if hasattr(m, "attn2")]
        self.losses: list[float] = []

    def check(self, batch: int) -> None:
        self.inner.check(batch)
        top = max(max(t.tokens) for t in self.targets)
        if top >= self.base.context.shape[1]:
            raise ValueError(f"motion guidance: the words name token {top}, but the conditioning has "
                             f"{self.base.context.shape[1]} tokens (is it from MagicVideo Text Encode?)")
        if any(p.is_inference() for p in self.base.unet.parameters()):
            raise ValueError("motion guidance: the UNet's weights were made under torch.inference_mode, so no "
                             "gradient can flow through them; load the model outside inference mode")

    def loss(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for m in self.blocks:
            m.record_probs = True
        try:
            self.base.run(z, t, self.base.context, self.base.cond)
            return track_loss([m.probs for m in self.blocks], self.targets, self.base.num_frames, self.unit_travel)
        finally:
            for m in self.blocks:
                m.record_probs, m.probs = False, None

    def __call__(self, x_in, t, progress):
        if progress <= self.until and self.strength > 0:
            x_in = self.steer(x_in, t)
        out, _ = self.inner(x_in, t, progress)
        return out, x_in

    def steer(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.base.context is None:
            self.check(x_in.shape[0])
        # the host samples under inference mode: the gradient w.r.t. the latent needs autograd back on,
        # and normal (cloned) copies of the inputs
        with torch.inference_mode(False), torch.enable_grad():
            z, t = x_in.detach().clone().requires_grad_(True), t.clone()
            loss = self.loss(z, t)
            (g,) = torch.autograd.grad(loss, z)
        self.losses.append(float(loss.detach()))
        moved = x_in - self.strength * g / g.pow(2).mean().sqrt().clamp_min(1e-12)
        if self.frozen is not None:
            moved = torch.where(self.frozen.view(-1, 1, 1, 1), x_in, moved)
        return moved.to(x_in.dtype)
