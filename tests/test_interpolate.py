"""models/interpolate.py: gaps planned once each, keyframes kept exactly, chunking that does not
change the frames, and the errors, on a tiny random model with image-prior channels."""

from __future__ import annotations

import pytest
import torch

from magicvideo.models import interpolate
from magicvideo.models.unet import UNetConfig, VideoUNet

FAST = interpolate.PRESET.replace(steps=2)


def _unet(**extra):
    torch.manual_seed(0)
    unet = VideoUNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                                num_heads=2, context_dim=16, max_frames=8, **extra))
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return unet.eval()


@pytest.fixture(scope="module")
def unet():
    return _unet(cond_channels=5)


@pytest.mark.parametrize("keyframes", [2, 3, 7, 16, 480])
@pytest.mark.parametrize("factor, per_window", [(2, 4), (3, 3), (4, 2), (7, 2)])
def test_every_gap_once(keyframes, factor, per_window):
    windows = interpolate.plan_gaps(keyframes, factor, 8)
    gaps = [g for start, count in windows for g in range(start, start + count - 1)]
    assert gaps == list(range(keyframes - 1))
    assert all(2 <= count <= per_window and (count - 1) * factor + 1 <= 8 for _, count in windows)


@pytest.mark.parametrize("args, message", [((1, 2, 8), "at least 2 keyframes"), ((4, 1, 8), "at least 2"),
                                           ((4, 8, 8), "at most 7")])
def test_plan_errors(args, message):
    with pytest.raises(ValueError, match=message):
        interpolate.plan_gaps(*args)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_keyframes_kept_and_chunks_change_nothing(unet, factor):
    keys = torch.randn(6, 4, 4, 4)
    positive = torch.randn(1, 5, 16)
    steps = []
    one = interpolate.interpolate(unet, keys, factor, positive=positive, options=FAST, batch=8,
                                  callback=lambda s, total, x0: steps.append((s, total)))
    assert one.shape == (5 * factor + 1, 4, 4, 4)
    assert torch.equal(one[::factor], keys)
    between = torch.tensor([i % factor != 0 for i in range(len(one))])
    assert torch.isfinite(one).all() and one[between].abs().mean() > 0.1
    chunked = interpolate.interpolate(unet, keys, factor, positive=positive, options=FAST, batch=1)
    assert torch.allclose(one, chunked, atol=1e-5)
    assert steps[-1][0] == steps[-1][1]
    other_seed = interpolate.interpolate(unet, keys, factor, positive=positive, options=FAST.replace(seed=1))
    assert not torch.allclose(one[between], other_seed[between])


def test_errors_before_sampling(unet):
    positive = torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match="at least 2 keyframes"):
        interpolate.interpolate(unet, torch.randn(1, 4, 4, 4), 2, positive=positive, options=FAST)
    with pytest.raises(ValueError, match=r"latents \[frames, 4, h, w\]"):
        interpolate.interpolate(unet, torch.randn(4, 3, 4, 4), 2, positive=positive, options=FAST)
    with pytest.raises(ValueError, match="not trained to take given frames"):
        interpolate.interpolate(_unet(), torch.randn(4, 4, 4, 4), 2, positive=positive, options=FAST)


def test_latent_blend_baseline():
    keys = torch.stack([torch.zeros(4, 2, 2), torch.ones(4, 2, 2) * 4])
    out = interpolate.blend_latents(keys, 4)
    assert out.shape == (5, 4, 2, 2) and out[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
