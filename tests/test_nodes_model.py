"""Model nodes: in-process on tiny models (fast), and end to end in a real ComfyUI server (host)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nodes(host_modules):
    """magicvideo.nodes.model imported in-process against the host's modules (CPU)."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
    return importlib.import_module("magicvideo.nodes.model")


@pytest.fixture(scope="module")
def tiny():
    """A tiny VideoUNet (context width 16) and VideoVAE with every layer awake."""
    from magicvideo.models.pipeline import VideoModel
    from magicvideo.models.unet import UNetConfig, VideoUNet
    from magicvideo.models.vae import VAEConfig, VideoVAE

    torch.manual_seed(0)
    unet = VideoUNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                                num_heads=2, context_dim=16, max_frames=8)).eval()
    vae = VideoVAE(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_head_dim=16)).eval()
    with torch.no_grad():
        for p in list(unet.parameters()) + list(vae.parameters()):
            if not p.any():
                p.normal_(0, 0.02)
    return VideoModel(unet, latent_rgb=vae.latent_rgb()), vae


def _cond(width=16, value=0.0):
    return [[torch.full((1, 6, width), value), {"pooled_output": None}]]


def _run_sampler(nodes, model, latent, **kw):
    args = dict(model=model, positive=_cond(value=0.3), negative=_cond(), latent=latent, seed=1, steps=2, cfg=4.0,
                sampler="euler", scheduler="normal", fps=8.0, denoise=1.0, frames=0)
    return nodes.KeyframeSampler().sample(**{**args, **kw})[0]


def test_node_definitions(nodes):
    """Every node: DESCRIPTION, MagicVideo/ category, a tooltip on every input."""
    assert set(nodes.NODE_CLASS_MAPPINGS) == {"MagicVideoModelLoader", "MagicVideoEmptyLatent",
                                             "MagicVideoKeyframeSampler", "MagicVideoVAEEncode", "MagicVideoVAEDecode"}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert cls.DESCRIPTION and cls.CATEGORY.startswith("MagicVideo/"), name
        assert name in nodes.NODE_DISPLAY_NAME_MAPPINGS
        for group in cls.INPUT_TYPES().values():
            for inp, spec in group.items():
                assert len(spec) == 2 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"


def test_model_folder_registered(nodes):
    import folder_paths

    paths = folder_paths.get_folder_paths("magicvideo")
    assert paths[0] == os.path.join(folder_paths.models_dir, "magicvideo")
    assert Path(paths[1]) == REPO / "weights"


def test_empty_latent(nodes):
    latent = nodes.EmptyVideoLatent().generate(width=64, height=48, frames=4, batch=2)[0]
    assert latent["samples"].shape == (8, 4, 6, 8) and latent["num_frames"] == 4
    with pytest.raises(ValueError, match="multiples of 8; got 60x48"):
        nodes.EmptyVideoLatent().generate(width=60, height=48, frames=4, batch=1)


def test_sampler_and_vae_nodes(nodes, tiny):
    model, vae = tiny
    latent = nodes.EmptyVideoLatent().generate(width=32, height=32, frames=3, batch=2)[0]
    out = _run_sampler(nodes, model, latent)
    assert out["samples"].shape == (6, 4, 4, 4) and out["num_frames"] == 3
    assert out["samples"].device.type == "cpu" and torch.isfinite(out["samples"]).all()
    assert torch.equal(out["samples"], _run_sampler(nodes, model, latent)["samples"])  # seeded

    images = nodes.VAEDecode().decode(vae=vae, samples=out, frames=0, chunk_size=2)[0]
    assert images.shape == (6, 32, 32, 3) and 0 <= images.min() and images.max() <= 1
    whole = nodes.VAEDecode().decode(vae=vae, samples=out, frames=0, chunk_size=64)[0]
    assert torch.allclose(images, whole, atol=1e-5)  # chunking does not change the video

    encoded = nodes.VAEEncode().encode(vae=vae, images=images[:3], chunk_size=2)[0]
    assert encoded["samples"].shape == (3, 4, 4, 4) and encoded["num_frames"] == 3
    # video-to-video from the encoded frames
    v2v = _run_sampler(nodes, model, encoded, denoise=0.5, steps=4)
    assert v2v["samples"].shape == (3, 4, 4, 4)


def test_noise_sharing_input(nodes, tiny):
    model, _ = tiny
    latent = nodes.EmptyVideoLatent().generate(width=32, height=32, frames=4, batch=1)[0]
    plain = _run_sampler(nodes, model, latent)["samples"]
    assert torch.equal(plain, _run_sampler(nodes, model, latent, noise_sharing=0.0)["samples"])  # 0 = the old default
    shared = _run_sampler(nodes, model, latent, noise_sharing=0.9)["samples"]
    spread = lambda x: (x - x.mean(0, keepdim=True)).pow(2).mean()  # noqa: E731  frames' spread around their mean
    assert spread(shared) < 0.5 * spread(plain)
    with pytest.raises(ValueError, match="noise_sharing must be at least 0 and below 1, got 1.0"):
        _run_sampler(nodes, model, latent, noise_sharing=1.0)


def test_guidance_interval_inputs(nodes, tiny):
    model, _ = tiny
    latent = nodes.EmptyVideoLatent().generate(width=32, height=32, frames=4, batch=1)[0]
    full = _run_sampler(nodes, model, latent, steps=4, cfg_start=0.0, cfg_end=1.0)["samples"]
    # the default interval is the main workflow's: guidance over the first 70% of the schedule
    default = _run_sampler(nodes, model, latent, steps=4)["samples"]
    assert torch.equal(default, _run_sampler(nodes, model, latent, steps=4, cfg_start=0.0, cfg_end=0.7)["samples"])
    assert not torch.allclose(default, full, atol=1e-3)
    # no step inside the interval is the same as no guidance at all
    unguided = _run_sampler(nodes, model, latent, steps=4, cfg=1.0)["samples"]
    empty = _run_sampler(nodes, model, latent, steps=4, cfg_start=0.55, cfg_end=0.7)["samples"]
    assert torch.allclose(empty, unguided, atol=1e-5) and not torch.allclose(full, unguided, atol=1e-3)
    with pytest.raises(ValueError, match="cfg_start <= cfg_end"):
        _run_sampler(nodes, model, latent, cfg_start=0.9, cfg_end=0.1)


def _asking(request: dict) -> list:
    """A CONDITIONING as MagicVideo Text Encode makes it: the context and what the prompt asks of each object."""
    from magicvideo.models.guidance import MOTION_KEY

    return [[_cond(value=0.3)[0][0], {MOTION_KEY: request}]]


def test_motion_guidance_inputs(nodes, tiny, capsys):
    from magicvideo.models import world

    model, _ = tiny
    latent = nodes.EmptyVideoLatent().generate(width=32, height=32, frames=4, batch=1)[0]
    plain = _run_sampler(nodes, model, latent, motion_guidance=0.0)["samples"]
    assert capsys.readouterr().out == ""
    # core CLIPTextEncode's conditioning says nothing of objects: a note, and the plain result
    assert torch.equal(plain, _run_sampler(nodes, model, latent, motion_guidance=0.2)["samples"])
    assert "motion_guidance reads prompts from MagicVideo Text Encode" in capsys.readouterr().out
    still = _asking({"objects": [], "unit_travel": 0.26})  # "a red ball": no motion, nothing to steer
    assert torch.equal(plain, _run_sampler(nodes, model, latent, positive=still, motion_guidance=0.2)["samples"])
    # this tiny UNet attends at 2x2 cells only, too coarse to find a blob in: a clear error
    moving = _asking({"objects": [{"tokens": [1, 2, 3, 4], "path": world.lexicon().motion_params("left", "fast")}],
                      "unit_travel": 0.26})
    with pytest.raises(ValueError, match="at least 8x8 latent cells"):
        _run_sampler(nodes, model, latent, positive=moving, motion_guidance=0.2)
    # with motion guidance off the request is not read
    assert torch.equal(plain, _run_sampler(nodes, model, latent, positive=moving, motion_guidance=0.0)["samples"])
    spec = nodes.KeyframeSampler.INPUT_TYPES()["optional"]
    assert spec["motion_guidance"][1]["default"] == 0.2 and spec["motion_guidance_until"][1]["default"] == 0.3


def test_frames_input_and_errors(nodes, tiny):
    model, vae = tiny
    latent = {"samples": torch.zeros(6, 4, 4, 4)}  # no num_frames key: frames input or whole batch
    assert _run_sampler(nodes, model, latent, frames=3)["num_frames"] == 3
    assert _run_sampler(nodes, model, latent, steps=1)["num_frames"] == 6
    with pytest.raises(ValueError, match="6 frames, which is not divisible by num_frames=4"):
        _run_sampler(nodes, model, latent, frames=4)
    with pytest.raises(ValueError, match="width 16 .*got 768"):
        _run_sampler(nodes, model, latent, positive=_cond(width=768))
    with pytest.raises(ValueError, match="expected one conditioning entry"):
        _run_sampler(nodes, model, latent, positive=_cond() + _cond())
    with pytest.raises(ValueError, match="no image-prior channels"):
        _run_sampler(nodes, model, latent, reference={"samples": torch.zeros(1, 4, 4, 4)})
    with pytest.raises(ValueError, match="not divisible by 8"):
        nodes.VAEEncode().encode(vae=vae, images=torch.zeros(2, 30, 32, 3), chunk_size=8)


def test_reference_frames_are_kept_by_image_first_models(nodes, tiny):
    """Image-to-video on a model trained image-first (no image-prior channels): the reference
    latents are the video's first frames, and the rest follow from them."""
    import copy

    from magicvideo.models.pipeline import VideoModel

    model, _ = tiny
    unet = copy.deepcopy(model.unet)
    unet.config.image_first = True
    i2v = VideoModel(unet)
    latent = {"samples": torch.zeros(8, 4, 4, 4), "num_frames": 4}  # two 4-frame videos
    ref = torch.randn(1, 4, 4, 4)
    out = _run_sampler(nodes, i2v, latent, reference={"samples": ref})["samples"].view(2, 4, 4, 4, 4)
    assert torch.allclose(out[:, 0], ref.expand(2, -1, -1, -1), atol=1e-5)
    other = _run_sampler(nodes, i2v, latent, reference={"samples": -ref})["samples"].view(2, 4, 4, 4, 4)
    assert not torch.allclose(out[:, 1:], other[:, 1:])  # later frames depend on the given one
    with pytest.raises(ValueError, match="all 4 frames are given; leave at least one frame to generate"):
        _run_sampler(nodes, i2v, latent, reference={"samples": torch.zeros(4, 4, 4, 4)})
    with pytest.raises(ValueError, match=r"given frames must be latents \[frames, 4, 4, 4\].*got \(1, 4, 8, 8\)"):
        _run_sampler(nodes, i2v, latent, reference={"samples": torch.zeros(1, 4, 8, 8)})


def test_progress_preview_and_cancel(nodes, tiny, monkeypatch):
    """The callback feeds the host's ProgressBar with a JPEG preview and honours Cancel."""
    import comfy.model_management as mm
    import comfy.utils

    model, _ = tiny
    events = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview: events.append((value, total, preview)))
    latent = nodes.EmptyVideoLatent().generate(width=32, height=32, frames=2, batch=1)[0]
    _run_sampler(nodes, model, latent, steps=3)
    assert [(v, t) for v, t, _ in events] == [(1, 3), (2, 3), (3, 3)]
    kind, image, size = events[0][2]
    assert kind == "JPEG" and image.size == (4, 4) and size == nodes.PREVIEW_SIZE

    events.clear()
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _run_sampler(nodes, model, latent, steps=3)
    finally:
        mm.interrupt_current_processing(False)
    assert events == []  # stopped within the first step


def test_loader_full_file(nodes, tiny, tmp_path):
    """A MagicVideo file in a registered magicvideo folder -> model, VAE, text encoder (None here)."""
    import folder_paths

    from magicvideo.models import checkpoint, world
    from magicvideo.models.guidance import MOTION_KEY
    from magicvideo.models.text import TextConfig, TextEncoder

    model, vae = tiny
    text_encoder = TextEncoder(TextConfig(**world.text_fields(), width=16, layers=1, heads=2))
    checkpoint.save_model(tmp_path / "tiny_full.safetensors", unet=model.unet, vae=vae, text_encoder=text_encoder)
    (tmp_path / "not_a_model.ckpt").write_bytes(b"pickle")
    folder_paths.add_model_folder_path("magicvideo", str(tmp_path))
    folder_paths.filename_list_cache.pop("magicvideo", None)
    choices = nodes.ModelLoader.INPUT_TYPES()["required"]["model_name"][0]
    assert "tiny_full.safetensors" in choices and "not_a_model.ckpt" not in choices  # never offer pickles

    loaded, loaded_vae, text = nodes.ModelLoader().load("tiny_full.safetensors", "none", "none", "auto")
    assert isinstance(text, TextEncoder) and loaded.latent_rgb.shape == (5, 3)
    assert loaded.scaling_factor == vae.config.scaling_factor
    assert torch.equal(loaded.unet.out[2].weight, model.unet.out[2].weight.to(loaded.unet.out[2].weight.device))
    latent = nodes.EmptyVideoLatent().generate(width=32, height=32, frames=2, batch=1)[0]
    encode = importlib.import_module("magicvideo.nodes.text").MagicVideoTextEncode().encode
    positive, negative = encode(text, "a red circle moving left")[0], encode(text, "")[0]
    assert text.lexicon == world.lexicon()  # the file's text encoder reads prompts for motion guidance
    assert positive[0][1][MOTION_KEY] == text.motion_request("a red circle moving left")
    out = _run_sampler(nodes, loaded, latent, steps=1, positive=positive, negative=negative, motion_guidance=0.0)
    assert out["samples"].shape == (2, 4, 4, 4)
    # the default (the main workflow's) steers what the prompt asks: too coarse a grid for it here, said clearly
    with pytest.raises(ValueError, match="motion guidance needs cross-attention blocks of at least 8x8"):
        _run_sampler(nodes, loaded, latent, steps=1, positive=positive, negative=negative)

    with pytest.raises(ValueError, match="choose one source"):
        nodes.ModelLoader().load("tiny_full.safetensors", "some_sd15.safetensors", "none", "auto")
    with pytest.raises(ValueError, match="motion_module applies onto an SD1.5 checkpoint"):
        nodes.ModelLoader().load("tiny_full.safetensors", "none", "tiny_full.safetensors", "auto")
    with pytest.raises(ValueError, match="no model chosen"):
        nodes.ModelLoader().load("none", "none", "none", "auto")
    with pytest.raises(ValueError, match="expected a file named 'gone.safetensors'"):
        nodes.ModelLoader().load("gone.safetensors", "none", "none", "auto")


# ----------------------------------------------------------------------------- end to end in the host

from sd15_fixture import host_comfy, sd15_checkpoint  # noqa: E402,F401  (fixtures)


@pytest.fixture(scope="module")
def sd15_host(comfy_path, sd15_checkpoint, tmp_path_factory):
    """A ComfyUI server that finds the random SD1.5 file among its checkpoints.

    The file's folder is added through a test-only extra-model-paths file, so the host's
    own models/ folder is left alone."""
    from magicvideo.host import ComfyHost, HostError

    root = tmp_path_factory.mktemp("comfyui_sd15")
    paths = root / "extra_model_paths.yaml"
    paths.write_text(f"magicvideo_sd15_test:\n  checkpoints: {sd15_checkpoint.parent}\n")
    host = ComfyHost(comfy_path, output_dir=root / "output", input_dir=root / "input", log_path=root / "comfyui.log",
                     extra_args=["--extra-model-paths-config", str(paths)])
    try:
        host.start()
        host.check_nodes(["MagicVideoModelLoader", "MagicVideoKeyframeSampler", "MagicVideoVAEDecode"])
    except HostError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield host
    host.stop()


def _text_to_video_prompt(ckpt: str, frames: int = 4, size: int = 64) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red ball bouncing", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "loader": {"class_type": "MagicVideoModelLoader",
                   "inputs": {"model_name": "none", "sd15_checkpoint": ckpt, "motion_module": "none", "dtype": "fp32"}},
        "empty": {"class_type": "MagicVideoEmptyLatent", "inputs": {"width": size, "height": size, "frames": frames, "batch": 1}},
        "sampler": {"class_type": "MagicVideoKeyframeSampler",
                    "inputs": {"model": ["loader", 0], "positive": ["pos", 0], "negative": ["neg", 0],
                               "latent": ["empty", 0], "seed": 7, "steps": 2, "cfg": 7.5, "sampler": "euler",
                               "scheduler": "normal", "fps": 8.0, "denoise": 1.0, "frames": 0}},
        "decode": {"class_type": "MagicVideoVAEDecode",
                   "inputs": {"vae": ["loader", 1], "samples": ["sampler", 0], "frames": 0, "chunk_size": 2}},
        "save": {"class_type": "MagicVideoSaveVideo",
                 "inputs": {"images": ["decode", 0], "fps": 8.0, "format": "mp4", "crf": 0, "odd_size": "pad",
                            "filename_prefix": "t2v"}},
        # the same latent through core VAE Decode with the checkpoint's VAE, and ours, as lossless PNGs
        "core_decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save_core": {"class_type": "SaveImage", "inputs": {"images": ["core_decode", 0], "filename_prefix": "core"}},
        "save_ours": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "ours"}},
    }


@pytest.mark.host
def test_sd15_text_to_video_in_host(sd15_host, sd15_checkpoint):
    """CheckpointLoaderSimple -> CLIPTextEncode -> our loader (SD1.5 inflation) -> Keyframe Sampler
    (2 steps, 64x64, 4 frames) -> our VAE Decode -> Save Video; core VAE Decode on our latent."""
    import numpy as np
    from PIL import Image

    from magicvideo.models import video_io

    entry = sd15_host.run(_text_to_video_prompt(sd15_checkpoint.name), timeout=900)
    outputs = entry["outputs"]

    video = outputs["save"]["images"][0]
    assert video["frame_count"] == 4
    decoded = video_io.read_video(sd15_host.output_path(video))
    assert decoded.frames.shape == (4, 64, 64, 3)

    def pngs(node):
        return np.stack([np.asarray(Image.open(sd15_host.output_path(i))) for i in outputs[node]["images"]]).astype(int)

    core, ours = pngs("save_core"), pngs("save_ours")
    assert core.shape == ours.shape == (4, 64, 64, 3)
    # untrained temporal layers are the identity: our VideoVAE decodes as the SD VAE does
    assert np.abs(core - ours).max() <= 1

    # errors reach the user as the host's error, naming expected and found
    bad = _text_to_video_prompt(sd15_checkpoint.name)
    bad["sampler"]["inputs"]["frames"] = 3
    message = sd15_host.run_expect_error({k: v for k, v in bad.items() if k not in ("save", "core_decode", "save_core")})
    assert "4 frames, which is not divisible by num_frames=3" in message
