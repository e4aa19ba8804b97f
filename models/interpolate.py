"""Frame interpolation in latent space (MagicVideo's second stage).

MagicVideo makes keyframes, then a model of the same UNet family denoises the frames between
neighbouring keyframes, conditioned on them. Here that model is the keyframe model itself,
given the keyframes as given frames (``conditioning``): for a factor k, a window of
``(m - 1) * k + 1`` frames holds m keyframes at indices 0, k, 2k, ... and the model makes the
frames between them, at k times the keyframe rate (its fps conditioning). Neighbouring
windows share their end keyframe, so every gap is made once, with both of its keyframes
and the ones around them in view.

    frames = interpolate(unet, keyframes, 3, positive=empty_prompt)   # [(N - 1) * 3 + 1, c, h, w]

Windows of one size are denoised together, ``batch`` windows per UNet call, so a long latent
(hundreds of keyframes from the sliding window) costs memory for ``batch`` windows, not for
the whole video. Each window's starting noise is drawn from ``seed + its index``: the frames
do not depend on ``batch``. The keyframes come back exactly.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import pipeline, sampling
from .conditioning import GivenFrames
from .pipeline import RequestError
from .sampling import SamplingOptions

__all__ = ["PRESET", "plan_gaps", "interpolate", "blend_latents"]

# few steps, no guidance: the keyframes say most of what the in-betweens must show. MagicVideo's
# recipe, the neighbouring keyframes' latents combined with noise: the latent blend noised to 0.25
# (one of 4 steps runs), the interpolator's best measured setting (docs/TRAINING.md)
PRESET = sampling.PRESETS["plain"].replace(steps=4, cfg=1.0, denoise=0.25)


def plan_gaps(keyframes: int, factor: int, max_frames: int) -> list[tuple[int, int]]:
    """Windows ``(first keyframe, keyframes in it)`` covering every gap of ``keyframes``
    keyframes once, each window at most ``max_frames`` frames at the interpolated rate."""
    if keyframes < 2:
        raise RequestError(f"interpolation needs at least 2 keyframes (a gap between two); got {keyframes}")
    if factor < 2:
        raise RequestError(f"the interpolation factor must be at least 2 (2 = one new frame per gap); got {factor}")
    per_window = (max_frames - 1) // factor + 1
    if per_window < 2:
        raise RequestError(f"a factor of {factor} needs windows of {factor + 1} frames; this model takes at most "
                           f"{max_frames} (max_frames): choose a factor of at most {max_frames - 1}")
    windows, start = [], 0
    while start < keyframes - 1:
        count = min(per_window, keyframes - start)
        windows.append((start, count))
        start += count - 1
    return windows


def interpolate(
    unet: torch.nn.Module,
    keyframes: torch.Tensor,
    factor: int,
    *,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    options: SamplingOptions = PRESET,
    batch: int = 8,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Scaled keyframe latents ``[N, c, h, w]`` (at ``options.fps``) -> ``[(N - 1) * factor + 1,
    c, h, w]`` float32 on the CPU, keyframes at every ``factor``-th frame, exactly as given.

    ``positive`` / ``negative``: text embeddings as for ``pipeline.sample_video`` (the video's
    prompt, or the empty prompt). ``callback(step, total, x0)`` counts the steps of all calls.
    """
    config = unet.config
    if keyframes.ndim != 4 or keyframes.shape[1] != config.in_channels:
        raise RequestError(f"keyframes must be latents [frames, {config.in_channels}, h, w]; "
                           f"got {tuple(keyframes.shape)}")
    if not (getattr(config, "cond_channels", 0) or getattr(config, "image_first", False)):
        raise RequestError("this model was not trained to take given frames (no image-prior channels), so it cannot "
                           "make frames between keyframes; use a model trained with given frames (the bundled default)")
    if batch < 1:
        raise RequestError(f"batch must be at least 1 window, got {batch}")
    windows = plan_gaps(keyframes.shape[0], factor, config.max_frames)
    options = options.replace(fps=options.fps * factor)
    total_frames = (keyframes.shape[0] - 1) * factor + 1
    out = torch.zeros(total_frames, *keyframes.shape[1:])
    keyframes = keyframes.float().cpu()
    groups = []
    for count in dict.fromkeys(c for _, c in windows):  # windows of one size together, in order
        same = [(i, w) for i, w in enumerate(windows) if w[1] == count]
        groups += [same[g: g + batch] for g in range(0, len(same), batch)]
    run = min(int(options.steps * options.denoise), options.steps)  # steps a window runs (denoise < 1: fewer)
    done, total = 0, len(groups) * run
    sharing = options.noise_sharing if options.noise_sharing is not None else float(getattr(config, "noise_sharing", 0.0))
    for group in groups:
        count = group[0][1][1]
        frames = (count - 1) * factor + 1
        given = GivenFrames(torch.cat([keyframes[s: s + count] for _, (s, _) in group]),
                            tuple(range(0, frames, factor)))
        noise = torch.cat([sampling.video_noise((frames, *keyframes.shape[1:]), frames, sharing,
                                                torch.Generator().manual_seed(options.seed + i)) for i, _ in group])

        def report(step, steps, x0, done=done):
            if callback is not None:
                callback(done + step, total, x0)

        # from pure noise (denoise 1: the start gives only the shape), or from the keyframes'
        # latent blend noised to options.denoise
        if options.denoise >= 1.0:
            start = torch.zeros(len(group) * frames, *keyframes.shape[1:])
        else:
            start = torch.cat([blend_latents(keyframes[s: s + count], factor) for _, (s, _) in group])
        video = pipeline.sample_video(unet, start, positive, negative,
                                      num_frames=frames, options=options, given=given, noise=noise, callback=report)
        for (_, (start, _)), clip in zip(group, video.float().cpu().split(frames)):
            out[start * factor: start * factor + frames] = clip
        done += run
    out[::factor] = keyframes  # exactly (the sampler returns them unchanged; this states it)
    return out


def blend_latents(keyframes: torch.Tensor, factor: int) -> torch.Tensor:
    """The linear blend of neighbouring keyframe latents: the baseline the interpolator must beat."""
    if keyframes.shape[0] < 2 or factor < 1:
        raise RequestError(f"blending needs at least 2 keyframes and a factor of at least 1; got "
                           f"{keyframes.shape[0]} and {factor}")
    w = torch.arange(factor, dtype=torch.float32).div(factor).view(1, -1, 1, 1, 1)
    a, b = keyframes[:-1, None].float(), keyframes[1:, None].float()
    mixed = (a * (1 - w) + b * w).flatten(0, 1)
    return torch.cat([mixed, keyframes[-1:].float()])
