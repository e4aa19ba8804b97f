"""Thin ComfyUI nodes: host types in, library calls, host types out.

Each ``nodes/*.py`` module defines ``NODE_CLASS_MAPPINGS`` and
``NODE_DISPLAY_NAME_MAPPINGS``; they are merged here. Node ids share the prefix
``MagicVideo``; categories live under ``MagicVideo/``.
"""

import importlib

_MODULES = ["video", "model", "text"]

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

for _name in _MODULES:
    try:
        _mod = importlib.import_module(f".{_name}", __name__)
    except ModuleNotFoundError as exc:
        # a node module not written yet; any other missing module is a real error
        if exc.name != f"{__name__}.{_name}":
            raise
        continue
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)
