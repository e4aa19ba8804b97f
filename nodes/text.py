"""Text Encode: a prompt through the bundled model's built-in text encoder -> CONDITIONING.

Thin: the tokenizer and transformer live in models/text.py. The output has the layout of
core CLIPTextEncode's (``[[tensor [1, 77, width], {}]]``), so the keyframe sampler takes
either.
"""

from __future__ import annotations

from ..models.guidance import MOTION_KEY
from ..models.pipeline import UnknownWordsError, encode_prompt
from ..models.text import TextEncoder

CATEGORY = "MagicVideo/conditioning"


class MagicVideoTextEncode:
    DESCRIPTION = (
        "Encode a prompt with the built-in text encoder of a MagicVideo model file (the bundled "
        "default knows the words of its world: colours, shapes, motions, speeds, backgrounds). "
        "Unknown words stop the graph with a list of them, unless ignore_unknown_words is on. "
        "For SD1.5-based models use core CLIP Text Encode instead."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The encoded prompt, [1, 77, width], for the MagicVideo keyframe sampler (with its words, "
                       "which the sampler's motion guidance reads).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": ("MAGICVIDEO_TEXT", {"tooltip": "The text encoder output of Load MagicVideo Model."}),
                "text": ("STRING", {
                    "multiline": True,
                    "dynamicPrompts": True,
                    "default": "a red ball drifting to the left slowly",
                    "tooltip": "The prompt, e.g. 'a red ball drifting to the left slowly'. Empty is fine (unconditional).",
                }),
            },
            "optional": {
                "ignore_unknown_words": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Off: words the encoder does not know stop the graph with an error naming them. "
                               "On: they are left out with a warning in the console.",
                }),
            },
        }

    def encode(self, text_encoder, text, ignore_unknown_words=False):
        encoder = text_encoder if isinstance(text_encoder, TextEncoder) else text_encoder.encoder
        try:
            context = encode_prompt(encoder, text, ignore_unknown_words=ignore_unknown_words)
        except UnknownWordsError as e:
            raise ValueError(f"MagicVideo Text Encode: {e} Turn on ignore_unknown_words to leave them out.") from None
        # what the prompt asks of each object, read with the file's lexicon: the sampler's motion guidance uses it
        motion = encoder.motion_request(text)
        return ([[context, {} if motion is None else {MOTION_KEY: motion}]],)


NODE_CLASS_MAPPINGS = {"MagicVideoTextEncode": MagicVideoTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"MagicVideoTextEncode": "MagicVideo Text Encode"}
