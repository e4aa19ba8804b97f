"""Model nodes: load a MagicVideo model, make empty video latents, sample keyframes, VAE encode/decode.

Thin: unpack host types, call the library (models/checkpoint, sampling, vae), pack host
types. Frames ride in the LATENT batch dimension; ``"num_frames"`` is an extra key that
these nodes write and read when present, never rely on. LATENT holds unscaled VAE
latents, as everywhere in ComfyUI (core VAE Encode/Decode, KSampler); the sampler scales
by the model's ``scaling_factor`` on the way in and back on the way out.
"""

from __future__ import annotations

import os

import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ..models import checkpoint, guidance, pipeline, quant, sampling, vae as vae_lib
from ..models.conditioning import GivenFrames

CATEGORY = "MagicVideo"
FOLDER = "magicvideo"
NONE = "none"
PACK_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")
DEFAULT_MODEL = "magicvideo_default.safetensors"
MAX_RESOLUTION = 8192
PREVIEW_SIZE = 512

# models/magicvideo/ first, then the pack's bundled weights/
folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
folder_paths.add_model_folder_path(FOLDER, PACK_WEIGHTS)

MAIN = sampling.PRESETS["main"]
SETTINGS_INPUT = (list(sampling.SETTINGS), {
    "default": MAIN.settings,
    "tooltip": "model: a few-step student file (a distilled model) sets the sampling itself: its own timesteps "
               "(steps = how many of them, at most all), the lcm sampler, cfg 1 and no motion guidance. as_set: "
               "the settings above as they are. Many-step models sample the same either way."})
WEIGHTS = {"as stored": None, "int8": "none", "int8 + 2:4": "2:4"}  # the loader's conversions (models/quant.py)  # the node defaults are the main workflow's settings


def _safetensors(folder: str) -> list[str]:
    """Files of a model folder that we may open: safetensors only, never pickles."""
    try:
        names = folder_paths.get_filename_list(folder)
    except KeyError:
        return []
    return sorted(n for n in names if n.lower().endswith(".safetensors"))


def _path(folder: str, name: str) -> str:
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ValueError(f"expected a file named {name!r} in ComfyUI's models/{folder}/ folder, found none")
    return path


def _conditioning(cond, name: str) -> torch.Tensor:
    """CONDITIONING ``[[tensor [1, tokens, width], {...}]]`` -> the tensor."""
    if not isinstance(cond, (list, tuple)) or not cond or not isinstance(cond[0], (list, tuple)):
        raise ValueError(f"{name}: expected CONDITIONING (a list of [tensor, dict] pairs), got {type(cond).__name__}")
    if len(cond) != 1:
        raise ValueError(
            f"{name}: expected one conditioning entry (one CLIPTextEncode), found {len(cond)} "
            "(from Conditioning Combine or Concat?): encode the whole prompt in one text node"
        )
    return cond[0][0]


def _extra(cond) -> dict:
    """The dict of a one-entry CONDITIONING ({} when it has none)."""
    return cond[0][1] if len(cond[0]) > 1 and isinstance(cond[0][1], dict) else {}


def _num_frames(latent: dict, frames: int) -> int:
    """The frames input when set (> 0), else the latent's ``num_frames``, else the whole batch."""
    if frames > 0:
        return frames
    return int(latent.get("num_frames") or latent["samples"].shape[0])


def _latent(samples: torch.Tensor, num_frames: int, like: dict | None = None) -> dict:
    out = dict(like or {})
    out.pop("noise_mask", None)
    out.pop("batch_index", None)
    out["samples"] = samples
    out["num_frames"] = num_frames
    return out


def _preview_callback(model: pipeline.VideoModel, steps: int):
    """The host's progress bar (+ a latent->RGB preview of the first frame) and Cancel."""
    pbar = comfy.utils.ProgressBar(steps)

    def callback(step, total, x0):
        mm.throw_exception_if_processing_interrupted()
        preview = None
        if model.latent_rgb is not None and x0.shape[1] + 1 == model.latent_rgb.shape[0]:
            from PIL import Image

            rgb = vae_lib.latent_to_rgb(x0[:1], model.latent_rgb)[0]
            preview = ("JPEG", Image.fromarray(rgb.mul(255).byte().cpu().numpy()), PREVIEW_SIZE)
        pbar.update_absolute(step, total, preview)

    return callback


# ----------------------------------------------------------------------------- loader


class ModelLoader:
    DESCRIPTION = (
        "Loads a MagicVideo model: a MagicVideo file from models/magicvideo/ (or the pack's bundled "
        "default), or an SD1.5 checkpoint from models/checkpoints/ inflated into a video model, optionally "
        "with a motion-only file (frame adaptors + temporal attention) applied on top. Outputs the video "
        "UNet, the VideoVAE and, when the file has one, its built-in text encoder."
    )
    CATEGORY = f"{CATEGORY}/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("MAGICVIDEO_MODEL", "MAGICVIDEO_VAE", "MAGICVIDEO_TEXT")
    RETURN_NAMES = ("model", "vae", "text_encoder")
    OUTPUT_TOOLTIPS = (
        "The video UNet, for the Keyframe Sampler.",
        "The VideoVAE (SD-compatible latents), for MagicVideo VAE Encode/Decode.",
        "The file's built-in text encoder (None for SD1.5 checkpoints: use CLIPTextEncode).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        models = _safetensors(FOLDER)
        default = DEFAULT_MODEL if DEFAULT_MODEL in models else (models[0] if models else NONE)
        return {
            "required": {
                "model_name": ([NONE] + models, {"default": default,
                               "tooltip": "A MagicVideo model file (models/magicvideo/ or the pack's weights/). "
                                          "Set to none to inflate the SD1.5 checkpoint below instead."}),
                "sd15_checkpoint": ([NONE] + _safetensors("checkpoints"), {"default": NONE,
                                    "tooltip": "An SD1.5 checkpoint (models/checkpoints/, safetensors) turned into a "
                                               "video model: its image weights plus fresh, identity-initialised motion layers. "
                                               "Used when model_name is none."}),
                "motion_module": ([NONE] + models, {"default": NONE,
                                  "tooltip": "A motion-only MagicVideo file (adaptors, temporal attention, fps) applied "
                                             "onto the SD1.5 checkpoint, in full precision or int8 (`magicvideo "
                                             "quantize`). none keeps the untrained motion layers."}),
                "dtype": (list(pipeline.DTYPES), {"default": "auto",
                          "tooltip": "Weight precision. auto: bf16/fp16 on a GPU (VAE bf16 or fp32), fp32 on CPU."}),
            },
            "optional": {
                "weights": (list(WEIGHTS), {"default": "as stored",
                            "tooltip": "The UNet's weights: as the file stores them, or converted on load to int8 "
                                       "(one scale per output channel; about a quarter of fp32's memory) or int8 with "
                                       "2:4 sparsity (2 of every 4 weights kept; smaller still, and it costs quality). "
                                       "`magicvideo quantize` writes such a file once."}),
            },
        }

    def load(self, model_name, sd15_checkpoint, motion_module, dtype, weights="as stored"):
        # the host runs nodes under torch.inference_mode; weights made there could not take part in
        # the autograd that the sampler's motion guidance runs (gradients w.r.t. the latent only)
        with torch.inference_mode(False):
            return self._load(model_name, sd15_checkpoint, motion_module, dtype, weights)

    def _load(self, model_name, sd15_checkpoint, motion_module, dtype, weights="as stored"):
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
        if model_name != NONE and sd15_checkpoint != NONE:
            raise ValueError(
                f"choose one source: model_name is {model_name!r} and sd15_checkpoint is {sd15_checkpoint!r}; "
                "set one of them to none"
            )
        if model_name != NONE:
            if motion_module != NONE:
                raise ValueError("motion_module applies onto an SD1.5 checkpoint; with a MagicVideo file set it to none")
            bundle = checkpoint.load_model(_path(FOLDER, model_name))
        elif sd15_checkpoint != NONE:
            motion = _path(FOLDER, motion_module) if motion_module != NONE else None
            bundle = checkpoint.load_sd15(_path("checkpoints", sd15_checkpoint), motion=motion)
        else:
            raise ValueError("no model chosen: pick a model_name, or set it to none and pick an sd15_checkpoint")
        if WEIGHTS[weights] is not None:
            if model_name != NONE and quant.describe(bundle.unet):
                raise ValueError(f"{model_name} is quantised already; load it with weights 'as stored'")
            quant.quantize(bundle.unet, sparsity=WEIGHTS[weights])  # after an int8 motion file: the rest
        unet, video_vae, text = pipeline.prepare(bundle, device=mm.get_torch_device(), dtype=dtype)
        model = pipeline.VideoModel(unet, video_vae.config.scaling_factor, video_vae.latent_rgb())
        return (model, video_vae, text)


# ----------------------------------------------------------------------------- latents


class EmptyVideoLatent:
    DESCRIPTION = (
        "An empty (zero) video latent: batch x frames latent frames of 4 channels at 1/8 of the size, "
        "frames in the batch dimension like any SD latent, plus a num_frames key."
    )
    CATEGORY = f"{CATEGORY}/latent"
    FUNCTION = "generate"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("[(batch x frames), 4, height/8, width/8] zeros with num_frames = frames.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "width": ("INT", {"default": 256, "min": 8, "max": MAX_RESOLUTION, "step": 8,
                          "tooltip": "Video width in pixels (a multiple of 8)."}),
                "height": ("INT", {"default": 256, "min": 8, "max": MAX_RESOLUTION, "step": 8,
                           "tooltip": "Video height in pixels (a multiple of 8)."}),
                "frames": ("INT", {"default": 16, "min": 1, "max": 4096,
                           "tooltip": "Frames per video (keyframes for the Keyframe Sampler)."}),
                "batch": ("INT", {"default": 1, "min": 1, "max": 64,
                          "tooltip": "Number of videos, each with its own noise."}),
            }
        }

    def generate(self, width, height, frames, batch):
        if width % 8 or height % 8:
            raise ValueError(f"width and height must be multiples of 8; got {width}x{height}")
        samples = torch.zeros(batch * frames, 4, height // 8, width // 8)
        return (_latent(samples, frames),)


# ----------------------------------------------------------------------------- sampler


class KeyframeSampler:
    DESCRIPTION = (
        "Generates video latents with a MagicVideo model: every frame denoised together, frames seeing earlier "
        "frames through directed temporal attention. Takes CONDITIONING from CLIPTextEncode (or MagicVideo Text "
        "Encode), classifier-free guidance against the negative, diffusers samplers. denoise < 1 starts from the "
        "given latent (video-to-video); reference latents (first frames) condition image-to-video models. Models "
        "trained image-first make the first frame alone, then the rest from it. The defaults are the main "
        "workflow's settings."
    )
    CATEGORY = f"{CATEGORY}/sampling"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Denoised video latents, frames in the batch dimension, with num_frames.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MAGICVIDEO_MODEL", {"tooltip": "The video model from MagicVideo Model Loader."}),
                "positive": ("CONDITIONING", {"tooltip": "What the video shows (one text encode)."}),
                "negative": ("CONDITIONING", {"tooltip": "What to steer away from; an empty prompt for plain guidance."}),
                "latent": ("LATENT", {"tooltip": "Video latent: Empty Video Latent, or an encoded video when denoise < 1."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                         "tooltip": "Noise seed; the same seed gives the same video on any device."}),
                "steps": ("INT", {"default": MAIN.steps, "min": 1, "max": 1000, "tooltip": "Denoising steps of the full schedule."}),
                "cfg": ("FLOAT", {"default": MAIN.cfg, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                        "tooltip": "Classifier-free guidance scale; 1 skips the negative (half the work)."}),
                "sampler": (list(sampling.SAMPLERS), {"default": MAIN.sampler, "tooltip": "The diffusers sampler."}),
                "scheduler": (list(sampling.SCHEDULERS), {"default": MAIN.scheduler,
                              "tooltip": "normal: evenly spaced timesteps; karras: Karras sigmas (euler, dpmpp_2m, uni_pc)."}),
                "fps": ("FLOAT", {"default": MAIN.fps, "min": 0.1, "max": 120.0, "step": 0.1,
                        "tooltip": "Frame rate the model is conditioned on (motion speed)."}),
                "denoise": ("FLOAT", {"default": MAIN.denoise, "min": 0.0, "max": 1.0, "step": 0.01,
                            "tooltip": "1 = from pure noise; below 1 runs the last steps*denoise steps from the "
                                       "input latent noised to that level."}),
                "frames": ("INT", {"default": 0, "min": 0, "max": 4096,
                           "tooltip": "Frames per video; 0 = the latent's num_frames (or its whole batch as one video)."}),
            },
            "optional": {
                "reference": ("LATENT", {"tooltip": "Latents of the first frame(s) for image-to-video, for models with "
                                                    "image-prior channels or trained to continue given first frames "
                                                    "(a model that can take neither says so)."}),
                "given_frames": ("MAGICVIDEO_GIVEN", {"tooltip": "Pictures the video must contain at chosen frames "
                                                                 "(MagicVideo Given Frames): image-to-video, "
                                                                 "continuation, first and last frames."}),
                "noise_sharing": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 0.95, "step": 0.05,
                                  "tooltip": "Fraction of the starting noise shared by all frames of a video: higher "
                                             "keeps objects steadier across frames, 0 = independent noise per frame, "
                                             "-1 = what the model was trained with (0 for SD1.5-based models)."}),
                "cfg_start": ("FLOAT", {"default": MAIN.cfg_start, "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "Guidance starts at this point of the schedule (0 = pure noise, 1 = clean); "
                                         "steps outside cfg_start..cfg_end run at cfg 1, half the work."}),
                "cfg_end": ("FLOAT", {"default": MAIN.cfg_end, "min": 0.0, "max": 1.0, "step": 0.01,
                            "tooltip": "Guidance ends at this point of the schedule (1 = every step to the end; the "
                                       "default guides the first 70%, where it helps the bundled default)."}),
                "motion_guidance": ("FLOAT", {"default": MAIN.motion_guidance, "min": 0.0, "max": 2.0, "step": 0.05,
                                    "tooltip": "Steer each object along the motion its words ask for (prompts from "
                                               "MagicVideo Text Encode): on the early steps the latent moves so that "
                                               "the cells attending to an object's words travel its path. 0 = off; "
                                               "the default 0.2 suits the bundled default (motion right more often, a "
                                               "little shape and presence lost); each steered step costs about two "
                                               "more UNet passes."}),
                "motion_guidance_until": ("FLOAT", {"default": MAIN.motion_guidance_until, "min": 0.0, "max": 1.0, "step": 0.05,
                                          "tooltip": "Motion guidance steers the steps up to this point of the "
                                                     "schedule (0 = pure noise, 1 = clean), where the layout is set."}),
                "settings": SETTINGS_INPUT,
            },
        }

    def sample(self, model, positive, negative, latent, seed, steps, cfg, sampler, scheduler, fps, denoise, frames,
               reference=None, noise_sharing=-1.0, cfg_start=MAIN.cfg_start, cfg_end=MAIN.cfg_end,
               motion_guidance=MAIN.motion_guidance, motion_guidance_until=MAIN.motion_guidance_until,
               given_frames=None, settings=MAIN.settings):
        num_frames = _num_frames(latent, frames)
        options = sampling.SamplingOptions(
            steps=steps, cfg=cfg, cfg_start=cfg_start, cfg_end=cfg_end, sampler=sampler, scheduler=scheduler, fps=fps,
            denoise=denoise, noise_sharing=None if noise_sharing < 0 else noise_sharing, seed=seed,
            motion_guidance=motion_guidance, motion_guidance_until=motion_guidance_until, settings=settings)
        if reference is not None and given_frames is not None:
            raise ValueError("give frames one way: both reference and given_frames are connected; disconnect one")
        given = given_frames
        if reference is not None:  # latents of the first frames (older workflows)
            given = GivenFrames.first(reference["samples"] * model.scaling_factor)
        pos, motion = _conditioning(positive, "positive"), None
        if motion_guidance > 0:
            motion = _extra(positive).get(guidance.MOTION_KEY)
            if motion is None:
                print("[MagicVideo] motion_guidance reads prompts from MagicVideo Text Encode (with a model file "
                      "that carries a lexicon); this positive conditioning has none, so sampling goes unsteered.")
        out = pipeline.sample_video(
            model.unet, latent["samples"] * model.scaling_factor, pos, _conditioning(negative, "negative"),
            num_frames=num_frames, options=options, given=given, motion=motion,
            callback=_preview_callback(model, steps),  # the callback reports the true total
        )
        return (_latent(out.cpu() / model.scaling_factor, num_frames, latent),)


# ----------------------------------------------------------------------------- VAE


class VAEEncode:
    DESCRIPTION = "Encodes IMAGE frames into video latents with the VideoVAE (frame by frame, in chunks)."
    CATEGORY = f"{CATEGORY}/latent"
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("[frames, 4, H/8, W/8] latents with num_frames = the number of frames.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("MAGICVIDEO_VAE", {"tooltip": "The VideoVAE from MagicVideo Model Loader."}),
                "images": ("IMAGE", {"tooltip": "Frames [frames, H, W, 3] in 0..1; H and W multiples of 8."}),
                "chunk_size": ("INT", {"default": 8, "min": 1, "max": 4096,
                               "tooltip": "Frames encoded at once: lower uses less memory, same result."}),
            }
        }

    def encode(self, vae, images, chunk_size):
        pixels = images.movedim(-1, 1) * 2 - 1  # [F, 3, H, W] in [-1, 1]
        latents, _ = vae.encode_dist(pixels, chunk_size=chunk_size)  # the posterior mean, unscaled
        return (_latent(latents.float().cpu(), images.shape[0]),)


class VAEDecode:
    DESCRIPTION = (
        "Decodes video latents into IMAGE frames with the VideoVAE, whose temporal layers let each frame see the "
        "frames before it (less flicker). Decodes chunk by chunk; the result does not depend on the chunk size."
    )
    CATEGORY = f"{CATEGORY}/latent"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("Frames [frames, H, W, 3] in 0..1.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("MAGICVIDEO_VAE", {"tooltip": "The VideoVAE from MagicVideo Model Loader."}),
                "samples": ("LATENT", {"tooltip": "Video latents, frames in the batch dimension."}),
                "frames": ("INT", {"default": 0, "min": 0, "max": 4096,
                           "tooltip": "Frames per video; 0 = the latent's num_frames (or its whole batch)."}),
                "chunk_size": ("INT", {"default": 8, "min": 1, "max": 4096,
                               "tooltip": "Frames decoded at once: lower uses less memory, same result."}),
            }
        }

    def decode(self, vae, samples, frames, chunk_size):
        num_frames = _num_frames(samples, frames)
        images = vae.decode_raw(samples["samples"], num_frames=num_frames, chunk_size=chunk_size)
        return (((images.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu(),)


NODE_CLASS_MAPPINGS = {
    "MagicVideoModelLoader": ModelLoader,
    "MagicVideoEmptyLatent": EmptyVideoLatent,
    "MagicVideoKeyframeSampler": KeyframeSampler,
    "MagicVideoVAEEncode": VAEEncode,
    "MagicVideoVAEDecode": VAEDecode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "MagicVideoModelLoader": "MagicVideo Model Loader",
    "MagicVideoEmptyLatent": "Empty Video Latent (MagicVideo)",
    "MagicVideoKeyframeSampler": "MagicVideo Keyframe Sampler",
    "MagicVideoVAEEncode": "MagicVideo VAE Encode",
    "MagicVideoVAEDecode": "MagicVideo VAE Decode",
}
