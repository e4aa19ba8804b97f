"""The generation path: every caller (the nodes, the command line, the evaluator, the
benchmark, training's samples) generates through these functions.

    bundle = checkpoint.load_model("weights/magicvideo_default.safetensors")
    frames = text_to_video(bundle, "a red circle moving to the left", options=PRESETS["main"].replace(seed=1))
    # [16, 64, 64, 3] in 0..1

The steps, each a function a node can call alone:

1. :func:`prepare` puts a loaded bundle on a device in the dtypes of :func:`resolve_dtypes`
   (the one dtype policy);
2. :func:`encode_prompt`: a prompt through the file's built-in text encoder;
3. :func:`sample_video`: text embeddings (+ given frames) -> video latents. It checks the
   request, builds the denoiser with its guidance pieces (``guidance``), makes text-to-video
   image-first for models trained so, and runs ``sampling.sample``;
4. :func:`decode_frames`: latents -> frames in the host's IMAGE layout.

:func:`text_to_video` and :func:`conditioning_to_video` chain them for callers without a host.
Latents here are *scaled* (as the UNet sees them); ComfyUI's LATENT holds unscaled ones, and
the nodes convert with ``VideoModel.scaling_factor``. Errors about the request (size, prompt
words, missing parts, settings) are :class:`RequestError`, a ``ValueError``, raised before any
sampling starts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import guidance, sampling
from .conditioning import GivenFrames, no_frames_given
from .sampling import PRESETS, SamplingOptions
from .text import unknown_words_message

__all__ = [
    "RequestError", "UnknownWordsError", "VideoModel", "DTYPES", "PRESETS", "SamplingOptions", "resolve_dtypes",
    "prepare", "check_size", "build_denoiser", "encode_prompt", "encode_frames", "sample_video", "decode_frames",
    "conditioning_to_video", "text_to_video",
]

log = logging.getLogger(__name__)

Callback = Callable[[int, int, torch.Tensor], None]

DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class RequestError(ValueError):
    """What was asked for does not fit the model (size, words, missing parts, settings)."""


class UnknownWordsError(RequestError):
    """The prompt has words the built-in text encoder does not know; ``words`` lists them."""

    def __init__(self, message: str, words: list[str]):
        super().__init__(message)
        self.words = words


@dataclass
class VideoModel:
    """What a MAGICVIDEO_MODEL carries: the VideoUNet and what sampling needs around it.

    ``scaling_factor`` is the paired VAE's: ComfyUI's LATENT holds unscaled VAE latents,
    the UNet works on scaled ones. ``latent_rgb`` is a ``[channels + 1, 3]`` preview map on
    scaled latents (see ``vae.latent_to_rgb``), None when there is none.
    """

    unet: torch.nn.Module
    scaling_factor: float = 0.18215
    latent_rgb: torch.Tensor | None = None

    @property
    def config(self):
        return self.unet.config


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so stage timings measure the stage."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_dtypes(choice: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(UNet dtype, VAE dtype) for a dtype choice (a key of :data:`DTYPES`). ``auto``: bf16 on a
    GPU that has it, else fp16 with the VAE in fp32 (SD's VAE overflows in fp16); fp32 on CPU."""
    if choice not in DTYPES:
        raise RequestError(f"dtype must be one of {list(DTYPES)}, got {choice!r}")
    if DTYPES[choice] is not None:
        return DTYPES[choice], (torch.float32 if choice == "fp16" else DTYPES[choice])
    if torch.device(device).type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return (torch.bfloat16 if bf16 else torch.float16), (torch.bfloat16 if bf16 else torch.float32)
    return torch.float32, torch.float32


def prepare(bundle, *, device=None, dtype: str = "auto"):
    """Put the bundle's modules (in place) on ``device`` (None: where they are) in the dtypes of
    :func:`resolve_dtypes`, in eval mode without gradients; returns (unet, vae, text_encoder).
    The text encoder keeps its dtype (it is small; its output is cast to the UNet's)."""
    unet, vae = bundle.unet, bundle.vae
    if unet is None or vae is None:
        missing = "UNet" if unet is None else "VAE"
        raise RequestError(f"{bundle.source or 'the model'} has no {missing}: expected a full model file (UNet and VAE)")
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    unet_dtype, vae_dtype = resolve_dtypes(dtype, device)
    text = getattr(bundle, "text_encoder", None)
    unet.to(device=device, dtype=unet_dtype)
    vae.to(device=device, dtype=vae_dtype)
    if text is not None:
        text.to(device)
    for module in (unet, vae, text):
        if module is not None:
            module.eval().requires_grad_(False)
    return unet, vae, text


def check_size(downscale: int, width: int, height: int, frames: int) -> None:
    """RequestError unless the video's size fits a VAE of that downscale."""
    if width % downscale or height % downscale or width <= 0 or height <= 0:
        raise RequestError(f"width and height must be positive multiples of {downscale} (the VAE's downscale), "
                           f"got {width}x{height}")
    if frames < 1:
        raise RequestError(f"frames must be at least 1, got {frames}")


def encode_prompt(text_encoder, text: str, *, ignore_unknown_words: bool = False) -> torch.Tensor:
    """One prompt through a built-in text encoder -> context ``[1, tokens, width]``.

    Unknown words raise :class:`UnknownWordsError` naming them (with close known words);
    with ``ignore_unknown_words`` they are left out and logged as a warning.
    """
    if text_encoder is None:
        raise RequestError(
            "this model file has no built-in text encoder; give text embeddings instead "
            "(positive [and negative] tensors [1, tokens, width], e.g. from CLIPTextEncode)"
        )
    with torch.no_grad():
        context, unknown = text_encoder.encode([text])
    if unknown:
        message = unknown_words_message(unknown, text_encoder.config)
        if not ignore_unknown_words:
            raise UnknownWordsError(message, unknown)
        log.warning("%s Leaving them out.", message)
    return context


@torch.no_grad()
def encode_frames(vae, frames: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
    """Frames ``[F, H, W, 3]`` in 0..1 -> scaled latents ``[F, c, h, w]`` (float32, CPU)."""
    down = vae.config.downscale
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise RequestError(f"frames must be [frames, height, width, 3] in 0..1; got {tuple(frames.shape)}")
    if frames.shape[1] % down or frames.shape[2] % down:
        raise RequestError(f"frames of {frames.shape[2]}x{frames.shape[1]} cannot be encoded: width and height must "
                           f"be multiples of {down} (the VAE's downscale)")
    param = next(vae.parameters())
    pixels = frames.movedim(-1, 1).to(param.device, param.dtype) * 2 - 1
    return vae.encode(pixels, chunk_size=chunk_size).float().cpu()


@torch.no_grad()
def decode_frames(vae, latents: torch.Tensor, frames: int, chunk_size: int = 8) -> torch.Tensor:
    """Scaled latents ``[(b f), c, h, w]`` -> frames ``[(b f), H, W, 3]`` float32 in 0..1 on the CPU."""
    param = next(vae.parameters())
    images = vae.decode(latents.to(param.device, param.dtype), num_frames=frames, chunk_size=chunk_size)
    return ((images.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()


def _given_inputs(config, given: GivenFrames | None, latents: torch.Tensor, num_frames: int):
    """How a request's given frames reach the model: (latents, cond channels or None, mask or None).

    Models with image-prior channels see them there *and* as clean frames at timestep 0, as
    the trainer shows them (``training/unet.py``); models trained image-first see the clean
    frames only. Either way the given frames come back unchanged."""
    videos = latents.shape[0] // num_frames
    channels = getattr(config, "cond_channels", 0)
    if given is not None:
        given.check(num_frames, tuple(latents.shape[1:]), videos)
        if channels and given.latents.shape[1] + 1 != channels:
            raise RequestError(f"this model takes {channels} conditioning channels ({channels - 1} latent + 1 mask); "
                               f"the given frames have {given.latents.shape[1]} channels")
        if not channels and not getattr(config, "image_first", False):
            raise RequestError(
                "frames were given (image-to-video or continuation), but this model has no image-prior channels "
                "(cond_channels=0) and was not trained to continue given frames (image_first): it cannot take them"
            )
    if given is None:
        cond = no_frames_given(videos, num_frames, channels, tuple(latents.shape[-2:])) if channels else None
        return latents, cond, None
    cond = given.channels(videos, num_frames) if channels else None
    return given.place(latents, num_frames), cond, given.mask(videos, num_frames)


def build_denoiser(unet, positive, negative, *, num_frames, options, cond=None, mask=None, motion=None, targets=()):
    """The VideoUNet wrapped in the guidance pieces ``options`` ask for (``sampling.Denoiser``).
    :func:`sample_video` builds one per request; the long-video path one per group of windows."""
    base = guidance.VideoDenoiser(unet, positive, num_frames=num_frames, fps=options.fps, cond=cond)
    denoiser = base
    if options.cfg != 1.0:
        if negative is None:
            raise RequestError("cfg != 1 needs a negative conditioning (an encoded empty prompt for plain guidance), "
                               "or cfg 1")
        denoiser = guidance.ClassifierFreeGuidance(base, negative, options.cfg, options.guided)
    if targets:
        denoiser = guidance.MotionGuidance(denoiser, base, targets, strength=options.motion_guidance,
                                           until=options.motion_guidance_until, unit_travel=motion["unit_travel"],
                                           frozen=mask)
    return denoiser


def sample_video(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    *,
    num_frames: int,
    options: SamplingOptions = PRESETS["main"],
    given: GivenFrames | None = None,
    motion: dict | None = None,
    callback: Callback | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Text embeddings -> video latents: the one sampling call of every caller.

    ``latents`` ``[(b f), c, h, w]`` (scaled) give the shape, and the start when
    ``options.denoise`` < 1. ``positive`` / ``negative``: ``[1 or b, tokens, width]``;
    ``negative`` is needed when ``options.cfg`` != 1. ``given``: frames the video must contain
    (see ``conditioning``). ``motion``: what the prompt asks of each object
    (``TextEncoder.motion_request``), for ``options.motion_guidance``; None = unsteered.
    ``callback(step, total, x0)`` runs after each step and may raise to stop. ``noise``: the
    starting noise, shaped like ``latents`` (default: drawn from ``options.seed``). A few-step
    student samples with the settings its file sets (``sampling.for_model``). Models trained
    image-first make text-to-video as text-to-image then image-to-video (Magic 1-For-1): frame 0
    of each video alone, then the rest given it; the callback counts both passes.
    Returns float32 latents on the UNet's device.
    """
    config = unet.config
    try:
        options = sampling.for_model(options.check(), getattr(config, "student_timesteps", ()))
        if latents.ndim != 4 or latents.shape[1] != config.in_channels:
            raise RequestError(f"latents must be [frames, {config.in_channels}, h, w]; got {tuple(latents.shape)}")
        if num_frames < 1 or latents.shape[0] % num_frames:
            raise RequestError(f"the latent batch has {latents.shape[0]} frames, which is not divisible by "
                               f"num_frames={num_frames}")
        targets = guidance.targets(motion, num_frames) if options.motion_guidance > 0 else []
        if targets:
            side = guidance.finest_attention_side(config, *latents.shape[-2:])
            if side < guidance.MIN_SIDE:
                raise RequestError(
                    f"motion guidance needs cross-attention blocks of at least {guidance.MIN_SIDE}x{guidance.MIN_SIDE} "
                    f"latent cells; this model's finest is {side}x{side} here (set motion_guidance to 0, or go larger)")
        if getattr(config, "image_first", False) and given is None and options.denoise >= 1.0 and num_frames > 1:
            return _image_first(unet, latents, positive, negative, num_frames=num_frames, options=options,
                                motion=motion, callback=callback)
        start, cond, mask = _given_inputs(config, given, latents, num_frames)
        denoiser = build_denoiser(unet, positive, negative, num_frames=num_frames, options=options, cond=cond, mask=mask,
                             motion=motion, targets=targets)
        denoiser.check(latents.shape[0])
    except ValueError as e:
        raise RequestError(str(e)) from None
    device = next(unet.parameters()).device
    sharing = options.noise_sharing if options.noise_sharing is not None else float(getattr(config, "noise_sharing", 0.0))
    return sampling.sample(denoiser, start.to(device), num_frames=num_frames, options=options,
                           prediction_type=config.prediction_type, noise_sharing=sharing,
                           given=None if mask is None else mask.to(device), callback=callback, noise=noise)


def _image_first(unet, latents, positive, negative, *, num_frames, options, motion, callback):
    """Text-to-video in two passes: frame 0 of every video alone (text to image), then the others given it."""
    videos = latents.shape[0] // num_frames
    first = latents.view(videos, num_frames, *latents.shape[1:])[:, 0]

    def first_pass(step, total, x0):  # previews show the first frame on every frame meanwhile
        if callback is not None:
            callback(step, 2 * total, x0.repeat_interleave(num_frames, 0))

    def second_pass(step, total, x0):
        if callback is not None:
            callback(total + step, 2 * total, x0)

    # a path over the video's frames steers the second pass only
    image = sample_video(unet, first, positive, negative, num_frames=1, options=options.replace(motion_guidance=0.0),
                         callback=first_pass)
    given = GivenFrames(image.cpu(), (0,))
    return sample_video(unet, latents, positive, negative, num_frames=num_frames, options=options, given=given,
                        motion=motion, callback=second_pass)


def _check_upscaler(upscaler, vae, positive: torch.Tensor) -> None:
    """Before any sampling: an upscaler reading latents or text must take this VAE's and this prompt's."""
    from .upscale import check_text

    cfg = upscaler.config
    if cfg.latent_channels and (cfg.latent_channels, cfg.latent_down) != (vae.config.embed_dim, vae.config.downscale):
        raise RequestError(f"the upscaler reads latents of {cfg.latent_channels} channels at 1/{cfg.latent_down} "
                           f"size; this model's VAE makes {vae.config.embed_dim} at 1/{vae.config.downscale}")
    try:
        check_text(upscaler, positive if cfg.text_channels else None)
    except ValueError as exc:
        raise RequestError(str(exc)) from None


def conditioning_to_video(
    bundle,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    *,
    frames: int = 16,
    width: int = 64,
    height: int = 64,
    options: SamplingOptions = PRESETS["main"],
    given_images: torch.Tensor | None = None,
    given_indices: tuple[int, ...] | None = None,
    init_video: torch.Tensor | None = None,
    motion: dict | None = None,
    device=None,
    dtype: str = "auto",
    chunk_size: int = 8,
    callback: Callback | None = None,
    timings: dict | None = None,
    latents_only: bool = False,
    interpolate: int = 1,
    interpolator=None,
    upscaler=None,
) -> torch.Tensor:
    """Text embeddings -> frames ``[frames, height, width, 3]`` float32 in 0..1 on the CPU.

    ``given_images`` ``[k, height, width, 3]`` in 0..1 are encoded and given at ``given_indices``
    (default: the first k frames; image-to-video and continuation). ``init_video`` ``[frames,
    height, width, 3]`` with ``options.denoise`` < 1 is video-to-video (denoise 0 = a VAE round
    trip). ``interpolate`` k > 1: the keyframes go through the frame interpolator
    (``models/interpolate.py``, its preset's steps, ``options.seed``) with the positive text,
    making ``(frames - 1) * k + 1`` frames at ``options.fps * k``; ``interpolator``: the bundle
    whose UNet interpolates (default this one). ``timings``, when given, receives seconds per
    stage: ``sampling``, ``interpolation``, ``vae_decode``, ``upscale``. ``latents_only``: skip the VAE and
    return the latents (scaled) float32 on the CPU. ``upscaler``: a super-resolver
    (``models/upscale.py``) raises the decoded frames 4x, reading the latents and the positive
    text when it was trained to.
    """
    unet, vae, _ = prepare(bundle, device=device, dtype=dtype)
    check_size(vae.config.downscale, width, height, frames)
    if upscaler is not None:
        _check_upscaler(upscaler, vae, positive)
    down = vae.config.downscale
    latents = torch.zeros(frames, unet.config.in_channels, height // down, width // down)
    if init_video is not None:
        if tuple(init_video.shape) != (frames, height, width, 3):
            raise RequestError(f"init_video must be [{frames}, {height}, {width}, 3] (frames, height, width, RGB); "
                               f"got {tuple(init_video.shape)}")
        latents = encode_frames(vae, init_video, chunk_size)
    given = None
    if given_images is not None:
        if given_images.ndim != 4 or tuple(given_images.shape[1:]) != (height, width, 3):
            raise RequestError(f"given images must be [k, {height}, {width}, 3] (frames, height, width, RGB); "
                               f"got {tuple(given_images.shape)}")
        encoded = encode_frames(vae, given_images, chunk_size)
        given = GivenFrames(encoded, tuple(given_indices) if given_indices is not None else tuple(range(len(encoded))))

    t0 = time.perf_counter()
    latents = sample_video(unet, latents, positive, negative, num_frames=frames, options=options, given=given,
                           motion=motion, callback=callback)
    _sync(latents.device)
    t1 = time.perf_counter()
    stages = {"sampling": t1 - t0}
    if interpolate > 1:
        from .interpolate import PRESET, interpolate as fill

        between = unet if interpolator is None else prepare(interpolator, device=device, dtype=dtype)[0]
        latents = fill(between, latents, interpolate, positive=positive,
                       options=PRESET.replace(seed=options.seed, fps=options.fps))
        frames = latents.shape[0]
        stages["interpolation"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    if latents_only:
        out = latents.float().cpu()
    else:
        out = decode_frames(vae, latents, frames, chunk_size)
        stages["vae_decode"] = time.perf_counter() - t2
        if upscaler is not None:
            from .upscale import upscale

            t3 = time.perf_counter()
            raw = latents.float().cpu() / vae.config.scaling_factor if upscaler.config.latent_channels else None
            text = positive.float().cpu() if upscaler.config.text_channels else None
            out = upscale(upscaler, out, latents=raw, text=text)
            stages["upscale"] = time.perf_counter() - t3
    if timings is not None:
        timings.update(stages)
    return out


def text_to_video(
    bundle,
    prompt: str,
    *,
    negative: str = "",
    ignore_unknown_words: bool = False,
    timings: dict | None = None,
    device=None,
    dtype: str = "auto",
    options: SamplingOptions = PRESETS["main"],
    **request,
) -> torch.Tensor:
    """A prompt through the model file's built-in text encoder -> frames ``[frames, height, width, 3]``
    float32 in 0..1 on the CPU (the rest of the request as :func:`conditioning_to_video`).

    The negative prompt is encoded only when ``options.cfg`` != 1; what the prompt asks of each
    object (for motion guidance) is read with the encoder's lexicon. ``timings``, when given,
    receives seconds per stage: ``text_encode``, ``sampling``, ``vae_decode`` and ``total``.
    """
    unet, _, text = prepare(bundle, device=device, dtype=dtype)
    options = sampling.for_model(options, unet.config.student_timesteps)  # a student's own settings
    t0 = time.perf_counter()
    positive = encode_prompt(text, prompt, ignore_unknown_words=ignore_unknown_words)
    neg = encode_prompt(text, negative, ignore_unknown_words=ignore_unknown_words) if options.cfg != 1.0 else None
    motion = text.motion_request(prompt) if options.motion_guidance > 0 else None
    if options.motion_guidance > 0 and motion is None:
        log.warning("this model's text encoder carries no lexicon, so motion guidance cannot read the prompt; "
                    "sampling unsteered")
    _sync(positive.device)
    t1 = time.perf_counter()
    stages: dict = {}
    out = conditioning_to_video(bundle, positive, neg, options=options, motion=motion, timings=stages, device=device,
                                dtype=dtype, **request)
    if timings is not None:
        timings.update(text_encode=t1 - t0, **stages, total=time.perf_counter() - t0)
    return out
