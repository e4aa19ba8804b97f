"""Long video: a prompt schedule, keyframe windows chained into minutes, and a streaming writer.

Magic 1-For-1 makes minute-long videos with a test-time sliding window: clip after clip, each
continuing from the last frames of the one before. Here:

- :func:`parse_schedule` reads a prompt schedule a person types in one text box, one time
  range per line (``0-10: a red circle moving to the left``); one line without a range is a
  whole-video prompt;
- :func:`plan_windows` cuts a video of N keyframes into windows, by one of
  :data:`METHODS`: ``continue`` (each window is given the last ``overlap`` frames of the one
  before, in the model's image-prior channels: the continuation the default was trained
  for), ``fusion`` (windows overlapping by ``overlap`` frames denoised together at every
  step and blended where they overlap, as ComfyUI core's context windows do) and
  ``independent`` (windows side by side, each alone: the baseline);
- :func:`sample_long_video` samples them through the one generation path
  (``pipeline.sample_video``) and returns the keyframe latents, which are small (a minute at
  8 fps and 64x64 is 480 x 4 x 8 x 8 floats);
- :func:`write_long_video` decodes those latents chunk by chunk, the VideoVAE's temporal
  layers seeing a bounded context, and hands each chunk to the video encoder as it comes:
  pixels never sit in memory whole, so memory does not grow with the video's length.

A window between two prompts gets both, their text embeddings blended by the share of the
window's new frames that falls in each range. Seeds: window k samples with ``seed + k``,
so the same seed gives the same video.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import guidance, pipeline, sampling, video_io
from .conditioning import GivenFrames, no_frames_given
from .pipeline import RequestError
from .sampling import SamplingOptions

__all__ = ["METHODS", "Span", "Window", "ScheduleError", "parse_schedule", "plan_windows", "window_weights",
           "sample_long_video", "decode_stream", "write_long_video", "DECODE_CONTEXT"]

log = logging.getLogger(__name__)

METHODS = ("continue", "fusion", "independent")
DECODE_CONTEXT = 16  # frames the VideoVAE's temporal layers see when decoding a long video (its training clips')

_RANGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*s?\s*-\s*(\d+(?:\.\d+)?|end)\s*s?\s*:(.*)$", re.IGNORECASE)
_LOOKS_RANGED = re.compile(r"^\s*[\d.]+\s*s?\s*-")


class ScheduleError(RequestError):
    """A prompt schedule that cannot be read or does not cover the video."""


@dataclass(frozen=True)
class Span:
    """``prompt`` from ``start`` to ``end`` seconds."""

    start: float
    end: float
    prompt: str


@dataclass(frozen=True)
class Window:
    """Keyframes ``start .. start + frames - 1``; the first ``given`` come from the window before."""

    index: int
    start: int
    frames: int
    given: int = 0

    @property
    def end(self) -> int:
        return self.start + self.frames

    @property
    def new(self) -> range:
        """The keyframes this window makes (not given)."""
        return range(self.start + self.given, self.end)


def parse_schedule(text: str, seconds: float) -> list[Span]:
    """A prompt schedule -> spans covering 0..``seconds`` in order.

    One range per line, ``START-END: prompt`` in seconds (``0-10: a red circle moving to the
    left``; ``10 s - 20 s:`` and ``20-end:`` work too); blank lines and lines starting with
    ``#`` are skipped. A single line without a range is the prompt of the whole video. The
    ranges must start at 0, follow each other without gaps or overlaps and end at ``seconds``:
    anything else is a :class:`ScheduleError` that names the line.
    """
    if seconds <= 0:
        raise ScheduleError(f"the video must last more than 0 seconds, got {seconds}")
    lines = [(n, line.strip()) for n, line in enumerate(str(text).splitlines(), 1)
             if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise ScheduleError("the prompt schedule is empty: write a prompt, or one 'START-END: prompt' line per "
                            "time range (e.g. '0-10: a red circle moving to the left')")
    if len(lines) == 1 and not _LOOKS_RANGED.match(lines[0][1]):
        return [Span(0.0, float(seconds), lines[0][1])]
    spans: list[Span] = []
    for n, line in lines:
        m = _RANGE.match(line)
        if not m:
            raise ScheduleError(f"schedule line {n}: expected 'START-END: prompt' with times in seconds (e.g. "
                                f"'0-10: a red circle moving to the left'), found {line!r}")
        start = float(m[1])
        end = float(seconds) if m[2].lower() == "end" else float(m[2])
        prompt = m[3].strip()
        if not prompt:
            raise ScheduleError(f"schedule line {n}: the range {m[1]}-{m[2]} s has no prompt after the colon")
        if end <= start:
            raise ScheduleError(f"schedule line {n}: a range must end after it starts, found {start:g}-{end:g} s")
        before = spans[-1].end if spans else 0.0
        if abs(start - before) > 1e-6:
            what = "a gap" if start > before else "an overlap"
            raise ScheduleError(f"schedule line {n}: {what} between {before:g} s and {start:g} s; each range must "
                                f"start where the one before ends ({before:g} s)")
        spans.append(Span(start, end, prompt))
    if abs(spans[-1].end - seconds) > 1e-6:
        if spans[-1].end < seconds:
            raise ScheduleError(f"the schedule ends at {spans[-1].end:g} s but the video lasts {seconds:g} s: extend "
                                "the last range (or end it with 'end')")
        raise ScheduleError(f"the schedule runs to {spans[-1].end:g} s but the video lasts {seconds:g} s: its ranges "
                            "past the end would be dropped; shorten the schedule or lengthen the video")
    return spans


def plan_windows(total: int, window: int, overlap: int, method: str = "continue") -> list[Window]:
    """The windows of a ``total``-keyframe video (see the module docstring for the methods).

    ``continue``: windows of ``window`` frames, each starting ``overlap`` frames before the
    last one ends, with those frames given; the last window is shorter when fewer frames are
    left. ``fusion``: windows of ``window`` frames every ``window - overlap`` frames, the last
    moved back to end with the video. ``independent``: windows of ``window`` frames side by
    side. A video no longer than a window is one window.
    """
    if method not in METHODS:
        raise RequestError(f"window method must be one of {', '.join(METHODS)}; got {method!r}")
    if total < 1:
        raise RequestError(f"a video needs at least one keyframe, got {total}")
    if window < 1:
        raise RequestError(f"a window needs at least one frame, got {window}")
    if not 0 <= overlap < window:
        raise RequestError(f"the overlap must be at least 0 and less than the window ({window} frames); got {overlap}")
    if method == "continue" and overlap == 0 and total > window:
        raise RequestError("continue needs an overlap of at least 1 frame (the frames each window continues "
                           "from); use method independent for windows that do not continue each other")
    if total <= window:
        return [Window(0, 0, total)]
    if method == "independent":
        return [Window(k, s, min(window, total - s)) for k, s in enumerate(range(0, total, window))]
    if method == "fusion":
        starts = list(range(0, total - window, window - overlap)) + [total - window]
        return [Window(k, s, window) for k, s in enumerate(dict.fromkeys(starts))]
    windows = [Window(0, 0, window)]
    while windows[-1].end < total:
        start = windows[-1].end - overlap
        windows.append(Window(len(windows), start, min(window, total - start), overlap))
    return windows


def window_weights(spans: list[Span], frames: range, fps: float) -> list[float]:
    """Each span's share of ``frames`` (keyframe indices at ``fps``): how a window between two
    prompts blends them."""
    counts = [0] * len(spans)
    for i in frames:
        t = i / fps
        k = next((j for j, s in enumerate(spans) if t < s.end), len(spans) - 1)
        counts[k] += 1
    total = sum(counts) or 1
    return [c / total for c in counts]


def _blend(embeddings: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    parts = [(e, w) for e, w in zip(embeddings, weights) if w > 0]
    out = parts[0][0] * parts[0][1]
    for e, w in parts[1:]:
        a, b = guidance.same_length(out, e)
        out = a + b * w
    return out


def _check_model(unet, window: int, overlap: int, method: str) -> None:
    config = unet.config
    if window > config.max_frames:
        raise RequestError(f"a window of {window} frames is longer than this model takes (max_frames="
                           f"{config.max_frames}); choose a window of at most {config.max_frames}")
    if method == "continue" and not (getattr(config, "cond_channels", 0) or getattr(config, "image_first", False)):
        raise RequestError("method continue gives each window the last frames of the one before, but this model "
                           "was not trained to take given frames (no image-prior channels); use method fusion or "
                           "independent, or a model trained with given frames (the bundled default is)")


Callback = Callable[[int, int, torch.Tensor], None]


def sample_long_video(
    unet: torch.nn.Module,
    text_encoder,
    spans: list[Span],
    *,
    frames: int,
    latent_size: tuple[int, int],
    window: int = 16,
    overlap: int = 4,
    method: str = "continue",
    options: SamplingOptions = sampling.PRESETS["main"],
    negative: str = "",
    callback: Callback | None = None,
) -> torch.Tensor:
    """Keyframe latents ``[frames, c, h, w]`` (scaled, float32, CPU) of a long video whose
    keyframes run at ``options.fps`` and follow the schedule ``spans``.

    Every check (window against the model, the schedule's words, sizes) runs before the
    first step. ``callback(step, total, x0)`` counts the steps of all windows together and may
    raise to stop (cancel): ``x0`` is the current window's prediction.
    """
    plan = plan_windows(frames, window, overlap, method)
    _check_model(unet, max(w.frames for w in plan), overlap, method)
    options = sampling.for_model(options.check(), getattr(unet.config, "student_timesteps", ()))
    embeddings = [pipeline.encode_prompt(text_encoder, s.prompt) for s in spans]
    neg = pipeline.encode_prompt(text_encoder, negative) if options.cfg != 1.0 else None
    wants_motion = options.motion_guidance > 0
    motions = [text_encoder.motion_request(s.prompt) if wants_motion else None for s in spans]
    h, w = latent_size
    shape = (unet.config.in_channels, h, w)
    per_window = []
    for win in plan:
        weights = window_weights(spans, win.new if method == "continue" else range(win.start, win.end), options.fps)
        main = max(range(len(spans)), key=lambda k: weights[k])
        per_window.append((_blend(embeddings, weights), motions[main]))

    if method == "fusion":
        return _fused(unet, plan, per_window, neg, frames=frames, shape=shape, options=options, callback=callback)
    out = torch.zeros(frames, *shape)
    done, total = 0, len(plan) * options.steps

    for win, (positive, motion) in zip(plan, per_window):
        def report(step, steps, x0, done=done):
            if callback is not None:
                callback(done + step * options.steps // steps, total, x0)

        given = GivenFrames.first(out[win.start: win.start + win.given]) if win.given else None
        latents = pipeline.sample_video(unet, torch.zeros(win.frames, *shape), positive, neg, num_frames=win.frames,
                                        options=options.replace(seed=options.seed + win.index), given=given,
                                        motion=motion, callback=report)
        out[win.start + win.given: win.end] = latents[win.given:].float().cpu()
        done += options.steps
    return out


class FusedWindows:
    """A denoiser over a whole long latent that runs ``inner`` (a window denoiser) on every
    window, ``batch`` windows per call, and blends the outputs where windows overlap, each
    window's frames weighted by their distance from its ends (ComfyUI's context windows)."""

    def __init__(self, inner, plan: list[Window], frames: int, batch: int = 4):
        self.inner, self.plan, self.batch = inner, plan, batch
        size = plan[0].frames
        ramp = torch.minimum(torch.arange(1, size + 1), torch.arange(size, 0, -1)).float()
        weight = torch.zeros(frames)
        for win in plan:
            weight[win.start: win.end] += ramp
        self.ramp, self.total = ramp, weight

    def __call__(self, x_in, t, progress):
        out = torch.zeros_like(x_in)
        for group in range(0, len(self.plan), self.batch):
            wins = self.plan[group: group + self.batch]
            index = torch.cat([torch.arange(w.start, w.end) for w in wins]).to(x_in.device)
            self.inner.select(group, len(wins))
            y, _ = self.inner(x_in[index], t[index], progress)
            ramp = self.ramp.to(y).repeat(len(wins)).view(-1, 1, 1, 1)
            out.index_add_(0, index, y * ramp)
        return out / self.total.to(out).view(-1, 1, 1, 1), x_in


class _WindowDenoiser:
    """The window denoiser of :class:`FusedWindows`: one per window's prompt, chosen per call."""

    def __init__(self, make):
        self.make, self.current = make, None

    def select(self, first: int, count: int) -> None:
        self.current = self.make(first, count)

    def __call__(self, x_in, t, progress):
        return self.current(x_in, t, progress)


def _fused(unet, plan, per_window, neg, *, frames, shape, options, callback):
    if options.motion_guidance > 0:
        log.warning("method fusion denoises windows together and cannot steer motion; motion guidance is off for it")
    config, size = unet.config, plan[0].frames
    channels = getattr(config, "cond_channels", 0)
    cache: dict = {}

    def make(first: int, count: int):
        if (first, count) not in cache:
            positive = torch.cat([per_window[k][0] for k in range(first, first + count)])
            cond = no_frames_given(count, size, channels, tuple(shape[-2:])) if channels else None
            cache[(first, count)] = pipeline.build_denoiser(unet, positive, neg, num_frames=size, options=options,
                                                            cond=None if cond is None else cond.to(device))
        return cache[(first, count)]

    device = next(unet.parameters()).device
    fused = FusedWindows(_WindowDenoiser(make), plan, frames)
    sharing = options.noise_sharing if options.noise_sharing is not None else float(getattr(config, "noise_sharing", 0.0))
    x = sampling.sample(fused, torch.zeros(frames, *shape, device=device), num_frames=frames, options=options,
                        prediction_type=config.prediction_type, noise_sharing=sharing, callback=callback)
    return x.float().cpu()


def decode_stream(vae, latents: torch.Tensor, *, chunk_size: int = 16,
                  context: int | None = DECODE_CONTEXT) -> Iterator[torch.Tensor]:
    """Scaled keyframe latents ``[frames, c, h, w]`` -> frames ``[n, H, W, 3]`` float32 in 0..1,
    ``chunk_size`` at a time; the decoder's temporal layers see ``context`` frames."""
    for images in vae.decode_chunks(latents / vae.config.scaling_factor, latents.shape[0], chunk_size, context):
        yield ((images.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()


def write_long_video(path, vae, latents: torch.Tensor, fps: float, format: str = "mp4", *, chunk_size: int = 16,
                     context: int | None = DECODE_CONTEXT, metadata: dict | None = None, crf: int = video_io.DEFAULT_CRF,
                     on_chunk: Callable[[int, int], None] | None = None) -> video_io.WrittenVideo:
    """Decode and encode a long video chunk by chunk into ``path`` (atomically: an error or a
    cancel midway leaves no file). ``on_chunk(frames_done, frames_total)`` runs before each
    chunk is decoded and may raise to stop."""
    total = latents.shape[0]

    def chunks():
        done = 0
        for frames in decode_stream(vae, latents, chunk_size=chunk_size, context=context):
            done += frames.shape[0]
            yield frames
            if on_chunk is not None:
                on_chunk(done, total)

    if on_chunk is not None:
        on_chunk(0, total)
    return video_io.write_video(path, chunks(), fps, format, crf=crf, metadata=metadata)
