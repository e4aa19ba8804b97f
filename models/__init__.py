"""The MagicVideo library: pure torch + einops (+ diffusers, safetensors, av).

Never imports the host (comfy, folder_paths): everything here runs from the CLI,
training and tests without ComfyUI.
"""
