"""Thin ComfyUI nodes: host types in, library calls, host types out.

Each ``nodes/*.py`` module defines ``NODE_CLASS_MAPPINGS`` and
``NODE_DISPLAY_NAME_MAPPINGS``; they are merged here. Node ids share the prefix
``MagicVideo``; categories live under ``MagicVideo/``.
"""

from . import conditioning, interpolate, long_video, model, text, upscale, video

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

for _module in (video, model, text, conditioning, long_video, interpolate, upscale):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
