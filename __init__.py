"""MagicVideo for ComfyUI.

ComfyUI imports this folder from ``custom_nodes/`` (under any folder name) and reads
``NODE_CLASS_MAPPINGS``. ``pip install -e .`` exposes the same tree as the package
``magicvideo`` for the CLI, training and tests; outside ComfyUI there is no host to
register nodes with, so the node modules (which import host modules) are not loaded.
"""

try:
    import folder_paths  # noqa: F401  (exists only inside a running ComfyUI)
except ModuleNotFoundError as exc:  # imported as the plain `magicvideo` package
    if exc.name != "folder_paths":
        raise
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# The host serves these files to its web UI (video previews, upload, workflow from a dropped video).
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
