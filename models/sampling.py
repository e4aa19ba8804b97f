"""Sampling: one loop over diffusers schedulers, with classifier-free guidance and seeded noise.

The noise schedule is Stable Diffusion's DDPM schedule (``scaled_linear`` betas from
0.00085 to 0.012 over 1000 steps). It is defined here once: the samplers are built from
:func:`schedule_config` and the trainer takes ``alphas_cumprod`` from :func:`training_schedule`.

Samplers (names as in ComfyUI's KSampler) are diffusers schedulers, not rewritten ones:
``ddim``, ``euler``, ``euler_ancestral``, ``dpmpp_2m``, ``uni_pc``; scheduler ``normal``
(evenly spaced "trailing" timesteps, which start at t=999 so a few steps already begin
from pure noise) or ``karras`` (Karras et al. sigmas; for ``euler``, ``dpmpp_2m``, ``uni_pc``).

Conventions of :func:`sample`:

- ``denoise`` < 1 is img2img as in diffusers: the schedule is built for ``steps`` and only
  its last ``int(steps * denoise)`` steps run, starting from the given latents noised to
  that level. ``denoise`` = 1 starts from pure noise (the latents give only the shape);
  a denoise that leaves no step returns the latents unchanged.
- Conditioning: ``positive`` and ``negative`` are text embeddings ``[1 or b, seq, dim]``
  (one per video, or one for all). ``negative`` is required when ``cfg`` != 1; there is
  no implicit empty prompt because the library has no text encoder of its own at hand:
  callers encode the empty prompt (core CLIPTextEncode with empty text, or the model
  file's built-in text encoder, as the CLI does). Positive and negative of different
  lengths (long prompts) are repeated to a common length, which leaves cross-attention
  unchanged.
- Noise is drawn from a CPU ``torch.Generator`` seeded with ``seed`` and then moved, so a
  seed gives the same video on any device; ancestral samplers draw from the same generator.
- CFG runs the unconditional and conditional halves as one batch through the UNet.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from einops import rearrange, repeat

from .unet import check_perturbed_parts

__all__ = [
    "TRAIN_TIMESTEPS", "BETA_START", "BETA_END", "BETA_SCHEDULE", "SAMPLERS", "SCHEDULERS",
    "VideoModel", "schedule_config", "training_schedule", "make_scheduler", "reference_cond", "check_cfg_interval",
    "sample",
]

# the DDPM training schedule (SD's): the trainer and every sampler use these
TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
BETA_SCHEDULE = "scaled_linear"

# name -> (diffusers scheduler class, extra config, supports Karras sigmas)
_SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}, True),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}, False),
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": True}, False),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, True),
    "uni_pc": (UniPCMultistepScheduler, {}, True),
}
SAMPLERS = tuple(_SAMPLERS)
SCHEDULERS = ("normal", "karras")

# the text encoders that give common context widths, for error messages
_CONTEXT_SOURCES = {
    768: "an SD1.x checkpoint's CLIP through CLIPTextEncode",
    1024: "an SD2.x checkpoint's OpenCLIP through CLIPTextEncode",
    2048: "SDXL's CLIP pair through CLIPTextEncode",
}

Callback = Callable[[int, int, torch.Tensor], None]


@dataclass
class VideoModel:
    """What a MAGICVIDEO_MODEL carries: the VideoUNet and what the nodes need around it.

    ``scaling_factor`` is the paired VAE's: ComfyUI's LATENT holds unscaled VAE latents
    (the host scales inside its model wrapper), the UNet works on scaled ones.
    ``latent_rgb`` is a ``[channels + 1, 3]`` preview map on scaled latents (see
    ``vae.latent_to_rgb``), None when there is none.
    """

    unet: torch.nn.Module
    scaling_factor: float = 0.18215
    latent_rgb: torch.Tensor | None = None

    @property
    def config(self):
        return self.unet.config


def schedule_config(prediction_type: str = "epsilon") -> dict:
    """The diffusers config shared by every sampler (and the training schedule)."""
    return {
        "num_train_timesteps": TRAIN_TIMESTEPS,
        "beta_start": BETA_START,
        "beta_end": BETA_END,
        "beta_schedule": BETA_SCHEDULE,
        "prediction_type": prediction_type,
        "timestep_spacing": "trailing",
        "steps_offset": 0,
    }


def training_schedule() -> torch.Tensor:
    """``alphas_cumprod`` [1000] (float32) of the DDPM training schedule."""
    return DDPMScheduler(**{k: v for k, v in schedule_config().items() if k != "timestep_spacing"}).alphas_cumprod.float()


def make_scheduler(sampler: str, scheduler: str = "normal", prediction_type: str = "epsilon"):
    """A fresh diffusers scheduler for a sampler name and a scheduler name."""
    if sampler not in _SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {list(SAMPLERS)}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {list(SCHEDULERS)}")
    cls, extra, karras_ok = _SAMPLERS[sampler]
    config = {**schedule_config(prediction_type), **extra}
    if scheduler == "karras":
        if not karras_ok:
            ok = [name for name, (_, _, k) in _SAMPLERS.items() if k]
            raise ValueError(f"the karras scheduler works with the samplers {ok}, not {sampler!r}")
        config["use_karras_sigmas"] = True
    return cls(**config)


def given_reference(latents: torch.Tensor, reference: torch.Tensor, *, num_frames: int) -> tuple[torch.Tensor, int]:
    """Image-to-video for models trained with clean first frames (``config.image_first``):
    ``reference`` latents ``[r, c, h, w]`` become the first r frames of every video in
    ``latents`` ``[(b f), c, h, w]``. Returns (the new latents, r) for ``sample(..., given_frames=r)``."""
    r = reference.shape[0]
    if reference.ndim != 4 or reference.shape[1:] != latents.shape[1:]:
        raise ValueError(
            f"reference latents must be [frames, {latents.shape[1]}, {latents.shape[2]}, {latents.shape[3]}] like "
            f"the video's (encode a reference image of the video's size); got {tuple(reference.shape)}"
        )
    if not 0 < r < num_frames:
        raise ValueError(f"{r} reference frames given for a {num_frames}-frame video; give fewer than {num_frames}")
    video = latents.float().clone().view(-1, num_frames, *latents.shape[1:])
    video[:, :r] = reference.float().to(video.device)
    return video.flatten(0, 1), r


def reference_cond(reference: torch.Tensor | None, *, videos: int, num_frames: int, channels: int,
                   size: tuple[int, int]) -> torch.Tensor:
    """Magic 1-For-1's image prior as conditioning channels: ``[(b f), channels, h, w]``.

    ``reference`` latents ``[r, c, h, w]`` are the first r frames of every video (r <= frames),
    zero-padded over time, followed by a one-channel mask that is 1 on the given frames.
    ``reference=None`` gives all zeros: no frame is given (plain text-to-video).
    """
    h, w = size
    if reference is not None and channels == 0:
        raise ValueError(
            "reference latents given, but this model has no image-prior channels (cond_channels=0) and was not "
            "trained to continue given first frames (image_first); image-to-video needs one of the two"
        )
    cond = torch.zeros(videos, num_frames, channels, h, w)
    if reference is not None:
        r, c = reference.shape[:2]
        if c + 1 != channels:
            raise ValueError(
                f"this model takes {channels} conditioning channels ({channels - 1} latent + 1 mask); "
                f"the reference latents have {c} channels"
            )
        if reference.shape[-2:] != (h, w):
            raise ValueError(
                f"reference latents are {reference.shape[-1]}x{reference.shape[-2]} (w x h); "
                f"the video latents are {w}x{h}: encode a reference image of the video's size"
            )
        if r > num_frames:
            raise ValueError(f"{r} reference frames given for a {num_frames}-frame video")
        cond[:, :r, :c] = reference.float().cpu()
        cond[:, :r, c] = 1.0
    return rearrange(cond, "b f c h w -> (b f) c h w")


# ----------------------------------------------------------------------------- helpers


def _context(c: torch.Tensor, name: str, *, videos: int, frames: int, width: int) -> torch.Tensor:
    """[1 or b, seq, dim] -> [(b f), seq, dim], with clear errors."""
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
    c = c.expand(videos, -1, -1)
    return repeat(c, "b s d -> (b f) s d", f=frames)


def _same_length(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat token sequences to a common length; attention over repeated keys is unchanged."""
    la, lb = a.shape[1], b.shape[1]
    if la == lb:
        return a, b
    n = math.lcm(la, lb)
    return a.repeat(1, n // la, 1), b.repeat(1, n // lb, 1)


def predict_x0(out: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The clean latents a UNet output implies at ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``
    (``alpha_bar`` = a, broadcastable), for epsilon or v prediction."""
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * out
    return (x_t - (1 - alpha_bar).sqrt() * out) / alpha_bar.sqrt()


def _alphas_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at a (possibly fractional) timestep, interpolating log-sigma as diffusers does."""
    log_sigma = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log()
    t = t.float().clamp(0, len(alphas_cumprod) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(alphas_cumprod) - 1)
    frac = t - lo
    sigma = ((1 - frac) * log_sigma[lo] + frac * log_sigma[hi]).exp()
    return 1 / (1 + sigma**2)


# ----------------------------------------------------------------------------- the sampler


def video_noise(shape, num_frames: int, sharing: float, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """Unit-variance Gaussian noise ``[(b f), c, h, w]`` whose frames share ``sharing`` of
    their variance: ``sqrt(sharing) * shared + sqrt(1 - sharing) * own`` (the "mixed" noise
    prior of PYoCo, Ge et al. 2023). Each frame is still N(0, 1), so a model trained on
    independent noise sees in-distribution frames, but the frames start alike, which steadies
    objects across them; a model trained on it (``train``) learns to use that. ``sharing=0``
    draws exactly what plain ``torch.randn`` would. ``generator`` None = torch's global RNG.
    """
    own = torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
    if sharing <= 0:
        return own
    shared = torch.randn((shape[0] // num_frames, 1, *shape[1:]), generator=generator, dtype=torch.float32,
                         device=device)
    own = own.view(-1, num_frames, *shape[1:])
    return (sharing**0.5 * shared + (1 - sharing) ** 0.5 * own).flatten(0, 1)


def check_cfg_interval(cfg_start: float, cfg_end: float) -> None:
    """ValueError unless 0 <= cfg_start <= cfg_end <= 1 (see :func:`sample`)."""
    if not 0.0 <= cfg_start <= cfg_end <= 1.0:
        raise ValueError(f"need 0 <= cfg_start <= cfg_end <= 1, got cfg_start={cfg_start}, cfg_end={cfg_end}")


def check_cfg_rescale(cfg_rescale: float) -> None:
    """ValueError unless 0 <= cfg_rescale <= 1 (see :func:`rescale_guidance`)."""
    if not 0.0 <= cfg_rescale <= 1.0:
        raise ValueError(f"cfg_rescale must be between 0 and 1, got {cfg_rescale}")


def check_pag(pag: float, parts=("self",)) -> None:
    """ValueError unless pag >= 0 (perturbed-attention guidance's scale; 0 = off) and ``parts``
    are some of what ``VideoUNet.perturbed`` can weaken."""
    if not pag >= 0.0:
        raise ValueError(f"pag (perturbed-attention guidance) must be at least 0, got {pag}")
    check_perturbed_parts(parts)


def rescale_guidance(guided: torch.Tensor, cond_out: torch.Tensor, amount: float, *, x_t: torch.Tensor | None = None,
                     alpha_bar: torch.Tensor | None = None, prediction_type: str = "v_prediction") -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, "Common diffusion noise schedules and sample steps
    are flawed", section 3.4): a large cfg inflates the guided prediction's spread, which
    over-saturates colours and flattens backgrounds. In v space (as the paper, and ComfyUI's
    RescaleCFG), each frame's guided output ``[(b f), ...]`` is scaled to the standard deviation
    of the conditional output, and ``amount`` of that is mixed with the plain guided output
    (0 = plain cfg; the paper uses 0.7). Epsilon outputs are taken to v and back, which needs
    the model input ``x_t`` and its ``alpha_bar``."""
    if amount <= 0:
        return guided
    to_v = prediction_type == "epsilon"
    if to_v:
        if x_t is None or alpha_bar is None:
            raise ValueError("rescaling an epsilon prediction needs x_t and alpha_bar")
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        guided, cond_out = ((e - s * x_t) / a for e in (guided, cond_out))  # v = (eps - s x) / a
    dims = tuple(range(1, guided.ndim))
    ratio = cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-8)
    out = amount * guided * ratio + (1 - amount) * guided
    return a * out + s * x_t if to_v else out  # eps = a v + s x


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    *,
    num_frames: int,
    steps: int,
    cfg: float,
    sampler: str = "euler",
    scheduler: str = "normal",
    seed: int = 0,
    fps: float | None = None,
    denoise: float = 1.0,
    cond: torch.Tensor | None = None,
    callback: Callback | None = None,
    noise_sharing: float | None = None,
    given_frames: int = 0,
    image_first: bool | None = None,
    cfg_start: float = 0.0,
    cfg_end: float = 1.0,
    cfg_rescale: float = 0.0,
    pag: float = 0.0,
    pag_parts: tuple[str, ...] = ("self",),
    steer=None,
) -> torch.Tensor:
    """Denoise video latents ``[(b f), c, h, w]`` with a VideoUNet; returns float32 latents.

    ``callback(step, total, x0)`` runs after each step (``step`` = steps done, 1..total;
    ``x0`` = the model's current clean-latent prediction); it may raise to stop sampling.
    ``cond`` are the UNet's extra input channels ``[(b f), cond_channels, h, w]`` (see
    :func:`reference_cond`); zeros when the model has such channels and none are given.
    ``noise_sharing`` is the fraction of the starting noise's variance that all frames of a
    video share (see :func:`video_noise`); None = the prior the model was trained with
    (``config.noise_sharing``, 0 for models without the field).

    ``given_frames`` = k: the first k frames of every video in ``latents`` are given clean
    (an encoded image or the end of a previous window). The model sees them at timestep 0
    and they come back unchanged; only the other frames are denoised. This is image-to-video
    for models trained with clean first frames (``train``'s ``first_frame_prob``).
    ``image_first`` (None = ``config.image_first``): text-to-video as Magic 1-For-1 factors
    it, for such models: the first frame of each video is sampled alone (a text-to-image
    pass, 1/f of the work), then the rest from it. It applies when sampling from pure noise
    with no given frames; ``callback`` then counts the steps of both passes.

    ``cfg_start`` / ``cfg_end`` limit guidance to part of the schedule, as fractions of the
    way from pure noise (0, t = 999) to clean (1, t = 0), like ComfyUI's start/end percent: a
    step at timestep t is guided when ``cfg_start <= 1 - t / 999 <= cfg_end``; other steps run
    the conditional half alone (cfg 1, half the UNet work). Guidance in a limited interval
    (Kynkaanniemi et al. 2024) keeps its adherence without its cost where it does not help.
    ``cfg_rescale`` (0..1) rescales each guided step's output towards the conditional one's
    spread (:func:`rescale_guidance`; 0 = off).
    ``pag`` > 0: perturbed-attention guidance (Ahn et al. 2024) on the steps of that interval,
    with or without cfg: the output moves ``pag`` times further from what the model predicts
    with ``pag_parts`` weakened (``VideoUNet.perturbed``: by default its spatial self-attention
    maps made the identity; skipping its temporal branches instead is spatiotemporal skip
    guidance), one more UNet pass on each such step.

    ``steer`` (e.g. ``guidance.MotionGuidance``): on steps where ``steer.applies(progress)``
    (progress as for ``cfg_start``), ``steer(x_in, t, positive_context, num_frames=..., fps=...,
    cond=...)`` returns a moved model input, and the sampler's own state moves with it before
    the step is taken.
    """
    config = unet.config
    if latents.ndim != 4 or latents.shape[1] != config.in_channels:
        raise ValueError(f"latents must be [frames, {config.in_channels}, h, w]; got shape {tuple(latents.shape)}")
    if num_frames < 1 or latents.shape[0] % num_frames:
        raise ValueError(
            f"the latent batch has {latents.shape[0]} frames, which is not divisible by num_frames={num_frames}"
        )
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be between 0 and 1, got {denoise}")
    if noise_sharing is None:
        noise_sharing = float(getattr(unet.config, "noise_sharing", 0.0))
    if not 0.0 <= noise_sharing < 1.0:
        raise ValueError(f"noise_sharing must be at least 0 and below 1, got {noise_sharing}")
    check_cfg_interval(cfg_start, cfg_end)
    check_cfg_rescale(cfg_rescale)
    check_pag(pag, pag_parts)
    videos = latents.shape[0] // num_frames
    if not 0 <= given_frames < num_frames:
        raise ValueError(f"given_frames must be at least 0 and below num_frames={num_frames}, got {given_frames}")
    if image_first is None:
        image_first = bool(getattr(config, "image_first", False))
    if image_first and given_frames == 0 and denoise >= 1.0 and num_frames > 1:
        return _sample_image_first(
            unet, latents, positive, negative, num_frames=num_frames, steps=steps, cfg=cfg, sampler=sampler,
            scheduler=scheduler, seed=seed, fps=fps, cond=cond, callback=callback, noise_sharing=noise_sharing,
            cfg_start=cfg_start, cfg_end=cfg_end, cfg_rescale=cfg_rescale, pag=pag, pag_parts=pag_parts,
            steer=steer,
        )
    use_cfg = cfg != 1.0
    if use_cfg and negative is None:
        raise ValueError(
            "cfg != 1 needs negative conditioning (encode an empty prompt for plain classifier-free guidance)"
        )

    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    width = config.context_dim
    pos = _context(positive, "positive", videos=videos, frames=num_frames, width=width)
    if use_cfg:
        neg = _context(negative, "negative", videos=videos, frames=num_frames, width=width)
        neg, pos = _same_length(neg, pos)
        context = torch.cat([neg, pos])
    else:
        context = pos
    context = context.to(device, dtype)
    positive_context = context[-latents.shape[0]:]  # all of it without guidance

    if getattr(config, "cond_channels", 0):
        if cond is None:
            cond = torch.zeros(latents.shape[0], config.cond_channels, *latents.shape[-2:])
        elif cond.shape != (latents.shape[0], config.cond_channels, *latents.shape[-2:]):
            raise ValueError(
                f"cond must be [{latents.shape[0]}, {config.cond_channels}, {latents.shape[2]}, {latents.shape[3]}], "
                f"got {tuple(cond.shape)}"
            )
        cond = cond.to(device, dtype)
    elif cond is not None:
        raise ValueError("cond given, but this model has no conditioning channels (cond_channels=0)")

    sched = make_scheduler(sampler, scheduler, config.prediction_type)
    sched.set_timesteps(steps, device=device)
    run = min(int(steps * denoise), steps)
    if run == 0:
        return latents.float().clone()
    start = (steps - run) * sched.order
    timesteps = sched.timesteps[start:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)

    # which steps are guided, decided once: progress 1 - t / 999 within [cfg_start, cfg_end]
    progress = [1.0 - float(t) / (TRAIN_TIMESTEPS - 1) for t in timesteps]
    in_interval = [cfg_start <= p <= cfg_end for p in progress]
    guided = [use_cfg and inside for inside in in_interval]
    perturbed = [pag > 0 and inside for inside in in_interval]
    cond_pair = torch.cat([cond, cond]) if cond is not None and any(guided) else cond

    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = video_noise(latents.shape, num_frames, noise_sharing, generator).to(device)
    if run == steps and start == 0 and denoise >= 1.0:
        x = noise * sched.init_noise_sigma
    else:
        x = sched.add_noise(latents.to(device, torch.float32), noise, timesteps[:1])

    given = (torch.arange(latents.shape[0], device=device) % num_frames) < given_frames  # [(b f)]
    clean = latents.to(device, torch.float32)
    keep = given.view(-1, 1, 1, 1)

    alphas_cumprod = sched.alphas_cumprod.to(device, torch.float32)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        x_in = sched.scale_model_input(x, t)  # the DDPM-space sample sqrt(a) x0 + sqrt(1 - a) eps
        t_batch = t.to(device).float().expand(latents.shape[0])
        if given_frames:  # given frames enter clean, at timestep 0
            x_in = torch.where(keep, clean, x_in)
            t_batch = t_batch.masked_fill(given, 0.0)
        if steer is not None and steer.applies(progress[i]):
            moved = steer(x_in.to(dtype), t_batch, positive_context, num_frames=num_frames, fps=fps, cond=cond).float()
            if given_frames:
                moved = torch.where(keep, x_in, moved)
            # x_in is x times a per-step scalar (1 / sqrt(sigma^2 + 1) for the sigma samplers)
            x = x + (moved - x_in) / sched.scale_model_input(torch.ones_like(x[:1]), t)
            x_in = moved
        if guided[i]:
            out = unet(
                torch.cat([x_in, x_in]).to(dtype), torch.cat([t_batch, t_batch]), context,
                num_frames=num_frames, fps=fps, cond=cond_pair,
            ).float()
            uncond, cond_out = out.chunk(2)
            out = uncond + cfg * (cond_out - uncond)
        else:  # cfg 1, or outside the guidance interval: the positive half alone
            out = cond_out = unet(x_in.to(dtype), t_batch, positive_context, num_frames=num_frames, fps=fps,
                                  cond=cond).float()
        if perturbed[i]:
            with unet.perturbed(pag_parts):
                weak = unet(x_in.to(dtype), t_batch, positive_context, num_frames=num_frames, fps=fps,
                            cond=cond).float()
            out = out + pag * (cond_out - weak)
        if guided[i] or perturbed[i]:
            out = rescale_guidance(out, cond_out, cfg_rescale, x_t=x_in,
                                   alpha_bar=_alphas_at(alphas_cumprod, t.to(device)),
                                   prediction_type=config.prediction_type)

        x0 = predict_x0(out, x_in, _alphas_at(alphas_cumprod, t.to(device)), config.prediction_type)

        x = sched.step(out, t, x, **step_kwargs).prev_sample
        if given_frames:
            x0 = torch.where(keep, clean, x0)
            x = torch.where(keep, clean, x)
        if callback is not None:
            callback(i + 1, total, x0)
    return x


FIT_TIMESTEPS = (100, 300, 500, 700, 900)


@torch.no_grad()
def caption_fit(unet: torch.nn.Module, latents: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, *,
                num_frames: int, fps: float | None = None, timesteps=FIT_TIMESTEPS, seed: int = 0) -> dict:
    """How well the model finds that clean video latents ``[(b f), c, h, w]`` (scaled) fit a
    caption: each is noised to every timestep in ``timesteps`` (the same seeded noise, so two
    videos are compared on equal terms) and the UNet's mean squared error in its own
    prediction space is taken under ``positive`` and under ``negative`` (e.g. the empty
    prompt). A lower error under the caption, or a larger drop from the negative to it, says
    the caption explains the video better (the diffusion-classifier principle, Li et al. 2023).
    Returns ``{"cond": {t: error}, "uncond": {t: error}}``, each the mean over all the frames
    given: pass one video at a time to compare videos."""
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    videos = latents.shape[0] // num_frames
    width = unet.config.context_dim
    pos = _context(positive, "positive", videos=videos, frames=num_frames, width=width)
    neg = _context(negative, "negative", videos=videos, frames=num_frames, width=width)
    neg, pos = _same_length(neg, pos)
    context = torch.cat([pos, neg]).to(device, dtype)
    x0 = latents.to(device, torch.float32)
    alphas = training_schedule().to(device)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    fps_in = None if fps is None else torch.full((2 * x0.shape[0],), float(fps), device=device)
    sharing = float(getattr(unet.config, "noise_sharing", 0.0))  # noise as the model was trained on
    out = {"cond": {}, "uncond": {}}
    for t in timesteps:
        noise = video_noise(x0.shape, num_frames, sharing, generator).to(device)
        a = alphas[int(t)]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if unet.config.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        t_in = torch.full((2 * x0.shape[0],), float(t), device=device)
        pred = unet(torch.cat([x_t, x_t]).to(dtype), t_in, context, num_frames=num_frames, fps=fps_in).float()
        cond_err, uncond_err = ((p - target).pow(2).mean().item() for p in pred.chunk(2))
        out["cond"][str(int(t))], out["uncond"][str(int(t))] = cond_err, uncond_err
    return out


def _sample_image_first(unet, latents, positive, negative, *, num_frames: int, steps: int, callback, cond, **kwargs):
    """Text-to-video in two passes: frame 0 of every video alone, then the others given it."""
    steer = kwargs.pop("steer", None)  # a path over the video's frames: the second pass only
    videos = latents.shape[0] // num_frames
    first = latents.view(videos, num_frames, *latents.shape[1:])[:, 0]
    first_cond = None if cond is None else cond.view(videos, num_frames, *cond.shape[1:])[:, 0]

    def first_pass(step, total, x0):  # previews show the first frame on every frame meanwhile
        if callback is not None:
            callback(step, 2 * total, x0.repeat_interleave(num_frames, 0))

    def second_pass(step, total, x0):
        if callback is not None:
            callback(total + step, 2 * total, x0)

    image = sample(unet, first, positive, negative, num_frames=1, steps=steps, callback=first_pass, cond=first_cond,
                   image_first=False, **kwargs)
    video = latents.float().clone().view(videos, num_frames, *latents.shape[1:])
    video[:, 0] = image.to(video.device)
    return sample(unet, video.flatten(0, 1), positive, negative, num_frames=num_frames, steps=steps,
                  callback=second_pass, cond=cond, given_frames=1, image_first=False, steer=steer, **kwargs)
