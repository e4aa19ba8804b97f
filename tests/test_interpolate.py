"""models/interpolate.py: gaps planned once each, keyframes kept exactly, chunking that does not
change the frames, and the errors, on a tiny random model with image-prior channels."""

from __future__ import annotations

import pytest
import torch

from magicvideo.models import interpolate
from magicvideo.models.unet import UNetConfig, VideoUNet

FAST = interpolate.PRESET.replace(steps=2, denoise=1.0)


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


def test_denoise_starts_from_the_latent_blend(unet):
    """denoise < 1: the in-betweens start from the keyframes' latent blend noised to that level
    (progress counts the steps that run); 0 is the blend itself."""
    keys = torch.randn(5, 4, 4, 4)
    positive = torch.randn(1, 5, 16)
    blend = interpolate.interpolate(unet, keys, 3, positive=positive, options=FAST.replace(denoise=0.0))
    assert torch.allclose(blend, interpolate.blend_latents(keys, 3))
    steps = []
    half = interpolate.interpolate(unet, keys, 3, positive=positive, options=FAST.replace(steps=4, denoise=0.5),
                                   callback=lambda s, total, x0: steps.append((s, total)))
    assert steps[-1] == (2, 2) and torch.equal(half[::3], keys)
    between = torch.tensor([i % 3 != 0 for i in range(len(half))])
    from_noise = interpolate.interpolate(unet, keys, 3, positive=positive, options=FAST.replace(steps=4))
    assert 0 < (half - blend)[between].abs().mean() < (from_noise - blend)[between].abs().mean()


def test_latent_blend_baseline():
    keys = torch.stack([torch.zeros(4, 2, 2), torch.ones(4, 2, 2) * 4])
    out = interpolate.blend_latents(keys, 4)
    assert out.shape == (5, 4, 2, 2) and out[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]


def test_the_generation_path_interpolates(unet):
    """conditioning_to_video(interpolate=k): keyframes, then k frames per gap, decoded."""
    from magicvideo.models import checkpoint, pipeline
    from magicvideo.models.vae import VAEConfig, VideoVAE

    vae = VideoVAE(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_head_dim=16)).eval()
    bundle = checkpoint.MagicVideoBundle(unet, vae, None)
    positive = torch.randn(1, 5, 16)
    options = FAST.replace(fps=8.0)
    keys = pipeline.conditioning_to_video(bundle, positive, frames=4, width=32, height=32, options=options,
                                          latents_only=True)
    timings = {}
    frames = pipeline.conditioning_to_video(bundle, positive, frames=4, width=32, height=32, options=options,
                                            interpolate=3, latents_only=True, timings=timings)
    assert frames.shape == (10, 4, 4, 4) and torch.equal(frames[::3], keys)
    assert set(timings) == {"sampling", "interpolation"}


@pytest.mark.host
def test_the_node_runs_in_the_host(comfy):
    """Keyframe Sampler -> Frame Interpolator -> VAE Decode -> Save Video on the bundled default."""
    from magicvideo.models import video_io

    loader = {"class_type": "MagicVideoModelLoader", "inputs": {"model_name": "magicvideo_default.safetensors",
              "sd15_checkpoint": "none", "motion_module": "none", "dtype": "auto"}}
    prompt = {
        "1": loader,
        "2": {"class_type": "MagicVideoTextEncode", "inputs": {"text_encoder": ["1", 2], "text": "a red circle moving up",
                                                              "ignore_unknown_words": False}},
        "3": {"class_type": "MagicVideoTextEncode", "inputs": {"text_encoder": ["1", 2], "text": "",
                                                              "ignore_unknown_words": False}},
        "4": {"class_type": "MagicVideoEmptyLatent", "inputs": {"width": 64, "height": 64, "frames": 8, "batch": 1}},
        "5": {"class_type": "MagicVideoKeyframeSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent": ["4", 0], "seed": 1, "steps": 4,
            "cfg": 6.0, "sampler": "euler", "scheduler": "normal", "fps": 8.0, "denoise": 1.0, "frames": 0}},
        "6": {"class_type": "MagicVideoFrameInterpolator", "inputs": {
            "model": ["1", 0], "samples": ["5", 0], "positive": ["2", 0], "factor": 3, "steps": 2, "seed": 1, "fps": 8.0}},
        "7": {"class_type": "MagicVideoVAEDecode", "inputs": {"vae": ["1", 1], "samples": ["6", 0], "frames": 0,
                                                             "chunk_size": 8}},
        "8": {"class_type": "MagicVideoSaveVideo", "inputs": {"images": ["7", 0], "fps": ["6", 1], "format": "mp4",
                                                             "crf": 19, "odd_size": "pad", "filename_prefix": "interp"}},
    }
    [info] = comfy.output_files(comfy.run(prompt, timeout=600))
    video = video_io.read_video(comfy.output_path(info))
    assert video.frames.shape == (22, 64, 64, 3) and video.fps == pytest.approx(24.0)
    prompt["4"]["inputs"]["frames"] = 1
    assert "at least 2 keyframes" in comfy.run_expect_error(prompt)
