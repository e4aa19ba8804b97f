"""Long video nodes: the Sliding Window Sampler (a prompt schedule -> keyframe latents of any
length) and Save Long Video (those latents decoded and encoded chunk by chunk into a file).

Why two nodes and not IMAGE in between: a minute of frames as the host's float IMAGE is too
big to pass around (1,440 frames at 256x256 is 1.1 GB), while keyframe latents are tiny. So
the sampler hands a LATENT over, as any sampler does (core VAE Decode still takes it for short
videos), and the writer turns it into pixels a chunk at a time, writing as it goes. The
windows, the schedule and the streaming live in models/long_video.py.
"""

from __future__ import annotations

import comfy.model_management as mm
import comfy.utils

from ..models import long_video, sampling, video_io
from .model import MAIN, SETTINGS_INPUT, _latent, _preview_callback
from .video import embedded, output_path, shown

CATEGORY = "MagicVideo/long video"

SCHEDULE = "\n".join([  # the minute workflow's: a linear motion runs into the frame's edge after 2 to 4 s
    "0-5: a red circle moving to the right",
    "5-10: a red circle moving to the left",
    "10-15: a red circle bouncing",
    "15-20: a red circle moving to the left",
    "20-25: a red circle moving to the right",
    "25-30: a red circle bouncing",
    "30-35: a red circle moving to the right",
    "35-40: a red circle moving to the left",
    "40-45: a red circle bouncing",
    "45-50: a red circle moving to the left",
    "50-55: a red circle moving to the right",
    "55-end: a red circle bouncing",
])


class SlidingWindowSampler:
    DESCRIPTION = (
        "Keyframes of a long video from a prompt schedule (Magic 1-For-1's sliding window): windows of a few seconds "
        "made one after another, each continuing from the last frames of the one before (continue), or overlapping "
        "windows denoised together and blended (fusion), or windows side by side (independent). One prompt per time "
        "range, one per line ('0-20: a red circle moving to the right'); a window between two prompts blends them. "
        "Every window and the schedule are checked before sampling starts. Feed the latent to Save Long Video."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Keyframe latents of the whole video (frames in the batch dimension, num_frames = all of "
                       "them, fps = the keyframe rate).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MAGICVIDEO_MODEL", {"tooltip": "The video model from MagicVideo Model Loader."}),
                "text_encoder": ("MAGICVIDEO_TEXT", {"tooltip": "The model file's built-in text encoder (Model "
                                                                "Loader), which reads every prompt of the schedule."}),
                "schedule": ("STRING", {"multiline": True, "default": SCHEDULE,
                             "tooltip": "One 'START-END: prompt' line per time range, in seconds, without gaps, "
                                        "from 0 to the video's length ('end' stands for it); or one prompt for the "
                                        "whole video. Lines starting with # are skipped."}),
                "seconds": ("FLOAT", {"default": 60.0, "min": 0.125, "max": 3600.0, "step": 0.125,
                            "tooltip": "Length of the video; keyframes = seconds x fps."}),
                "width": ("INT", {"default": 64, "min": 8, "max": 8192, "step": 8, "tooltip": "Frame width in pixels."}),
                "height": ("INT", {"default": 64, "min": 8, "max": 8192, "step": 8, "tooltip": "Frame height in pixels."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                         "tooltip": "Window k samples with seed + k: the same seed gives the same video."}),
                "steps": ("INT", {"default": MAIN.steps, "min": 1, "max": 1000, "tooltip": "Denoising steps per window."}),
                "cfg": ("FLOAT", {"default": MAIN.cfg, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                        "tooltip": "Classifier-free guidance scale (against the empty prompt); 1 = off, half the work."}),
                "method": (list(long_video.METHODS), {"default": "continue",
                           "tooltip": "continue: each window is given the last overlap frames of the one before "
                                      "(needs a model trained with given frames, as the bundled default). fusion: "
                                      "windows overlapping by overlap frames, denoised together and blended. "
                                      "independent: separate windows (seams show)."}),
                "window": ("INT", {"default": 16, "min": 1, "max": 256,
                           "tooltip": "Keyframes per window, at most the model's max_frames (16 for the default)."}),
                "overlap": ("INT", {"default": 4, "min": 0, "max": 255,
                            "tooltip": "Frames shared by neighbouring windows: what each window continues from "
                                       "(continue) or blends over (fusion). Less than the window."}),
            },
            "optional": {
                "fps": ("FLOAT", {"default": MAIN.fps, "min": 0.1, "max": 120.0, "step": 0.1,
                        "tooltip": "Keyframe rate, which the model is conditioned on (motion speed)."}),
                "motion_guidance": ("FLOAT", {"default": MAIN.motion_guidance, "min": 0.0, "max": 2.0, "step": 0.05,
                                    "tooltip": "Steer each object along the motion its window's prompt asks for "
                                               "(see the Keyframe Sampler); continue and independent only."}),
                "settings": SETTINGS_INPUT,
            },
        }

    def sample(self, model, text_encoder, schedule, seconds, width, height, seed, steps, cfg, method, window, overlap,
               fps=MAIN.fps, motion_guidance=MAIN.motion_guidance, settings=MAIN.settings):
        if width % 8 or height % 8:
            raise ValueError(f"width and height must be multiples of 8; got {width}x{height}")
        frames = max(1, round(seconds * fps))
        spans = long_video.parse_schedule(schedule, seconds)
        options = MAIN.replace(seed=seed, steps=steps, cfg=cfg, fps=fps, motion_guidance=motion_guidance,
                               settings=settings)
        options = sampling.for_model(options, model.config.student_timesteps)  # for the progress bar's total
        windows = long_video.plan_windows(frames, window, overlap, method)
        total = options.steps * (1 if method == "fusion" else len(windows))
        latents = long_video.sample_long_video(
            model.unet, text_encoder, spans, frames=frames, latent_size=(height // 8, width // 8), window=window,
            overlap=overlap, method=method, options=options, callback=_preview_callback(model, total))
        out = _latent(latents / model.scaling_factor, frames)
        out["fps"] = fps
        return (out,)


class SaveLongVideo:
    DESCRIPTION = (
        "Decodes video latents with the VideoVAE and writes them as a video chunk by chunk, so a minute of video never "
        "sits in memory as pixels: for the Sliding Window Sampler's keyframes (any LATENT of MagicVideo frames works). "
        "The prompt and workflow are embedded; a cancel or an error midway leaves no file."
    )
    CATEGORY = CATEGORY
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("MAGICVIDEO_VAE", {"tooltip": "The VideoVAE from MagicVideo Model Loader."}),
                "samples": ("LATENT", {"tooltip": "Video latents, frames in the batch dimension (one video)."}),
                "fps": ("FLOAT", {"default": MAIN.fps, "min": 0.01, "max": 1000.0, "step": 0.01,
                        "tooltip": "Frames per second of the file (the keyframe rate for the sampler's latents)."}),
                "format": (["mp4", "webm"], {"default": "mp4",
                           "tooltip": "mp4 = H.264, webm = VP9; both are written as frames come."}),
                "crf": ("INT", {"default": video_io.DEFAULT_CRF, "min": 0, "max": 51,
                        "tooltip": "Quality: lower is better and larger."}),
                "chunk_size": ("INT", {"default": 16, "min": 1, "max": 4096,
                               "tooltip": "Frames decoded at once: memory grows with it, not with the video."}),
                "filename_prefix": ("STRING", {"default": "MagicVideo/long",
                                    "tooltip": "File name start inside the output folder."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(self, vae, samples, fps, format, crf, chunk_size, filename_prefix, prompt=None, extra_pnginfo=None):
        latents = samples["samples"]
        if latents.ndim != 4 or latents.shape[1] != vae.config.embed_dim:
            raise ValueError(f"expected video latents [frames, {vae.config.embed_dim}, h, w] of this VAE, found "
                             f"shape {tuple(latents.shape)}")
        num_frames = int(samples.get("num_frames") or latents.shape[0])
        if num_frames != latents.shape[0]:
            raise ValueError(f"Save Long Video writes one video; this latent holds {latents.shape[0] // num_frames} "
                             f"videos of {num_frames} frames (save them with VAE Decode and Save Video)")
        video_io.check_fps(fps)
        down = vae.config.downscale
        path, subfolder = output_path(filename_prefix, format, latents.shape[-1] * down, latents.shape[-2] * down)
        pbar = comfy.utils.ProgressBar(latents.shape[0])

        def on_chunk(done, total):
            mm.throw_exception_if_processing_interrupted()
            pbar.update_absolute(done, total)

        written = long_video.write_long_video(path, vae, latents * vae.config.scaling_factor, fps, format,
                                              chunk_size=chunk_size, crf=crf, metadata=embedded(prompt, extra_pnginfo),
                                              on_chunk=on_chunk)
        return shown(written, subfolder, "MagicVideo Save Long Video")


NODE_CLASS_MAPPINGS = {
    "MagicVideoSlidingWindowSampler": SlidingWindowSampler,
    "MagicVideoSaveLongVideo": SaveLongVideo,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "MagicVideoSlidingWindowSampler": "MagicVideo Sliding Window Sampler",
    "MagicVideoSaveLongVideo": "MagicVideo Save Long Video",
}
