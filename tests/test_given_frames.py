"""Given frames (image-to-video, continuation, first and last frames): pictures fitted to the
video's size, typed frame indices, and the Given Frames node into the Keyframe Sampler, in
process against the host's modules on tiny models."""

from __future__ import annotations

import importlib

import pytest
import torch

from magicvideo.models import conditioning
from magicvideo.models.conditioning import GivenFrames


def test_fit_images_crops_stretches_or_refuses():
    wide = torch.zeros(1, 40, 80, 3)
    wide[:, :, 20:60] = 1.0  # a white middle half, black sides
    crop = conditioning.fit_images(wide, 32, 32, "crop")
    assert crop.shape == (1, 32, 32, 3) and crop.min() > 0.9  # the middle cut out: all white
    stretch = conditioning.fit_images(wide, 32, 32, "stretch")
    assert stretch.shape == (1, 32, 32, 3) and stretch[0, :, 0].max() < 0.1  # the sides squeezed in
    assert conditioning.fit_images(wide, 80, 40, "off") is wide  # already the size: untouched
    with pytest.raises(ValueError, match="the images are 80x40 but the video is 32x32"):
        conditioning.fit_images(wide, 32, 32, "off")
    with pytest.raises(ValueError, match="resize must be one of"):
        conditioning.fit_images(wide, 32, 32, "fill")
    with pytest.raises(ValueError, match=r"images must be \[frames, height, width, 3\]"):
        conditioning.fit_images(torch.zeros(40, 80, 3), 32, 32)


def test_indices_as_typed():
    assert conditioning.parse_indices("0", 16) == (0,)
    assert conditioning.parse_indices("0, -1", 16) == (0, 15)
    assert conditioning.parse_indices(" 3;7 ", 16) == (3, 7)
    for text, message in (("first", "whole numbers"), ("", "no frame index"), ("16", "outside a 16-frame video"),
                          ("-17", "outside")):
        with pytest.raises(ValueError, match=message):
            conditioning.parse_indices(text, 16)


def test_merged_frames_keep_their_indices():
    a = GivenFrames(torch.zeros(1, 4, 2, 2), (0,))
    b = GivenFrames(torch.ones(1, 4, 2, 2), (7,))
    both = a.merged(b)
    assert both.indices == (0, 7) and torch.equal(both.latents[1], b.latents[0])
    with pytest.raises(ValueError, match="repeat"):
        a.merged(a).check(8, (4, 2, 2))
    with pytest.raises(ValueError, match="two sizes"):
        a.merged(GivenFrames(torch.ones(1, 4, 4, 4), (3,)))


@pytest.fixture(scope="module")
def nodes(host_modules):
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
    return (importlib.import_module("magicvideo.nodes.model"), importlib.import_module("magicvideo.nodes.conditioning"))


@pytest.fixture(scope="module")
def tiny():
    """A tiny VideoUNet with image-prior channels and a VideoVAE, every layer awake."""
    from magicvideo.models.pipeline import VideoModel
    from magicvideo.models.unet import UNetConfig, VideoUNet
    from magicvideo.models.vae import VAEConfig, VideoVAE

    torch.manual_seed(0)
    unet = VideoUNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                                num_heads=2, context_dim=16, max_frames=8, cond_channels=5)).eval()
    vae = VideoVAE(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_head_dim=16)).eval()
    with torch.no_grad():
        for p in list(unet.parameters()) + list(vae.parameters()):
            if not p.any():
                p.normal_(0, 0.02)
    return VideoModel(unet, vae.config.scaling_factor, vae.latent_rgb()), vae


def _cond(value=0.0):
    return [[torch.full((1, 6, 16), value), {}]]


def _sample(model_nodes, model, latent, **kw):
    args = dict(model=model, positive=_cond(0.3), negative=_cond(), latent=latent, seed=1, steps=2, cfg=4.0,
                sampler="euler", scheduler="normal", fps=8.0, denoise=1.0, frames=0, motion_guidance=0.0)
    return model_nodes.KeyframeSampler().sample(**{**args, **kw})[0]


def test_given_frames_node_into_the_sampler(nodes, tiny):
    """A picture of another size, cropped to the video's, given as the last frame: the sampled
    video holds its latents there exactly; wrong counts, indices and sizes are clear errors."""
    model_nodes, given_nodes = nodes
    model, vae = tiny
    node = given_nodes.GivenFramesNode()
    assert {"vae", "images", "latent", "indices", "resize"} <= set(node.INPUT_TYPES()["required"])
    latent = model_nodes.EmptyVideoLatent().generate(width=32, height=32, frames=4, batch=1)[0]
    picture = torch.rand(1, 48, 40, 3)
    (given,) = node.give(vae, picture, latent, "-1", "crop")
    assert given.indices == (3,) and given.latents.shape == (1, 4, 4, 4)
    out = _sample(model_nodes, model, latent, given_frames=given)
    assert torch.allclose(out["samples"][3] * model.scaling_factor, given.latents[0], atol=1e-6)
    assert not torch.allclose(out["samples"][0] * model.scaling_factor, given.latents[0], atol=1e-2)

    (first,) = node.give(vae, picture, latent, "0", "stretch")
    (both,) = node.give(vae, picture, latent, "-1", "crop", given_frames=first)
    assert both.indices == (0, 3)
    with pytest.raises(ValueError, match=r"1 picture\(s\) for 2 index"):
        node.give(vae, picture, latent, "0, 1", "crop")
    with pytest.raises(ValueError, match="outside a 4-frame video"):
        node.give(vae, picture, latent, "4", "crop")
    with pytest.raises(ValueError, match="the images are 40x48 but the video is 32x32"):
        node.give(vae, picture, latent, "0", "off")
    with pytest.raises(ValueError, match="repeat"):
        node.give(vae, picture, latent, "0", "crop", given_frames=first)
    with pytest.raises(ValueError, match="both reference and given_frames"):
        _sample(model_nodes, model, latent, given_frames=given, reference={"samples": torch.zeros(1, 4, 4, 4)})


def test_a_model_without_conditioning_refuses_given_frames(nodes, tiny):
    from magicvideo.models.pipeline import VideoModel
    from magicvideo.models.unet import UNetConfig, VideoUNet

    model_nodes, given_nodes = nodes
    _, vae = tiny
    plain = VideoModel(VideoUNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                            attention_resolutions=(2,), num_heads=2, context_dim=16, max_frames=8)))
    latent = model_nodes.EmptyVideoLatent().generate(width=32, height=32, frames=4, batch=1)[0]
    (given,) = given_nodes.GivenFramesNode().give(vae, torch.rand(1, 32, 32, 3), latent, "0", "off")
    with pytest.raises(ValueError, match="no image-prior channels .* cannot take them"):
        _sample(model_nodes, plain, latent, given_frames=given)


def test_given_frame_scores_measure_what_was_kept_and_the_seam():
    from magicvideo.models.evaluate import given_frame_scores, summarise_given

    truth = torch.linspace(0, 0.7, 8).view(8, 1, 1, 1).expand(8, 4, 4, 3).clone()  # brightens 0.1 a frame
    kept = given_frame_scores(truth, truth, 2)
    assert kept["given_psnr"] == pytest.approx(120.0)  # identical first frames (capped)
    assert kept["seam_jump"] == pytest.approx(0.1) and kept["inside_change"] == pytest.approx(0.1)
    jumpy = truth.clone()
    jumpy[2:] += 0.05  # the new frames start off brighter than the given ones lead to
    scores = given_frame_scores(jumpy, truth, 2)
    assert scores["seam_jump"] == pytest.approx(0.15) and scores["inside_change"] == pytest.approx(0.1)
    noisy = truth.clone()
    noisy[0] += 0.1
    assert given_frame_scores(noisy, truth, 1)["given_psnr"] == pytest.approx(20.0)
    summary = summarise_given([kept, scores])
    assert summary["seam_ratio"] == pytest.approx(1.25)


@pytest.mark.host
@pytest.mark.parametrize("name", ["image_to_video", "text_image_video"])
def test_given_frame_workflows_run_in_the_host(comfy, name):
    """The two workflows of the factorisation, on the bundled default: the video's first frame is
    the given picture (the shipped example, cropped to the video), or the one-frame image."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from magicvideo.models import video_io

    repo = Path(__file__).resolve().parents[1]
    workflow = json.loads((repo / "workflows" / f"{name}.json").read_text())
    entry = comfy.run(comfy.workflow_to_prompt(workflow), workflow=workflow, timeout=600)
    [info] = comfy.output_files(entry)
    video = video_io.read_video(comfy.output_path(info)).frames.astype(np.float64) / 255
    assert video.shape == (16, 64, 64, 3) and video.std() > 0.01
    if name == "image_to_video":
        picture = torch.from_numpy(np.asarray(Image.open(repo / "examples" / "red_circle.png").convert("RGB")) / 255.0)
        target = conditioning.fit_images(picture[None].float(), 64, 64, "crop")[0].numpy()
        psnr = 10 * np.log10(1 / ((video[0] - target) ** 2).mean())
        assert psnr > 20, psnr  # the picture, through the VAE and H.264
    later = np.abs(video[1:] - video[:1]).mean()
    assert later > 0.003, "the video does not move away from its first frame at all"


def test_merged_shards_keep_the_given_frame_summary():
    from magicvideo.models.evaluate import merge_shards

    def part(i, seam):
        prompt = {"caption": f"c{i}", "seed": i, "heldout": False, "all_ok": True, "flicker": 0.0,
                  "extra_objects": 0, "objects": [], "given_psnr": 30.0, "seam_jump": seam, "inside_change": 0.1}
        return {"prompts": [prompt], "config": {"given_frames": 1, "shard": [i, 2]}}

    merged = merge_shards([part(0, 0.1), part(1, 0.3)])
    assert merged["summary"]["all"]["given"]["seam_ratio"] == pytest.approx(2.0)
