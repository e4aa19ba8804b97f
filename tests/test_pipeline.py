"""models/pipeline.py, the one generation path: text -> frames on a tiny random full model saved
and loaded as a file, checked against the library calls it glues."""

from __future__ import annotations

import pytest
import torch

from magicvideo.models import checkpoint, guidance, pipeline, sampling, world
from magicvideo.models.conditioning import GivenFrames
from magicvideo.models.text import TextConfig, TextEncoder
from magicvideo.models.unet import UNetConfig, VideoUNet
from magicvideo.models.vae import VAEConfig, VideoVAE
from tiny_models import awake

WIDTH = 16
SMALL = dict(frames=3, width=16, height=24)
PLAIN = sampling.PRESETS["plain"].replace(steps=2)  # cfg on every step, nothing steered


def opts(**changes) -> sampling.SamplingOptions:
    return PLAIN.replace(**changes)


def _sample(unet, latents, positive, negative, *, num_frames, options, given=None):
    """The sampler loop with the pieces the pipeline should build: UNet + cfg."""
    base = guidance.VideoDenoiser(unet, positive, num_frames=num_frames, fps=options.fps)
    denoiser = guidance.ClassifierFreeGuidance(base, negative, options.cfg, options.guided)
    mask = None if given is None else given.mask(latents.shape[0] // num_frames, num_frames)
    start = latents if given is None else given.place(latents, num_frames)
    return sampling.sample(denoiser, start, num_frames=num_frames, options=options,
                           prediction_type=unet.config.prediction_type, given=mask)



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    unet = awake(VideoUNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                                       num_heads=2, context_dim=WIDTH, max_frames=8)))
    vae = awake(VideoVAE(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_head_dim=16)))
    text = awake(TextEncoder(TextConfig(**world.text_fields(), width=WIDTH, layers=1, heads=2)))
    full = checkpoint.save_model(root / "tiny_text.safetensors", unet=unet, vae=vae, text_encoder=text)
    no_text = checkpoint.save_model(root / "tiny.safetensors", unet=unet, vae=vae)
    return full, no_text


@pytest.fixture
def bundle(files):
    return checkpoint.load_model(files[0])


def test_frames_in_the_host_layout_and_seeded(bundle):
    a = pipeline.text_to_video(bundle, "a red circle moving to the left", options=opts(seed=3), **SMALL)
    assert a.shape == (3, 24, 16, 3) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, pipeline.text_to_video(bundle, "a red circle moving to the left", options=opts(seed=3), **SMALL))
    assert not torch.equal(a, pipeline.text_to_video(bundle, "a red circle moving to the left", options=opts(seed=4),
                                                     **SMALL))
    assert not torch.equal(a, pipeline.text_to_video(bundle, "a blue square moving up", options=opts(seed=3), **SMALL))


def test_same_as_the_library_calls_it_glues(bundle):
    """text encoder -> VideoUNet + cfg through sampling.sample from zero latents -> VideoVAE.decode ->
    [F, H, W, 3] in 0..1."""
    options = opts(cfg=3.0, sampler="dpmpp_2m", scheduler="karras", seed=7, fps=6.0)
    frames = pipeline.text_to_video(bundle, "a green triangle growing", negative="a red square", frames=4,
                                    width=16, height=16, chunk_size=3, options=options)
    with torch.no_grad():
        positive, _ = bundle.text_encoder.encode(["a green triangle growing"])
        negative, _ = bundle.text_encoder.encode(["a red square"])
        latents = _sample(bundle.unet, torch.zeros(4, 4, 2, 2), positive, negative, num_frames=4, options=options)
        images = bundle.vae.decode(latents, num_frames=4, chunk_size=3)
    assert torch.equal(frames, ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1))


def test_conditioning_to_video_is_the_lower_level(bundle):
    positive = pipeline.encode_prompt(bundle.text_encoder, "a red circle moving to the left")
    negative = pipeline.encode_prompt(bundle.text_encoder, "")
    assert positive.shape == (1, 77, WIDTH)
    assert torch.equal(pipeline.conditioning_to_video(bundle, positive, negative, options=opts(seed=1), **SMALL),
                       pipeline.text_to_video(bundle, "a red circle moving to the left", options=opts(seed=1), **SMALL))
    # cfg 1 runs the positive alone: no negative needed, and a given one changes nothing
    one = pipeline.conditioning_to_video(bundle, positive, None, options=opts(cfg=1.0, seed=1), **SMALL)
    assert torch.equal(one, pipeline.conditioning_to_video(bundle, positive, torch.randn(1, 77, WIDTH),
                                                           options=opts(cfg=1.0, seed=1), **SMALL))
    assert torch.equal(one, pipeline.text_to_video(bundle, "a red circle moving to the left", negative="blue",
                                                   options=opts(cfg=1.0, seed=1), **SMALL))


def test_unknown_words(bundle):
    with pytest.raises(pipeline.UnknownWordsError, match="does not know 1 word.*'circel' \\(did you mean circle") as info:
        pipeline.text_to_video(bundle, "a red circel", options=PLAIN, **SMALL)
    assert info.value.words == ["circel"] and isinstance(info.value, ValueError)
    with pytest.raises(pipeline.UnknownWordsError, match="'zebra'"):
        pipeline.text_to_video(bundle, "a red circle", negative="zebra", options=PLAIN, **SMALL)
    left_out = pipeline.text_to_video(bundle, "a red circel", ignore_unknown_words=True, options=PLAIN, **SMALL)
    assert torch.equal(left_out, pipeline.text_to_video(bundle, "a red", options=PLAIN, **SMALL))


def test_request_errors(bundle, files):
    with pytest.raises(pipeline.RequestError, match="multiples of 8.*got 20x24"):
        pipeline.text_to_video(bundle, "a red circle", options=PLAIN, **{**SMALL, "width": 20})
    with pytest.raises(pipeline.RequestError, match="frames must be at least 1"):
        pipeline.text_to_video(bundle, "a red circle", options=PLAIN, **{**SMALL, "frames": 0})
    with pytest.raises(pipeline.RequestError, match="needs a negative"):
        pipeline.conditioning_to_video(bundle, torch.zeros(1, 5, WIDTH), None, options=opts(cfg=2.0), **SMALL)
    with pytest.raises(pipeline.RequestError, match="no built-in text encoder"):
        pipeline.text_to_video(checkpoint.load_model(files[1]), "a red circle", options=PLAIN, **SMALL)
    with pytest.raises(pipeline.RequestError, match="has no VAE"):
        pipeline.text_to_video(checkpoint.MagicVideoBundle(bundle.unet, None, bundle.text_encoder), "a red circle")
    with pytest.raises(pipeline.RequestError, match="width 16.*got 768"):
        pipeline.conditioning_to_video(bundle, torch.zeros(1, 77, 768), torch.zeros(1, 77, 768), options=PLAIN, **SMALL)
    with pytest.raises(pipeline.RequestError, match="cfg_start <= cfg_end"):
        pipeline.text_to_video(bundle, "a red circle", options=opts(cfg_start=0.9, cfg_end=0.1), **SMALL)
    # motion guidance reads the prompt with the file's lexicon and needs 8x8 attention grids
    with pytest.raises(pipeline.RequestError, match="motion guidance needs cross-attention blocks of at least 8x8"):
        pipeline.text_to_video(bundle, "a red circle moving to the left", options=opts(motion_guidance=0.2), **SMALL)
    pipeline.text_to_video(bundle, "a red circle", options=opts(motion_guidance=0.2), **SMALL)  # no motion asked: fine
    with pytest.raises(pipeline.RequestError, match="dtype must be one of"):
        pipeline.text_to_video(bundle, "a red circle", dtype="int8", options=PLAIN, **SMALL)


def test_motion_guidance_steers_the_objects_its_lexicon_reads(bundle):
    """The main preset steers: the latent moves (so the video differs from the unsteered one) on the
    early steps only, and a request read by the text encoder reaches MotionGuidance."""
    big = dict(frames=3, width=128, height=128)  # 8x8 cells in the attention blocks
    prompt = "a red circle moving to the left"
    steered = pipeline.text_to_video(bundle, prompt, options=opts(motion_guidance=0.5, motion_guidance_until=0.5), **big)
    plain = pipeline.text_to_video(bundle, prompt, options=PLAIN, **big)
    assert not torch.equal(steered, plain)
    request = bundle.text_encoder.motion_request(prompt)
    # <bos> a red circle moving to the left: the words of the object, less the function word "the"
    assert [o["tokens"] for o in request["objects"]] == [[2, 3, 4, 5, 7]]
    assert request["objects"][0]["path"]["dx"] == pytest.approx(-world.LINEAR_TRAVEL["slow"])
    # the same prompt's request given by hand is the same run
    positive = pipeline.encode_prompt(bundle.text_encoder, prompt)
    negative = pipeline.encode_prompt(bundle.text_encoder, "")
    again = pipeline.conditioning_to_video(bundle, positive, negative, motion=request,
                                           options=opts(motion_guidance=0.5, motion_guidance_until=0.5), **big)
    assert torch.equal(again, steered)


def test_video_to_video(bundle):
    """init_video + denoise: encode, noise to the strength, run the last steps; 0 is a round trip."""
    video = torch.rand(SMALL["frames"], SMALL["height"], SMALL["width"], 3)
    options = opts(denoise=0.5, seed=2)
    frames = pipeline.text_to_video(bundle, "a red circle", init_video=video, options=options, **SMALL)
    with torch.no_grad():
        positive, _ = bundle.text_encoder.encode(["a red circle"])
        negative, _ = bundle.text_encoder.encode([""])
        start = bundle.vae.encode(video.permute(0, 3, 1, 2) * 2 - 1)
        latents = _sample(bundle.unet, start, positive, negative, num_frames=SMALL["frames"], options=options)
        images = bundle.vae.decode(latents, num_frames=SMALL["frames"])
    assert torch.allclose(frames, ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1), atol=1e-6)
    assert not torch.equal(frames, pipeline.text_to_video(bundle, "a red circle", options=opts(seed=2), **SMALL))
    with pytest.raises(pipeline.RequestError, match=r"init_video must be \[3, 24, 16, 3\].*got \(3, 16, 16, 3\)"):
        pipeline.text_to_video(bundle, "a red circle", init_video=torch.rand(3, 16, 16, 3), options=options, **SMALL)


@pytest.mark.parametrize("indices", [None, (2,)])
def test_image_to_video_from_given_images(bundle, indices):
    """given_images on an image-first model: encoded, kept at their frames (first by default, or
    any index), the rest sampled; a model that cannot take given frames says so."""
    import copy

    frame = torch.rand(1, SMALL["height"], SMALL["width"], 3)
    with pytest.raises(pipeline.RequestError, match="cannot take them"):
        pipeline.text_to_video(bundle, "a red circle", given_images=frame, options=PLAIN, **SMALL)
    i2v = copy.copy(bundle)
    i2v.unet = copy.deepcopy(bundle.unet)
    i2v.unet.config.image_first = True
    options = opts(seed=4)
    frames = pipeline.text_to_video(i2v, "a red circle", given_images=frame, given_indices=indices, options=options,
                                    **SMALL)
    with torch.no_grad():
        positive, _ = bundle.text_encoder.encode(["a red circle"])
        negative, _ = bundle.text_encoder.encode([""])
        given = GivenFrames(bundle.vae.encode(frame.permute(0, 3, 1, 2) * 2 - 1), indices or (0,))
        latents = _sample(i2v.unet, torch.zeros(SMALL["frames"], 4, 3, 2), positive, negative,
                          num_frames=SMALL["frames"], options=options, given=given)
        assert torch.equal(latents[given.indices[0]], given.latents[0])
        images = bundle.vae.decode(latents, num_frames=SMALL["frames"])
    assert torch.allclose(frames, ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1), atol=1e-6)
    with pytest.raises(pipeline.RequestError, match="all 3 frames are given"):
        pipeline.text_to_video(i2v, "a red circle", given_images=frame.expand(3, -1, -1, -1), options=PLAIN, **SMALL)
    with pytest.raises(pipeline.RequestError, match=r"given images must be \[k, 24, 16, 3\]"):
        pipeline.text_to_video(i2v, "a red circle", given_images=torch.rand(1, 16, 16, 3), options=PLAIN, **SMALL)


def test_callback_and_timings(bundle):
    calls, timings = [], {}
    pipeline.text_to_video(bundle, "a red circle", callback=lambda step, total, x0: calls.append((step, total, x0.shape)),
                           timings=timings, options=opts(steps=3), **SMALL)
    assert calls == [(1, 3, (3, 4, 3, 2)), (2, 3, (3, 4, 3, 2)), (3, 3, (3, 4, 3, 2))]
    assert set(timings) == {"text_encode", "sampling", "vae_decode", "total"}
    assert all(v > 0 for v in timings.values())
    assert timings["total"] >= timings["text_encode"] + timings["sampling"] + timings["vae_decode"]

    class Stop(Exception):
        pass

    def stop(step, total, x0):
        raise Stop

    with pytest.raises(Stop):  # a callback stops sampling (the host's Cancel)
        pipeline.text_to_video(bundle, "a red circle", callback=stop, options=PLAIN, **SMALL)


def test_dtype_moves_the_modules(files):
    bundle = checkpoint.load_model(files[0])
    frames = pipeline.text_to_video(bundle, "a red circle", dtype="bf16", options=PLAIN, **SMALL)
    assert frames.dtype == torch.float32 and frames.shape == (3, 24, 16, 3) and 0 <= frames.min() <= frames.max() <= 1
    assert next(bundle.unet.parameters()).dtype == torch.bfloat16 and bundle.vae.dtype == torch.bfloat16
    assert next(bundle.text_encoder.parameters()).dtype == torch.float32  # small, kept as loaded
    unet, vae, _ = pipeline.prepare(bundle, dtype="fp16")
    assert next(unet.parameters()).dtype == torch.float16 and vae.dtype == torch.float32  # SD's VAE overflows in fp16
