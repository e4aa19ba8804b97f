"""The Super-Resolver node: IMAGE frames -> the same frames at 4x (models/upscale.py)."""

from __future__ import annotations

import os

import torch

import comfy.model_management as mm
import comfy.utils

from ..models import checkpoint, upscale
from .model import CATEGORY, FOLDER, _path, _safetensors

DEFAULT_UPSCALER = "magicvideo_upscaler.safetensors"


class SuperResolver:
    DESCRIPTION = (
        "MagicVideo's super-resolution stage: raises every frame of a video 4x (64x64 -> 256x256) with a small "
        "trained network that sees each frame's neighbours, so still parts stay steady instead of flickering as "
        "with a per-frame upscaler. Takes any IMAGE: MagicVideo VAE Decode's frames, a loaded video, core nodes' "
        "images. Runs in chunks of frames and tiles of large frames, so memory does not grow with the video. "
        "Given the latents the frames were decoded from and their prompt, it also redraws what the 64x64 decode "
        "lost."
    )
    CATEGORY = f"{CATEGORY}/image"
    FUNCTION = "upscale"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The frames at 4x the width and height, in the same order.",)

    _cache: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        models = _safetensors(FOLDER)
        default = DEFAULT_UPSCALER if DEFAULT_UPSCALER in models else (models[0] if models else DEFAULT_UPSCALER)
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Frames [frames, height, width, 3], e.g. from MagicVideo VAE Decode "
                                                "or Load Video. Each side 4 to 2048 pixels."}),
                "upscaler": (models or [DEFAULT_UPSCALER], {"default": default,
                             "tooltip": "A MagicVideo upscaler file (models/magicvideo/ or the pack's bundled "
                                        "magicvideo_upscaler.safetensors)."}),
            },
            "optional": {
                "latents": ("LATENT", {"tooltip": "The latents these frames were decoded from (what went into "
                                                  "MagicVideo VAE Decode). The bundled upscaler reads them to redraw "
                                                  "edges and colours the small decode lost; leave empty for any "
                                                  "other IMAGE."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt the frames were made with (MagicVideo Text "
                                                         "Encode's). The bundled upscaler reads it to restore colours "
                                                         "the small VAE drew off (a navy background drawn grey-blue). "
                                                         "Only for frames MagicVideo VAE Decode made: on other frames "
                                                         "it shifts colours that were right."}),
                "frames": ("INT", {"default": 0, "min": 0, "max": 100000,
                           "tooltip": "Frames per video when the batch holds several videos (each is upscaled "
                                      "apart, so no frame sees another video's); 0 = the whole batch is one video."}),
                "chunk_size": ("INT", {"default": 16, "min": 1, "max": 1024,
                               "tooltip": "Frames per pass: memory grows with it, the frames do not change."}),
            },
        }

    def _model(self, name: str) -> upscale.VideoUpscaler:
        path = _path(FOLDER, name)
        key = (path, os.path.getmtime(path))
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = checkpoint.load_upscaler(path)
        return self._cache[key]

    def upscale(self, images, upscaler, latents=None, positive=None, frames=0, chunk_size=16):
        upscale.check_frames(images)
        per_video = frames or images.shape[0]
        if images.shape[0] % per_video:
            raise ValueError(f"the IMAGE batch has {images.shape[0]} frames, which does not split into videos of "
                             f"{per_video} frames")
        model = self._model(upscaler)
        z = None if latents is None else latents["samples"].float().cpu()
        upscale.check_latents(model, images, z)
        text = None if positive is None else positive[0][0].float().cpu()
        if text is not None and len(positive) != 1:
            raise ValueError(f"the upscaler reads one prompt; the positive CONDITIONING holds {len(positive)}")
        upscale.check_text(model, text)
        z_videos = [None] * (images.shape[0] // per_video) if z is None else z.split(per_video)
        pbar = comfy.utils.ProgressBar(images.shape[0])
        out = []
        for v, (video, lat) in enumerate(zip(images.split(per_video), z_videos)):
            def progress(done, total, v=v):
                mm.throw_exception_if_processing_interrupted()
                pbar.update_absolute(v * per_video + done, images.shape[0])

            out.append(upscale.upscale(model, video.float().cpu(), latents=lat, text=text, chunk=chunk_size,
                                       callback=progress))
        return (torch.cat(out),)


NODE_CLASS_MAPPINGS = {"MagicVideoSuperResolver": SuperResolver}
NODE_DISPLAY_NAME_MAPPINGS = {"MagicVideoSuperResolver": "MagicVideo Super-Resolver"}
