"""Given frames: pictures a video must contain (image-to-video, continuation, interpolation).

Thin: sizing, encoding and the frame mask live in models/conditioning.py and models/pipeline.py.
The node's output travels to the Keyframe Sampler's ``given_frames`` input.
"""

from __future__ import annotations

from ..models import conditioning, pipeline
from ..models.conditioning import GivenFrames

CATEGORY = "MagicVideo/conditioning"


def _num_frames(latent: dict) -> int:
    return int(latent.get("num_frames") or latent["samples"].shape[0])


class GivenFramesNode:
    DESCRIPTION = (
        "Pictures the video must contain at chosen frames: any IMAGE (Load Image, another node's output, a frame of "
        "a loaded video) is fitted to the video's size, encoded with the VideoVAE and handed to the Keyframe "
        "Sampler, which keeps it and makes the other frames go with it. Frame 0 is image-to-video; the first few "
        "frames continue a clip; first and last frames ask for what happens between. Needs a model trained to take "
        "given frames (the sampler says so otherwise). Chain two of these to give frames from two pictures."
    )
    CATEGORY = CATEGORY
    FUNCTION = "give"
    RETURN_TYPES = ("MAGICVIDEO_GIVEN",)
    RETURN_NAMES = ("given_frames",)
    OUTPUT_TOOLTIPS = ("The given frames, for the Keyframe Sampler's given_frames input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("MAGICVIDEO_VAE", {"tooltip": "The VideoVAE from MagicVideo Model Loader."}),
                "images": ("IMAGE", {"tooltip": "One picture per index below (frames [k, H, W, 3])."}),
                "latent": ("LATENT", {"tooltip": "The video latent the sampler will fill (Empty Video Latent): its "
                                                 "size and frame count decide where the pictures go."}),
                "indices": ("STRING", {"default": "0",
                            "tooltip": "Frame index of each picture, separated by commas: 0 = first frame, -1 = "
                                       "last (e.g. '0, -1' for two pictures)."}),
                "resize": (list(conditioning.FIT_MODES), {"default": "crop",
                           "tooltip": "crop: scale to cover the video's size and cut out the middle; stretch: scale "
                                      "to it; off: the pictures must already have the video's size."}),
            },
            "optional": {
                "given_frames": ("MAGICVIDEO_GIVEN", {"tooltip": "Frames given by another Given Frames node, "
                                                                 "kept alongside these."}),
            },
        }

    def give(self, vae, images, latent, indices, resize, given_frames=None):
        frames = _num_frames(latent)
        where = conditioning.parse_indices(indices, frames)
        if len(where) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} picture(s) for {len(where)} index(es) ({indices!r}); give one "
                             f"index per picture")
        h, w = latent["samples"].shape[-2:]
        down = vae.config.downscale
        fitted = conditioning.fit_images(images, w * down, h * down, resize)
        new = GivenFrames(pipeline.encode_frames(vae, fitted), where)
        if given_frames is not None:
            new = given_frames.merged(new)
        new.check(frames, tuple(latent["samples"].shape[1:]))
        return (new,)


NODE_CLASS_MAPPINGS = {"MagicVideoGivenFrames": GivenFramesNode}
NODE_DISPLAY_NAME_MAPPINGS = {"MagicVideoGivenFrames": "MagicVideo Given Frames"}
