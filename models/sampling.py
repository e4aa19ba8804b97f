"""Sampling: one short loop over diffusers schedulers, a denoiser callable and seeded noise.

The noise schedule is Stable Diffusion's DDPM schedule (``scaled_linear`` betas from
0.00085 to 0.012 over 1000 steps). It is defined here once: the samplers are built from
:func:`schedule_config` and the trainer takes ``alphas_cumprod`` from :func:`training_schedule`.

Samplers (names as in ComfyUI's KSampler) are diffusers schedulers, not rewritten ones:
``ddim``, ``euler``, ``euler_ancestral``, ``dpmpp_2m``, ``uni_pc``; scheduler ``normal``
(evenly spaced "trailing" timesteps, which start at t=999 so a few steps already begin
from pure noise) or ``karras`` (Karras et al. sigmas; for ``euler``, ``dpmpp_2m``, ``uni_pc``).

What the loop runs is a *denoiser*: ``denoiser(x_in, t, progress) -> (output, x_in)``, the
model's output (epsilon or v) for the scaled sample ``x_in`` at timesteps ``t`` [(b f)], where
``progress`` is the step's place in the schedule (0 = pure noise, 1 = clean). Guidance is
a wrapper around a denoiser (``guidance.ClassifierFreeGuidance``, ``guidance.MotionGuidance``)
and may hand back a moved ``x_in``: the sampler's state moves with it. The settings of a run
are one :class:`SamplingOptions`; :data:`PRESETS` names the ones the workflows use.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)

__all__ = [
    "TRAIN_TIMESTEPS", "BETA_START", "BETA_END", "BETA_SCHEDULE", "SAMPLERS", "SCHEDULERS", "SamplingOptions",
    "PRESETS", "SETTINGS", "Denoiser", "schedule_config", "training_schedule", "make_scheduler", "predict_x0",
    "video_noise", "student_steps", "for_model", "sample",
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
    # few-step (multistep consistency) sampling: predict the clean latents, noise them afresh to the
    # next timestep; a few-step student (training/distill.py) samples so at its own timesteps
    "lcm": (LCMScheduler, {"original_inference_steps": TRAIN_TIMESTEPS}, False),
}
SAMPLERS = tuple(_SAMPLERS)
SCHEDULERS = ("normal", "karras")
# "model": a few-step student's file sets the sampling (for_model); "as_set": the options as they are
SETTINGS = ("model", "as_set")

Callback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class SamplingOptions:
    """The settings of one sampling run. The defaults are the main workflow's (``PRESETS["main"]``).

    ``cfg_start`` / ``cfg_end``: classifier-free guidance only on that part of the schedule, as
    fractions of the way from pure noise (0, t = 999) to clean (1, t = 0), like ComfyUI's
    start/end percent; other steps run the conditional half alone (half the UNet work).
    Guidance in a limited interval (Kynkaanniemi et al. 2024) keeps its adherence without its
    cost where it does not help. ``denoise`` < 1 is img2img as in diffusers: the schedule is
    built for ``steps`` and only its last ``int(steps * denoise)`` steps run, from the given
    latents noised to that level. ``noise_sharing``: the fraction of the starting noise's
    variance all frames of a video share (:func:`video_noise`); None = what the model was
    trained with. ``motion_guidance`` / ``motion_guidance_until``: how far, and up to which
    point of the schedule, each object is steered along the path its words ask for
    (``guidance.MotionGuidance``; 0 = off). The same seed gives the same video on any device.
    ``timesteps``: explicit timesteps from noise to clean (as many as ``steps``) instead of the
    scheduler's spacing; a few-step student's own come from its file (:func:`for_model`).
    ``settings``: ``"model"`` lets a few-step student's file set the sampling (its timesteps,
    at most as many steps as it has, guidance and motion guidance off); ``"as_set"`` runs these
    options as they are. Many-step models sample the same either way.
    """

    steps: int = 20
    cfg: float = 6.0
    cfg_start: float = 0.0
    cfg_end: float = 0.7
    sampler: str = "euler"
    scheduler: str = "normal"
    fps: float | None = 8.0
    denoise: float = 1.0
    noise_sharing: float | None = None
    seed: int = 0
    motion_guidance: float = 0.2
    motion_guidance_until: float = 0.3
    timesteps: tuple[int, ...] = ()
    settings: str = "model"

    def replace(self, **changes) -> "SamplingOptions":
        return dataclasses.replace(self, **changes)

    def check(self) -> "SamplingOptions":
        """ValueError naming the first setting out of range; returns self."""
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.cfg < 0:
            raise ValueError(f"cfg must be at least 0, got {self.cfg}")
        if not 0.0 <= self.cfg_start <= self.cfg_end <= 1.0:
            raise ValueError(f"need 0 <= cfg_start <= cfg_end <= 1, got cfg_start={self.cfg_start}, cfg_end={self.cfg_end}")
        make_scheduler(self.sampler, self.scheduler)  # names
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if not 0.0 <= self.denoise <= 1.0:
            raise ValueError(f"denoise must be between 0 and 1, got {self.denoise}")
        if self.noise_sharing is not None and not 0.0 <= self.noise_sharing < 1.0:
            raise ValueError(f"noise_sharing must be at least 0 and below 1, got {self.noise_sharing}")
        if self.motion_guidance < 0 or not 0.0 <= self.motion_guidance_until <= 1.0:
            raise ValueError(f"motion_guidance must be at least 0 and motion_guidance_until in 0..1; got "
                             f"{self.motion_guidance}, {self.motion_guidance_until}")
        if self.settings not in SETTINGS:
            raise ValueError(f"settings must be one of {list(SETTINGS)}, got {self.settings!r}")
        ts = list(self.timesteps)
        if ts and (len(ts) != self.steps or ts != sorted(set(ts), reverse=True) or not 0 <= ts[-1] <= ts[0] < TRAIN_TIMESTEPS):
            raise ValueError(f"timesteps must be {self.steps} (steps) distinct timesteps falling from noise to clean "
                             f"within 0..{TRAIN_TIMESTEPS - 1}; got {ts}")
        return self

    @classmethod
    def add_arguments(cls, parser, *, defaults: "SamplingOptions | None" = None, skip: tuple[str, ...] = ()) -> None:
        """Command-line flags for every setting (``--cfg-end`` for ``cfg_end``), defaulting to
        ``defaults`` (the main preset), so the CLI and the evaluator offer the same ones."""
        defaults = defaults or PRESETS["main"]
        group = parser.add_argument_group("sampling (defaults: the main workflow's)")
        for f in dataclasses.fields(cls):
            if f.name in skip or f.name == "timesteps":  # a student's timesteps come from its file
                continue
            kind = {"steps": int, "seed": int, "sampler": str, "scheduler": str, "settings": str}.get(f.name, float)
            choices = {"sampler": SAMPLERS, "scheduler": SCHEDULERS, "settings": SETTINGS}
            extra = {"choices": choices[f.name]} if kind is str else {}
            group.add_argument("--" + f.name.replace("_", "-"), type=kind, default=getattr(defaults, f.name),
                               help=_OPTION_HELP.get(f.name), **extra)

    @classmethod
    def from_args(cls, args, **changes) -> "SamplingOptions":
        """The options of parsed :meth:`add_arguments` flags (those skipped come from ``changes``
        or the defaults)."""
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls(**{**given, **changes})

    def guided(self, progress: float) -> bool:
        """Whether a step at this point of the schedule runs classifier-free guidance."""
        return self.cfg != 1.0 and self.cfg_start <= progress <= self.cfg_end


_OPTION_HELP = {
    "steps": "denoising steps of the full schedule",
    "cfg": "classifier-free guidance scale (1 = none, half the work)",
    "cfg_start": "guide from this point of the schedule (0 = pure noise, 1 = clean)",
    "cfg_end": "guide up to this point of the schedule; later steps run at cfg 1",
    "fps": "frame rate the model is conditioned on",
    "denoise": "1 = from pure noise; below 1 runs the last steps*denoise steps from the given video",
    "noise_sharing": "fraction of the starting noise's variance all frames share (default: the model's own)",
    "seed": "noise seed; the same seed gives the same video on any device",
    "motion_guidance": "steer each object along the path its words ask for (0 = off)",
    "motion_guidance_until": "steer the steps up to this point of the schedule (0 noise .. 1 clean)",
    "settings": "model: a few-step student's file sets steps (at most its own), sampler and timesteps, and turns "
                "guidance off; as_set: these options as they are",
}

PRESETS = {
    # the main workflow (workflows/text_to_video.json): guidance over the first 70% of the schedule,
    # objects steered along their paths over the first 30%
    "main": SamplingOptions(),
    # plain classifier-free guidance on every step, nothing steered
    "plain": SamplingOptions(cfg=7.5, cfg_end=1.0, motion_guidance=0.0),
}


def student_steps(schedule: tuple[int, ...], steps: int) -> tuple[int, ...]:
    """``steps`` of a student's timesteps (from noise to clean), evenly spread over them and always
    starting with the first (pure noise): (999, 749, 499, 249) gives (999, 499) for 2 steps and
    (999,) for 1. A student trained on all of them samples any such subset (its input at a later
    timestep is its own noised prediction either way)."""
    if not 1 <= steps <= len(schedule):
        raise ValueError(f"a student with {len(schedule)} timesteps {list(schedule)} samples 1 to {len(schedule)} "
                         f"steps, not {steps}")
    return tuple(schedule[round(i * len(schedule) / steps)] for i in range(steps))


def for_model(options: SamplingOptions, student_timesteps: tuple[int, ...] = ()) -> SamplingOptions:
    """The options a model samples with: unchanged for a many-step model (``student_timesteps``
    empty). For a few-step student with ``settings="model"``: its own timesteps (``options.steps``
    of them, at most all), the ``lcm`` sampler, no classifier-free guidance and no motion guidance
    (it was distilled to need neither). With ``settings="as_set"`` the options stay as they are,
    except that the ``lcm`` sampler runs on the student's timesteps when ``steps`` fits them."""
    if not student_timesteps or options.timesteps:
        return options
    steps = min(options.steps, len(student_timesteps))
    if options.settings == "model":
        return options.replace(sampler="lcm", scheduler="normal", steps=steps, cfg=1.0, motion_guidance=0.0,
                               timesteps=student_steps(student_timesteps, steps))
    if options.sampler == "lcm" and options.steps <= len(student_timesteps):
        return options.replace(timesteps=student_steps(student_timesteps, options.steps))
    return options


class Denoiser(Protocol):
    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]: ...


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


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    latents: torch.Tensor,
    *,
    num_frames: int,
    options: SamplingOptions,
    prediction_type: str,
    noise_sharing: float = 0.0,
    given: torch.Tensor | None = None,
    callback: Callback | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise video latents ``[(b f), c, h, w]`` (on the denoiser's device); returns float32 latents.

    ``denoise`` = 1 starts from pure noise (the latents give only the shape, and the given
    frames); below 1 from the latents noised to that level; a denoise that leaves no step
    returns the latents unchanged. ``noise_sharing``: see :func:`video_noise`.
    ``given`` (bool ``[(b f)]``): frames whose clean latents are in ``latents`` (an encoded image,
    the end of a previous window). The model sees them clean at timestep 0 and they come back
    unchanged; only the other frames are denoised.
    ``callback(step, total, x0)`` runs after each step (``step`` = steps done, 1..total; ``x0`` =
    the model's current clean-latent prediction); it may raise to stop sampling.
    ``noise``: the starting noise (shaped like ``latents``) instead of one drawn from
    ``options.seed``, for callers that seed parts of a batch apart (the interpolator's gaps).
    """
    options.check()
    if noise is not None and noise.shape != latents.shape:
        raise ValueError(f"noise must be shaped like the latents {tuple(latents.shape)}; got {tuple(noise.shape)}")
    if latents.ndim != 4 or num_frames < 1 or latents.shape[0] % num_frames:
        raise ValueError(f"latents must be [(videos x {num_frames} frames), channels, h, w]; got {tuple(latents.shape)}")
    device = latents.device
    sched = make_scheduler(options.sampler, options.scheduler, prediction_type)
    if options.timesteps:
        if "timesteps" not in inspect.signature(sched.set_timesteps).parameters:
            raise ValueError(f"the {options.sampler} sampler cannot run explicit timesteps; use lcm")
        sched.set_timesteps(timesteps=list(options.timesteps), device=device)
    else:
        sched.set_timesteps(options.steps, device=device)
    run = min(int(options.steps * options.denoise), options.steps)
    if run == 0:
        return latents.float().clone()
    start = (options.steps - run) * sched.order
    timesteps = sched.timesteps[start:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    progress = [1.0 - float(t) / (TRAIN_TIMESTEPS - 1) for t in timesteps]

    generator = torch.Generator("cpu").manual_seed(int(options.seed))
    if noise is None:
        noise = video_noise(latents.shape, num_frames, noise_sharing, generator)
    noise = noise.to(device)
    clean = latents.float()
    if start == 0:
        x = noise * sched.init_noise_sigma
    else:
        x = sched.add_noise(clean, noise, timesteps[:1])
    keep = None if given is None or not given.any() else given.to(device).view(-1, 1, 1, 1)

    alphas_cumprod = sched.alphas_cumprod.to(device, torch.float32)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    for i, t in enumerate(timesteps):
        x_in = sched.scale_model_input(x, t)  # the DDPM-space sample sqrt(a) x0 + sqrt(1 - a) eps
        t_batch = t.to(device).float().expand(latents.shape[0])
        if keep is not None:  # given frames enter clean, at timestep 0
            x_in = torch.where(keep, clean, x_in)
            t_batch = t_batch.masked_fill(keep.flatten(), 0.0)
        out, moved = denoiser(x_in, t_batch, progress[i])
        if moved is not x_in:  # guidance moved the sample: x_in is x times a per-step scalar
            x = x + (moved - x_in) / sched.scale_model_input(torch.ones_like(x[:1]), t)
            x_in = moved
        x0 = predict_x0(out, x_in, _alphas_at(alphas_cumprod, t.to(device)), prediction_type)
        x = sched.step(out, t, x, **step_kwargs).prev_sample
        if keep is not None:
            x0 = torch.where(keep, clean, x0)
            x = torch.where(keep, clean, x)
        if callback is not None:
            callback(i + 1, len(timesteps), x0)
    return x
