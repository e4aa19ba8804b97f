"""The Frame Interpolator node: keyframe latents -> k times as many frames (models/interpolate.py)."""

from __future__ import annotations

import torch

from ..models import interpolate
from .model import _conditioning, _latent, _num_frames, _preview_callback

CATEGORY = "MagicVideo/sampling"


class FrameInterpolator:
    DESCRIPTION = (
        "MagicVideo's frame interpolation in latent space: between every two neighbouring keyframes the model makes "
        "factor - 1 new frames, seeing the keyframes around them as given frames, so a 16-keyframe clip at 8 fps "
        "becomes 46 frames at 24 fps (factor 3). The keyframes are kept exactly. Needs a model trained with given "
        "frames (the bundled interpolator or default). Works on any length: windows of keyframes are denoised a "
        "batch at a time. Decode the result with MagicVideo VAE Decode (or core VAE Decode)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "interpolate"
    RETURN_TYPES = ("LATENT", "FLOAT")
    RETURN_NAMES = ("LATENT", "fps")
    OUTPUT_TOOLTIPS = ("(keyframes - 1) x factor + 1 frames per video, num_frames and fps updated.",
                       "The new frame rate (keyframe fps x factor), for Save Video.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MAGICVIDEO_MODEL", {"tooltip": "A model trained with given frames (MagicVideo Model Loader)."}),
                "samples": ("LATENT", {"tooltip": "Keyframe latents (the Keyframe or Sliding Window Sampler's)."}),
                "positive": ("CONDITIONING", {"tooltip": "The video's prompt (MagicVideo Text Encode), or an empty one."}),
                "factor": ("INT", {"default": 3, "min": 2, "max": 15,
                           "tooltip": "Frames per keyframe gap: 2 doubles the rate, 3 turns 8 fps into 24 fps."}),
                "steps": ("INT", {"default": interpolate.PRESET.steps, "min": 1, "max": 100,
                          "tooltip": "Denoising steps of the in-between frames (few are enough: the keyframes "
                                     "decide most)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                         "tooltip": "Noise seed of the in-betweens; each window of keyframes draws its own from it."}),
                "fps": ("FLOAT", {"default": 8.0, "min": 0.1, "max": 120.0, "step": 0.1,
                        "tooltip": "The keyframes' rate (the sampler's fps)."}),
            },
            "optional": {
                "frames": ("INT", {"default": 0, "min": 0, "max": 100000,
                           "tooltip": "Keyframes per video; 0 = the latent's num_frames (or its whole batch)."}),
                "batch": ("INT", {"default": 8, "min": 1, "max": 256,
                          "tooltip": "Windows of keyframes denoised together: memory grows with it, the frames do not "
                                     "change."}),
                "denoise": ("FLOAT", {"default": interpolate.PRESET.denoise, "min": 0.0, "max": 1.0, "step": 0.05,
                            "tooltip": "1 = the in-betweens from pure noise; below 1 = from the keyframes' latent "
                                       "blend noised to this level (the last steps x denoise steps run); "
                                       "0 = the latent blend itself, no model call."}),
            },
        }

    def interpolate(self, model, samples, positive, factor, steps, seed, fps, frames=0, batch=8,
                    denoise=interpolate.PRESET.denoise):
        keyframes = samples["samples"] * model.scaling_factor
        num_frames = _num_frames(samples, frames)
        if keyframes.shape[0] % num_frames:
            raise ValueError(f"the latent batch has {keyframes.shape[0]} frames, which does not split into videos of "
                             f"{num_frames} keyframes")
        videos = keyframes.split(num_frames)
        windows = len(interpolate.plan_gaps(num_frames, factor, model.config.max_frames))
        per_video = -(-windows // batch) * steps
        progress = _preview_callback(model, per_video * len(videos))
        options = interpolate.PRESET.replace(steps=steps, seed=seed, fps=fps, denoise=denoise)
        pos = _conditioning(positive, "positive")
        out = []
        for v, video in enumerate(videos):
            def callback(step, total, x0, v=v):
                progress(v * total + step, total * len(videos), x0)

            out.append(interpolate.interpolate(model.unet, video, factor, positive=pos, options=options, batch=batch,
                                               callback=callback))
        result = _latent(torch.cat(out) / model.scaling_factor, out[0].shape[0], samples)
        result["fps"] = fps * factor
        return (result, fps * factor)


NODE_CLASS_MAPPINGS = {"MagicVideoFrameInterpolator": FrameInterpolator}
NODE_DISPLAY_NAME_MAPPINGS = {"MagicVideoFrameInterpolator": "MagicVideo Frame Interpolator"}
