"""Helpers for tests on tiny models."""

import torch


def awake(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights where a model starts at zero (zero-initialised output projections, the
    image-prior channels), so every layer changes the output; returns the module in eval mode."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return module.eval()
