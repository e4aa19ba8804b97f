"""models/pipeline.py: text -> frames on a tiny random full model saved and loaded as a file."""

from __future__ import annotations

import pytest
import torch

from magicvideo.models import checkpoint, pipeline, sampling
from magicvideo.models.text import TextConfig, TextEncoder
from magicvideo.models.unet import UNetConfig, VideoUNet
from magicvideo.models.vae import VAEConfig, VideoVAE

WIDTH = 16
SMALL = dict(frames=3, width=16, height=24, steps=2)


def _awake(module):
    """Random weights where the model starts at zero, so every layer changes the output."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    unet = _awake(VideoUNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                                       num_heads=2, context_dim=WIDTH, max_frames=8)))
    vae = _awake(VideoVAE(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_head_dim=16)))
    text = _awake(TextEncoder(TextConfig(width=WIDTH, layers=1, heads=2)))
    full = checkpoint.save_model(root / "tiny_text.safetensors", unet=unet, vae=vae, text_encoder=text)
    no_text = checkpoint.save_model(root / "tiny.safetensors", unet=unet, vae=vae)
    return full, no_text


@pytest.fixture
def bundle(files):
    return checkpoint.load_model(files[0])


def test_frames_in_the_host_layout_and_seeded(bundle):
    a = pipeline.text_to_video(bundle, "a red circle moving to the left", seed=3, **SMALL)
    assert a.shape == (3, 24, 16, 3) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, pipeline.text_to_video(bundle, "a red circle moving to the left", seed=3, **SMALL))
    assert not torch.equal(a, pipeline.text_to_video(bundle, "a red circle moving to the left", seed=4, **SMALL))
    assert not torch.equal(a, pipeline.text_to_video(bundle, "a blue square moving up", seed=3, **SMALL))


def test_same_as_the_library_calls_it_glues(bundle):
    """text encoder -> sampling.sample from zero latents -> VideoVAE.decode -> [F, H, W, 3] in 0..1."""
    kwargs = dict(steps=2, cfg=3.0, sampler="dpmpp_2m", scheduler="karras", seed=7, fps=6.0)
    made = []
    for extra in ({}, {"pag": 1.5, "pag_parts": ("self", "temporal")}):
        frames = pipeline.text_to_video(bundle, "a green triangle growing", negative="a red square", frames=4,
                                        width=16, height=16, chunk_size=3, **kwargs, **extra)
        with torch.no_grad():
            positive, _ = bundle.text_encoder.encode(["a green triangle growing"])
            negative, _ = bundle.text_encoder.encode(["a red square"])
            latents = sampling.sample(bundle.unet, torch.zeros(4, 4, 2, 2), positive, negative, num_frames=4,
                                      **kwargs, **extra)
            images = bundle.vae.decode(latents, num_frames=4, chunk_size=3)
        assert torch.equal(frames, ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1))
        made.append(frames)
    assert not torch.equal(*made)  # pag reached the sampler


def test_conditioning_to_video_is_the_lower_level(bundle):
    positive = pipeline.encode_prompt(bundle.text_encoder, "a red circle moving to the left")
    negative = pipeline.encode_prompt(bundle.text_encoder, "")
    assert positive.shape == (1, 77, WIDTH)
    assert torch.equal(pipeline.conditioning_to_video(bundle, positive, negative, seed=1, **SMALL),
                       pipeline.text_to_video(bundle, "a red circle moving to the left", seed=1, **SMALL))
    # cfg 1 runs the positive alone: no negative needed, and a given one changes nothing
    one = pipeline.conditioning_to_video(bundle, positive, None, cfg=1.0, seed=1, **SMALL)
    assert torch.equal(one, pipeline.conditioning_to_video(bundle, positive, torch.randn(1, 77, WIDTH), cfg=1.0,
                                                           seed=1, **SMALL))
    assert torch.equal(one, pipeline.text_to_video(bundle, "a red circle moving to the left", negative="blue", cfg=1.0,
                                                   seed=1, **SMALL))


def test_unknown_words(bundle):
    with pytest.raises(pipeline.UnknownWordsError, match="does not know 1 word.*'circel' \\(did you mean circle") as info:
        pipeline.text_to_video(bundle, "a red circel", **SMALL)
    assert info.value.words == ["circel"] and isinstance(info.value, ValueError)
    with pytest.raises(pipeline.UnknownWordsError, match="'zebra'"):
        pipeline.text_to_video(bundle, "a red circle", negative="zebra", **SMALL)
    left_out = pipeline.text_to_video(bundle, "a red circel", ignore_unknown_words=True, **SMALL)
    assert torch.equal(left_out, pipeline.text_to_video(bundle, "a red", **SMALL))


def test_request_errors(bundle, files):
    with pytest.raises(pipeline.RequestError, match="multiples of 8.*got 20x24"):
        pipeline.text_to_video(bundle, "a red circle", **{**SMALL, "width": 20})
    with pytest.raises(pipeline.RequestError, match="frames must be at least 1"):
        pipeline.text_to_video(bundle, "a red circle", **{**SMALL, "frames": 0})
    with pytest.raises(pipeline.RequestError, match="needs a negative"):
        pipeline.conditioning_to_video(bundle, torch.zeros(1, 5, WIDTH), None, cfg=2.0, **SMALL)
    with pytest.raises(pipeline.RequestError, match="no built-in text encoder"):
        pipeline.text_to_video(checkpoint.load_model(files[1]), "a red circle", **SMALL)
    with pytest.raises(pipeline.RequestError, match="has no VAE"):
        pipeline.text_to_video(checkpoint.MagicVideoBundle(bundle.unet, None, bundle.text_encoder), "a red circle")
    with pytest.raises(pipeline.RequestError, match=r"perturbed parts must be some of .*got \['temporal', 'ff'\]"):
        pipeline.text_to_video(bundle, "a red circle", pag=1.0, pag_parts=("temporal", "ff"), **SMALL)
    with pytest.raises(ValueError, match="width 16.*got 768"):  # the library's own errors pass through
        pipeline.conditioning_to_video(bundle, torch.zeros(1, 77, 768), torch.zeros(1, 77, 768), **SMALL)


def test_video_to_video(bundle):
    """init_video + denoise: encode, noise to the strength, run the last steps; 0 is a round trip."""
    video = torch.rand(SMALL["frames"], SMALL["height"], SMALL["width"], 3)
    frames = pipeline.text_to_video(bundle, "a red circle", init_video=video, denoise=0.5, seed=2, **SMALL)
    with torch.no_grad():
        positive, _ = bundle.text_encoder.encode(["a red circle"])
        negative, _ = bundle.text_encoder.encode([""])
        start = bundle.vae.encode(video.permute(0, 3, 1, 2) * 2 - 1)
        latents = sampling.sample(bundle.unet, start, positive, negative, num_frames=SMALL["frames"],
                                  steps=SMALL["steps"], cfg=SMALL.get("cfg", 7.5), seed=2, fps=8.0, denoise=0.5)
        images = bundle.vae.decode(latents, num_frames=SMALL["frames"])
    assert torch.allclose(frames, ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1), atol=1e-6)
    assert not torch.equal(frames, pipeline.text_to_video(bundle, "a red circle", seed=2, **SMALL))
    with pytest.raises(pipeline.RequestError, match=r"init_video must be \[3, 24, 16, 3\].*got \(3, 16, 16, 3\)"):
        pipeline.text_to_video(bundle, "a red circle", init_video=torch.rand(3, 16, 16, 3), denoise=0.5, **SMALL)


def test_image_to_video_from_first_frames(bundle):
    """first_frames on an image-first model: encoded, kept as the first frames, the rest sampled."""
    import copy

    frame = torch.rand(1, SMALL["height"], SMALL["width"], 3)
    with pytest.raises(pipeline.RequestError, match="needs a model trained image-first"):
        pipeline.text_to_video(bundle, "a red circle", first_frames=frame, **SMALL)
    i2v = copy.copy(bundle)
    i2v.unet = copy.deepcopy(bundle.unet)
    i2v.unet.config.image_first = True
    frames = pipeline.text_to_video(i2v, "a red circle", first_frames=frame, seed=4, **SMALL)
    with torch.no_grad():
        positive, _ = bundle.text_encoder.encode(["a red circle"])
        negative, _ = bundle.text_encoder.encode([""])
        start = torch.zeros(SMALL["frames"], 4, 3, 2)
        start[0] = bundle.vae.encode(frame.permute(0, 3, 1, 2) * 2 - 1)[0]
        latents = sampling.sample(i2v.unet, start, positive, negative, num_frames=SMALL["frames"], steps=SMALL["steps"],
                                  cfg=7.5, seed=4, fps=8.0, given_frames=1)
        assert torch.equal(latents[0], start[0])
        images = bundle.vae.decode(latents, num_frames=SMALL["frames"])
    assert torch.allclose(frames, ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1), atol=1e-6)
    with pytest.raises(pipeline.RequestError, match="3 reference frames given for a 3-frame video"):
        pipeline.text_to_video(i2v, "a red circle", first_frames=frame.expand(3, -1, -1, -1), **SMALL)
    with pytest.raises(pipeline.RequestError, match=r"first_frames must be \[k, 24, 16, 3\]"):
        pipeline.text_to_video(i2v, "a red circle", first_frames=torch.rand(1, 16, 16, 3), **SMALL)


def test_callback_and_timings(bundle):
    calls, timings = [], {}
    pipeline.text_to_video(bundle, "a red circle", callback=lambda step, total, x0: calls.append((step, total, x0.shape)),
                           timings=timings, **{**SMALL, "steps": 3})
    assert calls == [(1, 3, (3, 4, 3, 2)), (2, 3, (3, 4, 3, 2)), (3, 3, (3, 4, 3, 2))]
    assert set(timings) == {"text_encode", "sampling", "vae_decode", "total"}
    assert all(v > 0 for v in timings.values())
    assert timings["total"] >= timings["text_encode"] + timings["sampling"] + timings["vae_decode"]

    class Stop(Exception):
        pass

    def stop(step, total, x0):
        raise Stop

    with pytest.raises(Stop):  # a callback stops sampling (the host's Cancel)
        pipeline.text_to_video(bundle, "a red circle", callback=stop, **SMALL)


def test_dtype_moves_the_modules(files):
    bundle = checkpoint.load_model(files[0])
    frames = pipeline.text_to_video(bundle, "a red circle", dtype=torch.bfloat16, **SMALL)
    assert frames.dtype == torch.float32 and frames.shape == (3, 24, 16, 3) and 0 <= frames.min() <= frames.max() <= 1
    assert next(bundle.unet.parameters()).dtype == torch.bfloat16 and bundle.vae.dtype == torch.bfloat16
    assert next(bundle.text_encoder.parameters()).dtype == torch.float32  # small, kept as loaded
    unet, vae, _ = pipeline.prepare(bundle, dtype=torch.float16)
    assert next(unet.parameters()).dtype == torch.float16 and vae.dtype == torch.float32  # SD's VAE overflows in fp16
