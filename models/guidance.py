"""Motion guidance: on the early sampling steps, move the noisy latent so that each object's
cross-attention blob travels the path its caption asks for.

The bundled default's words bind to their object (``unet.binding_weight``, TRAINING.md
sessions 9-10): the cells of a red circle attend to "red", "circle" and its motion words, and
another object's cells to that object's words. So per frame the attention each cell gives an
object's words is a map of where that object is. Sampling from noise, the model lays the
objects out in the first steps, and with two objects their motions often go wrong (each
object's motion right 80% of the time alone in a clip, 30% beside another; session 18). This
takes the caption's motion for each object (``world.parse_caption``), the centre path it
asks for (``world.trajectory``, less its mean: no start place is asked for), and on each
steered step moves the latent down the gradient of how far the blobs' centroids are from
those paths, as Attend-and-Excite (Chefer et al. 2023) moves it to bring out missing subjects.

Only the built-in text encoder's captions can be read this way (one token per known word,
<bos> first); other conditioning samples unsteered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

from . import world
from .text import normalise


MOTION_WORDS_KEY = "magicvideo_words"  # CONDITIONING dict key: the known words of a built-in-encoder prompt


@dataclass(frozen=True)
class ObjectTarget:
    """One object to steer: its token indices in the context and its asked path [frames, 3]: centre
    x, y (fractions of the frame side) and log radius, each less its mean over frames."""

    tokens: tuple[int, ...]
    path: torch.Tensor


def caption_path(motion: str | None, speed: str | None, frames: int) -> torch.Tensor | None:
    """The path [frames, 3] a motion asks for: centre x, y and log radius, less their means (a
    centre in place for grow, shrink, rotate, still; a steady size but for grow and shrink); None
    when the caption gives no motion. A motion without a speed word ("a red circle moving to the
    left") gets the slow one's path."""
    if motion is None:
        return None
    if motion != "still" and speed is None:
        speed = "slow"
    obj = world.ObjectSpec("red", "circle", motion, speed, 0.5, 0.5, 0.1)
    x, y, r, _ = world.trajectory(obj, frames)
    path = torch.tensor(np.stack([x, y, np.log(r)], -1), dtype=torch.float32)
    return path - path.mean(0)


def targets_from_caption(caption: str, known: set[str], frames: int) -> list[ObjectTarget]:
    """The objects of a caption for the built-in text encoder, whose context is <bos> then one token
    per known word (unknown words left out, as ``TextEncoder.tokenize`` does); objects without a
    motion path are left out (they are not steered)."""
    kept = [w for w in normalise(caption) if w in known]
    out = []
    for obj in world.parse_caption(" ".join(kept)):
        path = caption_path(obj.motion, obj.speed, frames)
        if path is not None:
            out.append(ObjectTarget(tuple(i + 1 for i in obj.words), path))
    return out


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


def track_loss(probs: list[torch.Tensor], targets: list[ObjectTarget], num_frames: int,
               size_weight: float = 0.0, separation_weight: float = 0.0) -> torch.Tensor:
    """How far each object's attention blob moves from its asked path.

    Per cross-attention block of at least 8x8 cells and object: the blob is the object's map less
    its mean over the frame (negative parts dropped), normalised to sum 1; its centroid per frame,
    less its mean over the video's frames, is compared with the object's path: mean squared
    distance over frames, in units of the world's slow linear travel squared; mean over blocks,
    objects and videos. With ``size_weight`` the log of the blob's spread (RMS distance from its
    centroid), less its mean, is compared with the path's log radius too (in units of the slow
    grow's log scale squared) and added with that weight. With ``separation_weight`` and two or
    more objects, each block also adds that weight times the mean overlap of the objects' blobs
    (Bhattacharyya coefficient per frame: 1 on the same cells, 0 apart), as one more term of the
    mean, to keep two objects from being laid out on the same cells (session 20 measured it no
    better: docs/TRAINING.md; off by default)."""
    losses = []
    for p in probs:
        side = math.isqrt(p.shape[2])
        if side < MIN_SIDE or side * side != p.shape[2]:
            continue
        grid = (torch.arange(side, dtype=p.dtype, device=p.device) + 0.5) / side
        gy, gx = torch.meshgrid(grid, grid, indexing="ij")
        pos = torch.stack([gx.flatten(), gy.flatten()], -1)  # [cells, 2] as (x, y)
        blobs = []
        for a, target in zip(object_maps(p, [t.tokens for t in targets]), targets):
            blob = (a - a.mean(-1, keepdim=True)).clamp_min(0)
            blob = blob / blob.sum(-1, keepdim=True).clamp_min(1e-8)
            blobs.append(blob)
            centre = blob @ pos  # [(b f), 2]
            c = rearrange(centre, "(b f) d -> b f d", f=num_frames)
            c = c - c.mean(1, keepdim=True)
            if target.path.shape[0] != num_frames:
                raise ValueError(f"motion guidance: a path of {target.path.shape[0]} frames for a video of {num_frames}")
            path = target.path.to(c.device, c.dtype)
            loss = ((c - path[:, :2]) ** 2).sum(-1).mean() / world.LINEAR_TRAVEL["slow"] ** 2
            if size_weight:
                spread = (blob * ((pos[None] - centre[:, None]) ** 2).sum(-1)).sum(-1).clamp_min(1e-8).sqrt()
                log_s = rearrange(spread.log(), "(b f) -> b f", f=num_frames)
                log_s = log_s - log_s.mean(1, keepdim=True)
                loss = loss + size_weight * ((log_s - path[:, 2]) ** 2).mean() / math.log(world.SCALE_FACTOR["slow"]) ** 2
            losses.append(loss)
        if separation_weight and len(blobs) > 1:
            overlap = [(blobs[i] * blobs[j]).clamp_min(1e-12).sqrt().sum(-1).mean()
                       for i in range(len(blobs)) for j in range(i + 1, len(blobs))]
            losses.append(separation_weight * torch.stack(overlap).mean())
    if not losses:
        raise ValueError(f"motion guidance needs cross-attention blocks of at least {MIN_SIDE}x{MIN_SIDE} latent cells; "
                         "this model and size have none (set motion_guidance to 0)")
    return torch.stack(losses).mean()


class MotionGuidance:
    """Steers a sampler's latent on its early steps (``sampling.sample(..., steer=...)``).

    ``strength``: how far each gradient step moves the latent, in units of the gradient scaled
    to unit RMS (the latent itself has unit RMS at the start). ``until``: steer the steps up to
    this point of the schedule (0 pure noise, 1 clean), where the layout is decided. ``iters``:
    gradient steps per steered step. ``size_weight``, ``separation_weight``: see :func:`track_loss`.
    ``losses`` records the loss before each steered step, and with ``record`` (one more UNet pass per
    step) after it too, as (before, after) pairs."""

    def __init__(self, unet: torch.nn.Module, targets: list[ObjectTarget], *, strength: float, until: float = 0.3,
                 iters: int = 1, size_weight: float = 0.0, separation_weight: float = 0.0, record: bool = False):
        if strength < 0 or not 0 <= until <= 1 or iters < 1:
            raise ValueError(f"motion guidance: strength must be >= 0, until in 0..1 and iters >= 1; "
                             f"got {strength}, {until}, {iters}")
        self.unet, self.targets, self.strength, self.until, self.iters = unet, targets, strength, until, iters
        self.size_weight, self.separation_weight, self.record = size_weight, separation_weight, record
        self.blocks = [m.attn2 for m in unet.modules() if hasattr(m, "attn2")]
        self.losses: list[tuple[float, float]] = []

    def applies(self, progress: float) -> bool:
        return bool(self.targets) and self.strength > 0 and progress <= self.until

    def loss(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kw) -> torch.Tensor:
        for m in self.blocks:
            m.record_probs = True
        try:
            self.unet(z, t, context, **kw)
            return track_loss([m.probs for m in self.blocks], self.targets, kw["num_frames"], self.size_weight,
                              self.separation_weight)
        finally:
            for m in self.blocks:
                m.record_probs, m.probs = False, None

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kw) -> torch.Tensor:
        """The moved model input (same shape) for the UNet input ``x_in`` at timesteps ``t`` with the
        positive ``context``; ``kw`` are the UNet's keywords (``num_frames``, ``fps``, ``cond``)."""
        top = max(max(t.tokens) for t in self.targets)
        if top >= context.shape[1]:
            raise ValueError(f"motion guidance: the words name token {top}, but the conditioning has "
                             f"{context.shape[1]} tokens (is it from MagicVideo Text Encode?)")
        if any(p.is_inference() for p in self.unet.parameters()):
            raise ValueError("motion guidance: the UNet's weights were made under torch.inference_mode, so no "
                             "gradient can flow through them; load the model outside inference mode")
        first = None
        # the host samples under inference mode: the gradient w.r.t. the latent needs autograd back on,
        # and normal (cloned) copies of the inputs
        with torch.inference_mode(False), torch.enable_grad():
            z, t, context = x_in.detach().clone(), t.clone(), context.clone()
            kw = {k: v.clone() if torch.is_tensor(v) else v for k, v in kw.items()}
            for _ in range(self.iters):
                z.requires_grad_(True)
                loss = self.loss(z, t, context, **kw)
                first = float(loss.detach()) if first is None else first
                (g,) = torch.autograd.grad(loss, z)
                z = (z - self.strength * g / g.pow(2).mean().sqrt().clamp_min(1e-12)).detach()
        if self.record:
            with torch.no_grad():
                self.losses.append((first, float(self.loss(z, t, context, **kw))))
        else:
            self.losses.append((first, None))
        return z.to(x_in.dtype)
