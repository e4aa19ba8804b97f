"""Save Video and Load Video: host IMAGE frames to and from files, through models/video_io."""

from __future__ import annotations

import hashlib
import logging
import os

import folder_paths

from ..models import video_io

log = logging.getLogger(__name__)

CATEGORY = "MagicVideo/video"


def _metadata_disabled() -> bool:
    """The host's --disable-metadata switch, read defensively (absent in some hosts)."""
    try:
        from comfy.cli_args import args
    except Exception:  # noqa: BLE001 - any host without it simply embeds
        return False
    return bool(getattr(args, "disable_metadata", False))


def _first(value):
    """INPUT_IS_LIST gives every input as a list; widgets carry one value."""
    return value[0] if isinstance(value, list) else value


class SaveVideo:
    DESCRIPTION = (
        "Writes IMAGE frames as a video: mp4 (H.264, yuv420p), webm (VP9) or animated gif/webp, "
        "into ComfyUI's output folder. The prompt and the workflow are embedded, so dropping the "
        "file back on ComfyUI restores the graph. A list of image batches becomes one video."
    )
    CATEGORY = CATEGORY
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    INPUT_IS_LIST = True  # image lists from upstream (windows, rebatches) join into one video

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Frames in order, [frames, height, width, 3]. All frames must have one size."}),
                "fps": ("FLOAT", {"default": 8.0, "min": 0.01, "max": 1000.0, "step": 0.01,
                                  "tooltip": "Frames per second of the written file. gif stores frame times in 1/100 s, so its rate is rounded."}),
                "format": (list(video_io.FORMATS), {"default": "mp4",
                                                    "tooltip": "mp4 = H.264 (plays everywhere), webm = VP9, gif / webp = animated images."}),
                "crf": ("INT", {"default": video_io.DEFAULT_CRF, "min": 0, "max": 51,
                                "tooltip": "Quality for mp4/webm: lower is better and larger (0 = near lossless, 19 = default, 28 = small). Ignored for gif/webp."}),
                "odd_size": (list(video_io.ODD_SIZE_POLICIES), {"default": "pad",
                                                                "tooltip": "H.264 needs an even width and height: pad repeats the last row/column, crop drops it. Other formats keep the size."}),
                "filename_prefix": ("STRING", {"default": "MagicVideo",
                                               "tooltip": "File name start inside the output folder; may hold subfolders (video/clip) and %width% / %height%."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(self, images, fps, format, crf, odd_size, filename_prefix, prompt=None, extra_pnginfo=None):
        fps, fmt, crf, odd_size = _first(fps), _first(format), _first(crf), _first(odd_size)
        prefix, prompt, extra = _first(filename_prefix), _first(prompt), _first(extra_pnginfo) or {}
        video_io.get_format(fmt)  # fail on bad arguments before choosing a file name
        video_io.check_fps(fps)
        _, height, width = video_io.check_frames(images)

        path, subfolder = output_path(prefix, fmt, width, height)
        written = video_io.write_video(path, images, fps, fmt, crf=crf, odd_size=odd_size,
                                       metadata=embedded(prompt, extra))
        return shown(written, subfolder, "MagicVideo Save Video")


def output_path(prefix: str, fmt: str, width: int, height: int) -> tuple[str, str]:
    """A fresh file in the host's output folder for a video: (path, subfolder)."""
    output_dir = folder_paths.get_output_directory()
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, output_dir, width, height)
    return os.path.join(folder, f"{name}_{counter:05}_.{video_io.FORMATS[fmt].extension}"), subfolder


def embedded(prompt, extra) -> dict | None:
    """What a saved video carries so that dropping it on ComfyUI restores the graph."""
    return None if _metadata_disabled() else {"prompt": prompt, "workflow": (extra or {}).get("workflow")}


def shown(written: video_io.WrittenVideo, subfolder: str, node: str) -> dict:
    """An output node's result: the file, previewed in the UI."""
    for note in written.notes:
        log.warning("%s: %s", node, note)
    result = {"filename": written.path.name, "subfolder": subfolder, "type": "output", "format": written.format.mime,
              "frame_rate": written.fps, "frame_count": written.frames, "notes": written.notes}
    return {"ui": {"images": [result], "animated": (True,)}}


def _input_path(name: str) -> str:
    """``name`` resolved inside the host's input folder; VideoError if it points outside."""
    root = os.path.realpath(folder_paths.get_input_directory())
    if not name or os.path.isabs(name):
        raise video_io.VideoError(f"expected a file name inside ComfyUI's input folder, found {name!r}")
    path = os.path.realpath(os.path.join(root, os.path.normpath(name)))
    if os.path.commonpath((root, path)) != root:
        raise video_io.VideoError(
            f"expected a video inside ComfyUI's input folder, found {name!r}, which points outside it; "
            "upload the video or copy it into the input folder"
        )
    if not os.path.isfile(path):
        raise video_io.VideoError(f"expected a video file in ComfyUI's input folder, found no file named {name!r}")
    return path


class LoadVideo:
    DESCRIPTION = (
        "Reads a video from ComfyUI's input folder (upload one with the button) into IMAGE frames, "
        "with its frame rate and frame count. Decoding stops at the frame cap, so memory stays bounded."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE", "FLOAT", "INT")
    RETURN_NAMES = ("frames", "fps", "frame_count")
    OUTPUT_TOOLTIPS = ("The decoded frames.", "Frame rate of the returned frames (source rate / every_nth).",
                       "How many frames were returned.")

    @classmethod
    def INPUT_TYPES(cls):
        files = video_io.list_videos(folder_paths.get_input_directory())
        return {
            "required": {
                "video": (files, {"video_upload": True,
                                  "tooltip": "A video in ComfyUI's input folder: " + ", ".join(video_io.VIDEO_EXTENSIONS) + "."}),
                "frame_cap": ("INT", {"default": 0, "min": 0, "max": 100000,
                                      "tooltip": "Most frames to return (0 = all). Decoding stops here, which bounds memory."}),
                "skip_first": ("INT", {"default": 0, "min": 0, "max": 1000000,
                                       "tooltip": "Frames dropped from the start before any are kept."}),
                "every_nth": ("INT", {"default": 1, "min": 1, "max": 1000,
                                      "tooltip": "Keep one frame in n (1 = every frame); the fps output is divided by n."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, video):
        try:
            _input_path(video)
        except video_io.VideoError as exc:
            return str(exc)
        return True

    @classmethod
    def IS_CHANGED(cls, video, **_):
        try:
            stat = os.stat(_input_path(video))
        except (video_io.VideoError, OSError):
            return video
        return hashlib.sha256(f"{video}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()

    def load(self, video, frame_cap, skip_first, every_nth):
        decoded = video_io.read_video(_input_path(video), frame_cap=frame_cap, skip_first=skip_first,
                                      every_nth=every_nth)
        return (video_io.frames_to_float(decoded.frames), decoded.fps, len(decoded.frames))


NODE_CLASS_MAPPINGS = {
    "MagicVideoSaveVideo": SaveVideo,
    "MagicVideoLoadVideo": LoadVideo,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "MagicVideoSaveVideo": "Save Video (MagicVideo)",
    "MagicVideoLoadVideo": "Load Video (MagicVideo)",
}
