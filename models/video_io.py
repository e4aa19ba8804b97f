"""Video files in and out: PyAV for mp4 (H.264) and webm (VP9), Pillow for animated gif/webp.

Frames here are what codecs carry: uint8 arrays ``[frames, H, W, 3]`` (RGB). The nodes
convert from and to the host's IMAGE (float ``[frames, H, W, 3]`` in 0..1) with
``frames_to_uint8`` / ``frames_to_float``.

Every problem with the caller's input raises ``VideoError`` (a ``ValueError``) whose text
says what was expected and what was found; the host shows it and keeps serving.
``write_video`` writes to a hidden temporary name beside the target and renames it when
the file is complete, so a failure never leaves a half-written video behind.

The prompt and workflow travel in the file the way ComfyUI's own savers put them, so
dropping the file back on ComfyUI restores the graph:

- mp4: container metadata keys ``prompt`` / ``workflow`` (``moov/udta/meta`` with
  ``mdta`` keys, written with ``movflags=use_metadata_tags``);
- webm: Matroska tags ``PROMPT`` / ``WORKFLOW``;
- webp: EXIF strings ``prompt:{...}`` (tag 0x0110) and ``workflow:{...}`` (0x010F), as the
  host's Save Animated WEBP writes them;
- gif: one comment extension holding ``{"prompt": ..., "workflow": ...}``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from collections.abc import Iterator
from typing import Iterable, Sequence

import numpy as np
import torch


class VideoError(ValueError):
    """Bad input to a video read or write; the message names expected and found."""


@dataclass(frozen=True)
class VideoFormat:
    name: str
    extension: str
    mime: str
    codec: str | None  # PyAV encoder, None for the Pillow formats
    even_size: bool  # the encoder needs even width and height (4:2:0 chroma)


FORMATS: dict[str, VideoFormat] = {
    "mp4": VideoFormat("mp4", "mp4", "video/mp4", "libx264", even_size=True),
    "webm": VideoFormat("webm", "webm", "video/webm", "libvpx-vp9", even_size=False),
    "gif": VideoFormat("gif", "gif", "image/gif", None, even_size=False),
    "webp": VideoFormat("webp", "webp", "image/webp", None, even_size=False),
}

# Files Load Video offers: what PyAV (or Pillow, for animated webp) decodes.
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".gif", ".webp")

DEFAULT_CRF = 19
ODD_SIZE_POLICIES = ("pad", "crop")
WEBP_QUALITY = 90

# EXIF tags the host's Save Animated WEBP uses for prompt and workflow.
_EXIF_PROMPT = 0x0110
_EXIF_WORKFLOW = 0x010F


@dataclass
class WrittenVideo:
    path: Path
    format: VideoFormat
    frames: int
    width: int
    height: int
    fps: float
    notes: list[str] = field(default_factory=list)


@dataclass
class DecodedVideo:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    fps: float  # of the returned frames (source fps / every_nth)
    source_fps: float
    width: int
    height: int


# --------------------------------------------------------------------------- frames


def frames_to_uint8(frame: torch.Tensor | np.ndarray) -> np.ndarray:
    """One frame or a batch, float in 0..1 (or already uint8) -> uint8 numpy, RGB."""
    if isinstance(frame, torch.Tensor):
        if frame.dtype == torch.uint8:
            return frame.cpu().numpy()
        return frame.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    frame = np.asarray(frame)
    if frame.dtype == np.uint8:
        return frame
    return np.clip(np.rint(frame.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


def frames_to_float(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` -> float32 tensor in 0..1 (the host's IMAGE)."""
    return torch.from_numpy(frames).to(torch.float32).div_(255.0)


def _batches(frames) -> list:
    """A batch ``[F, H, W, C]``, one frame ``[H, W, C]``, or a sequence of either."""
    if isinstance(frames, (torch.Tensor, np.ndarray)):
        return [frames]
    return list(frames)


def _shape(item) -> tuple[int, ...]:
    return tuple(int(s) for s in item.shape)


def check_frames(frames) -> tuple[int, int, int]:
    """Validate frames before any file is touched; returns (count, height, width)."""
    batches = _batches(frames)
    count, size = 0, None
    for index, batch in enumerate(batches):
        if not isinstance(batch, (torch.Tensor, np.ndarray)):
            raise VideoError(f"expected image frames (tensors), found {type(batch).__name__} at position {index}")
        shape = _shape(batch)
        if len(shape) == 3:
            shape = (1, *shape)
        if len(shape) != 4:
            raise VideoError(f"expected frames shaped [frames, height, width, 3], found shape {list(_shape(batch))}")
        n, h, w, c = shape
        if c not in (3, 4):
            raise VideoError(f"expected RGB frames (3 channels, or 4 with alpha dropped), found {c} channels")
        if n and (h < 1 or w < 1):
            raise VideoError(f"expected frames of at least 1x1 pixels, found {w}x{h}")
        if n and size is not None and (h, w) != size:
            raise VideoError(
                f"all frames of a video must have one size: the first frames are {size[1]}x{size[0]} "
                f"(width x height), frame {count} is {w}x{h}; scale them to one size first (e.g. Upscale Image)"
            )
        if n and size is None:
            size = (h, w)
        count += n
    if count == 0:
        raise VideoError("expected at least one frame, found zero frames (an empty image batch)")
    return count, size[0], size[1]


def _iter_uint8(frames) -> Iterator[np.ndarray]:
    """Frames one at a time as uint8 [H, W, 3]; converts per frame to keep memory flat."""
    for batch in _batches(frames):
        if len(_shape(batch)) == 3:
            batch = batch[None]
        for frame in batch:
            yield np.ascontiguousarray(frames_to_uint8(frame)[..., :3])


def _fix_odd_size(frame: np.ndarray, policy: str) -> np.ndarray:
    h, w = frame.shape[:2]
    if policy == "crop" and h > 1 and w > 1:
        return frame[: h - h % 2, : w - w % 2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _odd_size_note(h: int, w: int, policy: str) -> tuple[int, int, str]:
    if policy == "crop" and h > 1 and w > 1:
        nh, nw, how = h - h % 2, w - w % 2, "cropped the last row/column"
    else:
        nh, nw, how = h + h % 2, w + w % 2, "padded by repeating the edge pixels"
    return nh, nw, f"H.264 needs an even width and height: {w}x{h} became {nw}x{nh} ({how})"


# --------------------------------------------------------------------------- writing


def get_format(name: str) -> VideoFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise VideoError(f"unknown video format {name!r}; expected one of {', '.join(FORMATS)}") from None


def check_fps(fps) -> float:
    try:
        value = float(fps)
    except (TypeError, ValueError):
        raise VideoError(f"expected fps as a number, found {fps!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise VideoError(f"expected fps above 0, found {fps!r}")
    return value


def fps_fraction(fps: float) -> Fraction:
    """Exact rate for the container: 8 -> 8/1, 12.5 -> 25/2, 29.97 -> 2997/100."""
    return Fraction(fps).limit_denominator(1001)


def write_video(
    path: str | os.PathLike,
    frames,
    fps: float,
    format: str = "mp4",
    *,
    crf: int = DEFAULT_CRF,
    odd_size: str = "pad",
    metadata: dict | None = None,
) -> WrittenVideo:
    """Encode ``frames`` into ``path`` atomically (temporary name, then rename).

    ``frames``: a batch ``[F, H, W, 3]`` (uint8, or float in 0..1, numpy or torch), a
    sequence of batches/frames of one size, or an iterator of them (a stream: batches are
    checked and encoded as they come, so a long video never sits in memory whole; an error
    midway leaves no file). ``metadata``: JSON-able values by key
    (``prompt``, ``workflow``) embedded as described in the module docstring.
    """
    fmt = get_format(format)
    fps = check_fps(fps)
    if odd_size not in ODD_SIZE_POLICIES:
        raise VideoError(f"unknown odd_size policy {odd_size!r}; expected one of {', '.join(ODD_SIZE_POLICIES)}")
    if isinstance(frames, Iterator):  # a stream: checked batch by batch as it is written
        first = next(frames, None)
        if first is None:
            raise VideoError("expected at least one frame, found an empty stream of frames")
        _, height, width = check_frames(first)
        frames = _same_size(itertools.chain([first], frames), height, width)
    else:
        _, height, width = check_frames(frames)
    counted = _Counter()

    notes: list[str] = []
    fix_odd = fmt.even_size and (height % 2 or width % 2)
    if fix_odd:
        height, width, note = _odd_size_note(height, width, odd_size)
        notes.append(note)
    frame_iter: Iterable[np.ndarray] = counted.wrap(_iter_uint8(frames))
    if fix_odd:
        frame_iter = (_fix_odd_size(f, odd_size) for f in frame_iter)

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        if fmt.codec is None:
            _write_pillow(tmp, frame_iter, fps, fmt, metadata)
        else:
            _write_pyav(tmp, frame_iter, fps, fmt, crf, width, height, metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return WrittenVideo(path, fmt, counted.count, width, height, fps, notes)


def _same_size(batches: Iterable, height: int, width: int) -> Iterator:
    """A stream's batches, each checked against the first one's size as it comes."""
    done = 0
    for batch in batches:
        count, h, w = check_frames(batch)
        if (h, w) != (height, width):
            raise VideoError(f"all frames of a video must have one size: the first frames are {width}x{height} "
                             f"(width x height), frame {done} is {w}x{h}")
        done += count
        yield batch


def _json_metadata(metadata: dict | None) -> dict[str, str]:
    return {key: json.dumps(value) for key, value in (metadata or {}).items() if value is not None}


def _write_pyav(tmp, frames, fps, fmt, crf, width, height, metadata) -> None:
    import av

    options = {"movflags": "+faststart+use_metadata_tags"} if fmt.name == "mp4" else {}
    rate = fps_fraction(fps)
    with av.open(str(tmp), "w", format=fmt.name, options=options) as container:
        for key, value in _json_metadata(metadata).items():
            container.metadata[key] = value
        stream = container.add_stream(fmt.codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if fmt.name == "mp4":
            stream.options = {"crf": str(int(crf)), "preset": "medium"}
        else:  # VP9 constant quality: crf with bitrate 0; cpu-used trades size for speed
            stream.options = {"crf": str(int(crf)), "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}
        for index, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = index
            video_frame.time_base = 1 / rate
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))


def _write_pillow(tmp, frames, fps, fmt, metadata) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    meta = _json_metadata(metadata)
    # ms per frame. gif stores 1/100 s: round here, so that frames Pillow merges (identical
    # neighbours become one longer frame) keep delays that are whole multiples of one frame.
    duration = max(2, round(100.0 / fps)) * 10 if fmt.name == "gif" else max(1, round(1000.0 / fps))
    kwargs = {"save_all": True, "append_images": images[1:], "duration": duration, "loop": 0}
    if fmt.name == "webp":
        exif = images[0].getexif()
        if "prompt" in meta:
            exif[_EXIF_PROMPT] = f"prompt:{meta['prompt']}"
        if "workflow" in meta:
            exif[_EXIF_WORKFLOW] = f"workflow:{meta['workflow']}"
        images[0].save(tmp, format="WEBP", exif=exif, lossless=False, quality=WEBP_QUALITY, method=4, **kwargs)
    else:
        if metadata:
            kwargs["comment"] = json.dumps({k: v for k, v in metadata.items() if v is not None}).encode()
        images[0].save(tmp, format="GIF", optimize=False, **kwargs)


# --------------------------------------------------------------------------- reading


def list_videos(directory: str | os.PathLike) -> list[str]:
    """Video files directly in ``directory`` (what Load Video offers), sorted."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(
        n for n in names
        if n.lower().endswith(VIDEO_EXTENSIONS) and not n.startswith(".") and os.path.isfile(os.path.join(directory, n))
    )


def _check_read_args(frame_cap: int, skip_first: int, every_nth: int) -> None:
    if frame_cap < 0 or skip_first < 0 or every_nth < 1:
        raise VideoError(
            f"expected frame_cap >= 0, skip_first >= 0 and every_nth >= 1, "
            f"found frame_cap={frame_cap}, skip_first={skip_first}, every_nth={every_nth}"
        )


def _select(frames: Iterable, skip_first: int, every_nth: int, frame_cap: int) -> Iterator[tuple[int, object]]:
    """(source index, frame) of the frames kept; stops decoding once the cap is reached."""
    kept = 0
    for index, frame in enumerate(frames):
        if index < skip_first or (index - skip_first) % every_nth:
            continue
        yield index, frame
        kept += 1
        if frame_cap and kept >= frame_cap:
            return


class _Collector:
    """Gathers uint8 frames; with a cap the buffer is allocated once, so memory is bounded by it."""

    def __init__(self, frame_cap: int):
        self.cap, self.buffer, self.frames, self.count = frame_cap, None, [], 0

    def add(self, frame: np.ndarray) -> None:
        if self.count and frame.shape != self.shape:
            raise VideoError(f"the video changes size mid-stream ({self.shape[1]}x{self.shape[0]} to {frame.shape[1]}x{frame.shape[0]})")
        if self.cap:
            if self.buffer is None:
                self.buffer = np.empty((self.cap, *frame.shape), np.uint8)
            self.buffer[self.count] = frame
        else:
            self.frames.append(frame)
        self.shape = frame.shape
        self.count += 1

    def result(self) -> np.ndarray:
        if self.cap:
            return self.buffer[: self.count]
        return np.stack(self.frames)


def read_video(
    path: str | os.PathLike, *, frame_cap: int = 0, skip_first: int = 0, every_nth: int = 1
) -> DecodedVideo:
    """Decode a video to uint8 frames ``[F, H, W, 3]``.

    ``skip_first`` frames are dropped, then every ``every_nth`` frame is kept, up to
    ``frame_cap`` frames (0 = all); decoding stops at the cap.
    """
    _check_read_args(frame_cap, skip_first, every_nth)
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"expected a video file, found nothing at {path.name!r}")
    if path.suffix.lower() == ".webp":  # FFmpeg's webp decoder does not take animated files
        collector, total, source_fps = _read_pillow(path, frame_cap, skip_first, every_nth)
    else:
        collector, total, source_fps = _read_pyav(path, frame_cap, skip_first, every_nth)
    if collector.count == 0:
        raise VideoError(
            f"no frames to return: {path.name!r} has {total} frame(s) and skip_first={skip_first}, "
            f"every_nth={every_nth} leave none"
        )
    frames = collector.result()
    return DecodedVideo(frames, source_fps / every_nth, source_fps, frames.shape[2], frames.shape[1])


def _repeats(durations: Sequence[float]) -> tuple[list[int], float]:
    """Back to a constant rate for animated images, which store a delay per frame.

    Encoders (Pillow's gif, libwebp) merge identical neighbouring frames into one longer
    frame. The frame time is the greatest common divisor of the delays (in ms), so a
    frame shown k times as long repeats k times; delays with no useful common divisor
    fall back to the shortest. A clip of only identical frames stays one frame.
    Returns (repeats per stored frame, frame time in seconds).
    """
    ms = [round(d * 1000) for d in durations]
    positive = [d for d in ms if d > 0]
    if not positive:
        return [1] * len(durations), 0.0
    base = math.gcd(*positive)
    if base * 4 < min(positive):
        base = min(positive)
    return [max(1, round(d / base)) for d in ms], base / 1000.0


def _expand(frames: Iterable, repeats: Sequence[int] | None) -> Iterator:
    for index, frame in enumerate(frames):
        for _ in range(repeats[index] if repeats and index < len(repeats) else 1):
            yield frame


def _reason(exc: Exception) -> str:
    """FFmpeg's words without the file's full path (the host shows the message to users)."""
    return getattr(exc, "strerror", None) or str(exc)


def _read_pyav(path: Path, frame_cap: int, skip_first: int, every_nth: int):
    import av

    def open_container():
        try:
            return av.open(str(path))
        except (av.FFmpegError, UnicodeDecodeError) as exc:
            raise VideoError(f"expected a video file, {path.name!r} could not be opened as one ({_reason(exc)})") from None

    repeats = None
    container = open_container()
    with container:
        if not container.streams.video:
            raise VideoError(f"expected a video stream, found none in {path.name!r} (an audio file, or an incomplete one?)")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        source_fps = float(rate) if rate else 0.0
        if container.format.name == "gif":  # per-frame delays: a cheap pass over the packets
            try:
                durations = [float(p.duration * p.time_base) for p in container.demux(stream) if p.size]
            except av.FFmpegError as exc:
                raise VideoError(f"expected a readable gif, {path.name!r} failed to parse ({_reason(exc)})") from None
            repeats, base = _repeats(durations)
            source_fps = 1.0 / base if base else source_fps
    if source_fps <= 0:
        raise VideoError(f"expected a frame rate in {path.name!r}, found none")

    container = open_container()
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        collector, counter = _Collector(frame_cap), _Counter()
        try:
            frames = _expand(container.decode(stream), repeats)
            for _, frame in _select(counter.wrap(frames), skip_first, every_nth, frame_cap):
                collector.add(frame.to_ndarray(format="rgb24"))
        except av.FFmpegError as exc:
            raise VideoError(f"expected a decodable video, {path.name!r} failed to decode ({_reason(exc)})") from None
    return collector, counter.count, source_fps


def _read_pillow(path: Path, frame_cap: int, skip_first: int, every_nth: int):
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        image = Image.open(path)
    except (UnidentifiedImageError, OSError) as exc:
        raise VideoError(f"expected an animated webp, {path.name!r} could not be opened as one") from None
    with image:
        try:
            durations = []
            for frame in ImageSequence.Iterator(image):
                frame.load()  # Pillow fills in the frame duration on load
                durations.append(float(frame.info.get("duration") or 0) / 1000.0)
            repeats, base = _repeats(durations)
            source_fps = 1.0 / base if base else 1.0
            collector, counter = _Collector(frame_cap), _Counter()
            frames = _expand(ImageSequence.Iterator(image), repeats)
            for _, frame in _select(counter.wrap(frames), skip_first, every_nth, frame_cap):
                collector.add(np.asarray(frame.convert("RGB")))
        except (OSError, EOFError) as exc:
            raise VideoError(f"expected a decodable webp, {path.name!r} failed to decode ({exc})") from None
    return collector, counter.count, source_fps


class _Counter:
    """Counts what an iterator yielded (the source frames seen), for error messages."""

    def __init__(self):
        self.count = 0

    def wrap(self, items: Iterable) -> Iterator:
        for item in items:
            self.count += 1
            yield item


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``prompt`` / ``workflow`` (parsed JSON) embedded by ``write_video``; {} if none."""
    path = Path(path)
    suffix = path.suffix.lower()
    found: dict[str, str] = {}
    if suffix in (".gif", ".webp"):
        from PIL import Image

        with Image.open(path) as image:
            if suffix == ".gif" and image.info.get("comment"):
                return json.loads(image.info["comment"])
            for tag in (_EXIF_PROMPT, _EXIF_WORKFLOW):
                value = image.getexif().get(tag)
                if isinstance(value, str) and ":" in value:
                    key, _, text = value.partition(":")
                    found[key] = text
    else:
        import av

        with av.open(str(path)) as container:
            found = {k.lower(): v for k, v in container.metadata.items() if k.lower() in ("prompt", "workflow")}
    return {key: json.loads(value) for key, value in found.items()}


__all__: Sequence[str] = (
    "VideoError", "VideoFormat", "FORMATS", "VIDEO_EXTENSIONS", "DEFAULT_CRF", "ODD_SIZE_POLICIES",
    "WrittenVideo", "DecodedVideo", "frames_to_uint8", "frames_to_float", "check_frames", "check_fps",
    "get_format", "fps_fraction", "write_video", "list_videos", "read_video", "read_metadata",
)
