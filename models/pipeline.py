"""Text to video in one call: the library's path from a loaded model file to frames.

    bundle = checkpoint.load_model("weights/magicvideo_default.safetensors")
    frames = text_to_video(bundle, "a red circle moving to the left", seed=1)   # [16, 64, 64, 3] in 0..1

Every caller that generates without the host goes through here: the command line
(``python -m magicvideo generate``), the evaluator's ``model_generate_fn`` and the
benchmark. The steps are the ones the nodes run in a graph: the file's built-in text
encoder (positive, and the negative when ``cfg`` != 1), ``sampling.sample`` from pure
noise on zero latents, ``VideoVAE.decode``, and frames in the host's IMAGE layout.

:func:`conditioning_to_video` is the same without the text encoder, for models that take
text embeddings from elsewhere (an inflated SD1.5 with a saved CLIP encode).

Errors about the request (size, prompt words, missing text encoder or negative) are
:class:`RequestError`, a ``ValueError``; the CLI turns them into its usage errors.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from . import guidance, sampling
from .text import unknown_words_message

__all__ = ["RequestError", "UnknownWordsError", "prepare", "encode_prompt", "conditioning_to_video", "text_to_video"]

log = logging.getLogger(__name__)

Callback = Callable[[int, int, torch.Tensor], None]


class RequestError(ValueError):
    """What was asked for does not fit the model (size, words, missing parts)."""


class UnknownWordsError(RequestError):
    """The prompt has words the built-in text encoder does not know; ``words`` lists them."""

    def __init__(self, message: str, words: list[str]):
        super().__init__(message)
        self.words = words


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so stage timings measure the stage."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(bundle, *, device=None, dtype: torch.dtype | None = None):
    """Move the bundle's modules (in place) to ``device`` / ``dtype`` and return (unet, vae, text_encoder).

    None keeps where and how they were loaded. The VAE stays fp32 when ``dtype`` is fp16
    (SD's VAE overflows in fp16); the text encoder keeps its dtype (it is small, and
    ``sample`` casts its output to the UNet's dtype).
    """
    unet, vae = bundle.unet, bundle.vae
    if unet is None or vae is None:
        missing = "UNet" if unet is None else "VAE"
        raise RequestError(f"{bundle.source or 'the model'} has no {missing}: expected a full model file (UNet and VAE)")
    text = getattr(bundle, "text_encoder", None)
    if device is not None or dtype is not None:
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype
        unet.to(device=device, dtype=dtype)
        vae.to(device=device, dtype=vae_dtype)
        if text is not None and device is not None:
            text.to(device)
    for module in (unet, vae, text):
        if module is not None:
            module.eval().requires_grad_(False)
    return unet, vae, text


def _check_request(vae, frames: int, width: int, height: int, cfg: float, negative) -> None:
    down = vae.config.downscale
    if width % down or height % down or width <= 0 or height <= 0:
        raise RequestError(f"width and height must be positive multiples of {down} (the VAE's downscale), "
                           f"got {width}x{height}")
    if frames < 1:
        raise RequestError(f"frames must be at least 1, got {frames}")
    if negative is None and cfg != 1.0:
        raise RequestError("cfg != 1 needs a negative conditioning (an encoded empty prompt for plain guidance), or cfg 1")


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
        message = unknown_words_message(unknown, text_encoder.config.vocab)
        if not ignore_unknown_words:
            raise UnknownWordsError(message, unknown)
        log.warning("%s Leaving them out.", message)
    return context


@torch.no_grad()
def _encode(vae, frames: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Frames ``[F, H, W, 3]`` in 0..1 -> scaled latents ``[F, c, h, w]`` (float32, CPU)."""
    return vae.encode(frames.movedim(-1, 1) * 2 - 1, chunk_size=chunk_size).float().cpu()


def decode_frames(vae, latents: torch.Tensor, frames: int, chunk_size: int = 8) -> torch.Tensor:
    """Sampled latents ``[frames, C, h, w]`` (scaled) -> frames ``[frames, H, W, 3]`` float32 in 0..1 on the CPU."""
    images = vae.decode(latents.to(next(vae.parameters()).device), num_frames=frames, chunk_size=chunk_size)
    return ((images.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()


def conditioning_to_video(
    bundle,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    *,
    frames: int = 16,
    width: int = 64,
    height: int = 64,
    steps: int = 20,
    cfg: float = 7.5,
    sampler: str = "euler",
    scheduler: str = "normal",
    seed: int = 0,
    fps: float | None = 8.0,
    device=None,
    dtype: torch.dtype | None = None,
    chunk_size: int = 8,
    callback: Callback | None = None,
    timings: dict | None = None,
    noise_sharing: float | None = None,
    init_video: torch.Tensor | None = None,
    denoise: float = 1.0,
    image_first: bool | None = None,
    first_frames: torch.Tensor | None = None,
    cfg_start: float = 0.0,
    cfg_end: float = 1.0,
    cfg_rescale: float = 0.0,
    pag: float = 0.0,
    pag_parts: tuple[str, ...] = ("self",),
    motion_targets: list | None = None,
    motion_guidance: float = 0.0,
    motion_guidance_until: float = 0.3,
    latents_only: bool = False,
) -> torch.Tensor:
    """Text embeddings -> frames ``[frames, height, width, 3]`` float32 in 0..1 on the CPU.

    ``positive`` / ``negative`` are ``[1, tokens, width]``; ``negative`` is required when
    ``cfg`` != 1. ``callback(step, total, x0)`` runs after every sampling step and may raise
    to stop. ``timings``, when given, receives seconds per stage: ``sampling``, ``vae_decode``.
    ``init_video`` (frames ``[frames, height, width, 3]`` in 0..1) with ``denoise`` < 1 is
    video-to-video: the VAE encodes it, it is noised to ``denoise`` and the last
    ``steps * denoise`` steps run (``denoise`` 0 = a plain VAE round trip).
    ``image_first``: first frame alone, then the rest from it (None = the model's own; see
    ``sampling.sample``).
    ``first_frames`` ``[k, height, width, 3]`` in 0..1 is image-to-video on a model trained
    image-first: they are encoded and kept as the first k frames; the rest follow from them.
    ``cfg_start`` / ``cfg_end``: guidance only on that part of the schedule; ``cfg_rescale``:
    guided outputs rescaled towards the conditional one's spread; ``pag``: perturbed-attention
    guidance on the same part, weakening ``pag_parts`` (``sampling.sample``).
    ``motion_targets`` (``guidance.targets_from_caption``) with ``motion_guidance`` > 0 steer
    each object's attention blob along its caption's path on the steps up to
    ``motion_guidance_until`` (``guidance.MotionGuidance``).
    ``latents_only``: skip the VAE and return the sampled latents ``[frames, channels, h, w]``
    (scaled, as the UNet sees them) float32 on the CPU.
    """
    unet, vae, _ = prepare(bundle, device=device, dtype=dtype)
    _check_request(vae, frames, width, height, cfg, negative)
    try:
        sampling.check_cfg_interval(cfg_start, cfg_end)
        sampling.check_cfg_rescale(cfg_rescale)
        sampling.check_pag(pag, pag_parts)
    except ValueError as e:
        raise RequestError(str(e)) from None
    down = vae.config.downscale
    run_device = next(unet.parameters()).device
    if init_video is None:
        latents = torch.zeros(frames, unet.config.in_channels, height // down, width // down)
    else:
        if tuple(init_video.shape) != (frames, height, width, 3):
            raise RequestError(
                f"init_video must be [{frames}, {height}, {width}, 3] (frames, height, width, RGB); "
                f"got {tuple(init_video.shape)}"
            )
        latents = _encode(vae, init_video, chunk_size)
    given = 0
    if first_frames is not None:
        if not getattr(unet.config, "image_first", False):
            raise RequestError("first_frames (image-to-video) needs a model trained image-first (unet_config.image_first)")
        if first_frames.ndim != 4 or tuple(first_frames.shape[1:]) != (height, width, 3):
            raise RequestError(
                f"first_frames must be [k, {height}, {width}, 3] (frames, height, width, RGB); got {tuple(first_frames.shape)}"
            )
        try:
            latents, given = sampling.given_reference(latents, _encode(vae, first_frames, chunk_size), num_frames=frames)
        except ValueError as e:
            raise RequestError(str(e)) from None

    try:
        steer = guidance.MotionGuidance(unet, motion_targets or [], strength=motion_guidance,
                                        until=motion_guidance_until)
    except ValueError as e:
        raise RequestError(str(e)) from None
    side = guidance.finest_attention_side(unet.config, *latents.shape[-2:])
    if motion_targets and motion_guidance > 0 and side < guidance.MIN_SIDE:
        raise RequestError(
            f"motion guidance needs cross-attention blocks of at least {guidance.MIN_SIDE}x{guidance.MIN_SIDE} latent "
            f"cells; this model's finest is {side}x{side} at {width}x{height} (set motion_guidance to 0, or go larger)"
        )

    t0 = time.perf_counter()
    with torch.no_grad():
        latents = sampling.sample(unet, latents, positive, negative, num_frames=frames, steps=steps, cfg=cfg,
                                  sampler=sampler, scheduler=scheduler, seed=seed, fps=fps, callback=callback,
                                  noise_sharing=noise_sharing, denoise=denoise, image_first=image_first,
                                  given_frames=given, cfg_start=cfg_start, cfg_end=cfg_end,
                                  cfg_rescale=cfg_rescale, pag=pag, pag_parts=pag_parts,
                                  steer=steer)
        _sync(run_device)
        t1 = time.perf_counter()
        if latents_only:
            if timings is not None:
                timings.update(sampling=t1 - t0)
            return latents.float().cpu()
        out = decode_frames(vae, latents, frames, chunk_size)
    t2 = time.perf_counter()
    if timings is not None:
        timings.update(sampling=t1 - t0, vae_decode=t2 - t1)
    return out


def text_to_video(
    bundle,
    prompt: str,
    *,
    negative: str = "",
    frames: int = 16,
    width: int = 64,
    height: int = 64,
    steps: int = 20,
    cfg: float = 7.5,
    sampler: str = "euler",
    scheduler: str = "normal",
    seed: int = 0,
    fps: float | None = 8.0,
    device=None,
    dtype: torch.dtype | None = None,
    chunk_size: int = 8,
    callback: Callback | None = None,
    ignore_unknown_words: bool = False,
    timings: dict | None = None,
    noise_sharing: float | None = None,
    init_video: torch.Tensor | None = None,
    denoise: float = 1.0,
    image_first: bool | None = None,
    first_frames: torch.Tensor | None = None,
    cfg_start: float = 0.0,
    cfg_end: float = 1.0,
    cfg_rescale: float = 0.0,
    pag: float = 0.0,
    pag_parts: tuple[str, ...] = ("self",),
    motion_guidance: float = 0.0,
    motion_guidance_until: float = 0.3,
    latents_only: bool = False,
) -> torch.Tensor:
    """A prompt through the model file's built-in text encoder -> frames ``[frames, height, width, 3]``
    float32 in 0..1 on the CPU.

    ``bundle`` is what ``checkpoint.load_model`` returns; ``device`` / ``dtype`` move its modules
    (see :func:`prepare`), None keeps them as loaded. The negative prompt is encoded only when
    ``cfg`` != 1. The same seed gives the same video on any device. ``timings``, when given,
    receives seconds per stage: ``text_encode``, ``sampling``, ``vae_decode`` and ``total`` (their
    sum plus the glue; moving the modules to ``device`` / ``dtype`` is not counted).
    ``init_video`` / ``denoise`` (video-to-video), ``image_first`` and ``first_frames``
    (image-to-video), ``cfg_start`` / ``cfg_end``, ``cfg_rescale``, ``pag`` / ``pag_parts``,
    ``motion_guidance`` / ``motion_guidance_until``
    (each object steered along the path its caption asks for), ``latents_only`` (the sampled
    latents, not decoded): see :func:`conditioning_to_video`.
    """
    _, vae, text = prepare(bundle, device=device, dtype=dtype)
    _check_request(vae, frames, width, height, cfg, negative="")
    t0 = time.perf_counter()
    positive = encode_prompt(text, prompt, ignore_unknown_words=ignore_unknown_words)
    neg = encode_prompt(text, negative, ignore_unknown_words=ignore_unknown_words) if cfg != 1.0 else None
    _sync(positive.device)
    t1 = time.perf_counter()
    stages: dict = {}
    out = conditioning_to_video(
        bundle, positive, neg, frames=frames, width=width, height=height, steps=steps, cfg=cfg, sampler=sampler,
        scheduler=scheduler, seed=seed, fps=fps, chunk_size=chunk_size, callback=callback, timings=stages,
        noise_sharing=noise_sharing, init_video=init_video, denoise=denoise, image_first=image_first,
        first_frames=first_frames, cfg_start=cfg_start, cfg_end=cfg_end, cfg_rescale=cfg_rescale, pag=pag,
        pag_parts=pag_parts,
        motion_targets=guidance.targets_from_caption(prompt, set(text.word_to_id), frames) if motion_guidance else None,
        motion_guidance=motion_guidance, motion_guidance_until=motion_guidance_until, latents_only=latents_only,
    )
    if timings is not None:
        timings.update(text_encode=t1 - t0, **stages, total=time.perf_counter() - t0)
    return out
