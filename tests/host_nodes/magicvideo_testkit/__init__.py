"""Test-only nodes the host fixture loads beside the pack (never shipped, never in workflows/).

They make inputs that core nodes cannot: image lists of mixed sizes, empty batches, any fps.
"""

import math

import torch


def moving_pattern(frames: int, height: int, width: int, phase: float = 0.0) -> torch.Tensor:
    """Smooth colour gradients drifting over time, [frames, height, width, 3] in 0..1."""
    t = torch.arange(frames, dtype=torch.float32)[:, None, None] / max(frames, 1) + phase
    y = torch.linspace(0, 1, height)[None, :, None]
    x = torch.linspace(0, 1, width)[None, None, :]
    red = 0.5 + 0.4 * torch.sin(2 * math.pi * (x + t))
    green = 0.3 + 0.5 * y + 0.1 * torch.cos(2 * math.pi * t)
    blue = 0.5 + 0.3 * torch.cos(2 * math.pi * (x + y) * 0.7 + t)
    return torch.stack(torch.broadcast_tensors(red, green, blue), dim=-1).clamp(0, 1)


class Frames:
    DESCRIPTION = "Test frames: one batch per entry of sizes ('64x48,32x32'), each of count frames."
    CATEGORY = "testing/magicvideo"
    FUNCTION = "make"
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("images", "fps")
    OUTPUT_IS_LIST = (True, False)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sizes": ("STRING", {"default": "64x48"}),
            "count": ("INT", {"default": 8, "min": 0, "max": 10000}),
            "fps": ("FLOAT", {"default": 8.0, "min": -1000.0, "max": 1000.0}),
        }}

    def make(self, sizes, count, fps):
        batches = []
        for index, size in enumerate(s for s in sizes.split(",") if s.strip()):
            width, height = (int(v) for v in size.lower().split("x"))
            batches.append(moving_pattern(count, height, width, phase=index / 3))
        return (batches, fps)


NODE_CLASS_MAPPINGS = {"TestMVFrames": Frames}
NODE_DISPLAY_NAME_MAPPINGS = {"TestMVFrames": "Test frames (MagicVideo tests)"}
