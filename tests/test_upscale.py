"""models/upscale.py: chunked = whole, tiled seams, odd sizes, the errors, and the upscaler file kind,
on tiny random models; the node in a real ComfyUI on the bundled upscaler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from magicvideo.models import checkpoint, upscale
from magicvideo.models.upscale import UpscalerConfig, VideoUpscaler

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "weights" / "magicvideo_upscaler.safetensors"


def _model(**extra) -> VideoUpscaler:
    torch.manual_seed(0)
    model = VideoUpscaler(UpscalerConfig(**{"channels": 8, "blocks": 2, **extra}))
    with torch.no_grad():  # the zero-initialised layers too, so every path shows in the output
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def test_starts_as_bicubic():
    frames = torch.rand(3, 10, 12, 3)
    out = upscale.upscale(VideoUpscaler(UpscalerConfig(channels=8, blocks=2)), frames)
    bicubic = torch.nn.functional.interpolate(frames.movedim(-1, 1), scale_factor=4, mode="bicubic").clamp(0, 1)
    assert out.shape == (3, 40, 48, 3) and torch.allclose(out, bicubic.movedim(1, -1), atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 5, 16])
def test_chunked_equals_whole(model, chunk):
    frames = torch.rand(11, 9, 9, 3)
    whole = upscale.upscale(model, frames, chunk=100)
    assert torch.allclose(upscale.upscale(model, frames, chunk=chunk), whole, atol=1e-5)


def test_temporal_layers_see_neighbours(model):
    frames = torch.rand(6, 8, 8, 3)
    changed = frames.clone()
    changed[0] += 0.5
    a, b = upscale.upscale(model, frames), upscale.upscale(model, changed)
    reach = model.config.temporal_reach
    assert reach == 2 and not torch.allclose(a[reach], b[reach])  # frame 2 sees frame 0
    assert torch.equal(a[reach + 1:], b[reach + 1:])  # and nothing beyond its reach
    flat = _model(temporal=False)
    a, b = upscale.upscale(flat, frames), upscale.upscale(flat, changed)
    assert flat.config.temporal_reach == 0 and torch.equal(a[1:], b[1:])


@pytest.mark.parametrize("size", [(40, 40), (37, 53), (64, 21)])
def test_tiles_blend_without_seams(model, size):
    torch.manual_seed(1)
    frames = torch.rand(2, *size, 3).mul(0.3) + torch.linspace(0, 0.6, size[1])[None, None, :, None]
    whole = upscale.upscale(model, frames, tile=4096)
    tiled = upscale.upscale(model, frames, tile=16)
    assert tiled.shape == whole.shape == (2, size[0] * 4, size[1] * 4, 3)
    assert torch.allclose(tiled, whole, atol=1e-5)  # with its context, a tile is the whole's
    blind = upscale.upscale(model, frames, tile=16, margin=0)  # without: the blend hides the seams
    err = (blind - whole).abs()
    assert err.mean() < 0.01 and err.max() < 0.15


def test_a_guided_model_starts_as_the_pixel_model_it_grows_from(model):
    grown = VideoUpscaler(UpscalerConfig(channels=8, blocks=2, latent_channels=4, latent_blocks=1, text_channels=16))
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("latent_", "text.")) for k in missing)
    frames, latents, text = torch.rand(5, 16, 24, 3), torch.randn(5, 4, 2, 3), torch.randn(1, 7, 16)
    assert torch.allclose(upscale.upscale(grown, frames, latents=latents, text=text), upscale.upscale(model, frames),
                          atol=1e-6)


def test_the_prompt_reaches_every_frame_and_tile():
    model = _model(text_channels=16)
    frames, text = torch.rand(6, 24, 24, 3), torch.randn(1, 7, 16)
    whole = upscale.upscale(model, frames, text=text, chunk=100, tile=4096)
    assert (whole - upscale.upscale(model, frames)).abs().mean(dim=(1, 2, 3)).min() > 0.01  # every frame
    other = upscale.upscale(model, frames, text=torch.randn(1, 7, 16))  # another prompt, another picture
    assert not torch.allclose(other, whole)
    assert torch.allclose(upscale.upscale(model, frames, text=text, chunk=2, tile=16), whole, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[1, tokens, 16\] .* got \[1, 7, 12\]"):
        upscale.upscale(model, frames, text=torch.randn(1, 7, 12))
    with pytest.raises(ValueError, match="does not read text"):
        upscale.upscale(_model(), frames, text=text)


def test_latents_reach_the_output_chunked_and_tiled_as_whole():
    model = _model(latent_channels=4, latent_blocks=1)
    frames, latents = torch.rand(7, 40, 56, 3), torch.randn(7, 4, 5, 7)
    whole = upscale.upscale(model, frames, latents=latents, chunk=100, tile=4096)
    assert model.config.temporal_reach == 3
    assert (whole - upscale.upscale(model, frames, chunk=100, tile=4096)).abs().mean() > 0.01  # they matter
    assert torch.allclose(upscale.upscale(model, frames, latents=latents, chunk=2), whole, atol=1e-5)
    tiled = upscale.upscale(model, frames, latents=latents, tile=16)  # 2x2-cell tiles, each with its context
    assert torch.allclose(tiled, whole, atol=1e-5)
    changed = latents.clone()
    changed[0] += 1
    a = upscale.upscale(model, frames, latents=changed)
    assert not torch.allclose(a[3], whole[3]) and torch.equal(a[4:], whole[4:])  # 3 frames of reach, no more


def test_latents_that_do_not_fit(model):
    reads = _model(latent_channels=4, latent_blocks=1)
    frames = torch.rand(4, 16, 24, 3)
    with pytest.raises(ValueError, match=r"= \[4, 4, 2, 3\] for 4 frames of 24x16; got \[3, 4, 2, 3\]"):
        upscale.upscale(reads, frames, latents=torch.randn(3, 4, 2, 3))
    with pytest.raises(ValueError, match="height/8"):
        upscale.upscale(reads, torch.rand(4, 12, 16, 3), latents=torch.randn(4, 4, 1, 2))
    with pytest.raises(ValueError, match="does not read latents"):
        upscale.upscale(model, frames, latents=torch.randn(4, 4, 2, 3))


@pytest.mark.parametrize("h, w", [(4, 4), (5, 7), (13, 64), (63, 65)])
def test_odd_sizes(model, h, w):
    out = upscale.upscale(model, torch.rand(3, h, w, 3))
    assert out.shape == (3, 4 * h, 4 * w, 3) and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("frames, message", [
    (torch.rand(2, 3, 8, 3), "4 to 2048 pixels a side"),
    (torch.rand(1, 2049, 8, 3), "4 to 2048 pixels a side"),
    (torch.rand(2, 8, 8, 4), r"\[frames, height, width, 3\]"),
    (torch.rand(8, 8, 3), r"\[frames, height, width, 3\]"),
    (torch.rand(0, 8, 8, 3), "no frames"),
])
def test_sizes_it_cannot_take(model, frames, message):
    with pytest.raises(ValueError, match=message):
        upscale.upscale(model, frames)


def test_the_file_round_trips(model, tmp_path):
    path = checkpoint.save_upscaler(tmp_path / "up.safetensors", model, dtype=torch.float32,
                                    extra_metadata={"note": "test"})
    loaded = checkpoint.load_upscaler(path)
    assert loaded.config == model.config
    frames = torch.rand(4, 8, 8, 3)
    assert torch.equal(upscale.upscale(loaded, frames), upscale.upscale(model, frames))
    assert "a MagicVideo upscaler file" in checkpoint.identify(checkpoint.read_header(path))


def test_wrong_files(model, tmp_path):
    from magicvideo.models.vae import VAEConfig, VideoVAE

    up = checkpoint.save_upscaler(tmp_path / "up.safetensors", model)
    vae = checkpoint.save_model(tmp_path / "vae.safetensors", vae=VideoVAE(VAEConfig(ch=32, ch_mult=(1, 2),
                                                                                     num_res_blocks=1)))
    other = tmp_path / "random.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(other))
    with pytest.raises(checkpoint.CheckpointError, match="expected a MagicVideo upscaler file .*found a MagicVideo full"):
        checkpoint.load_upscaler(vae)
    with pytest.raises(checkpoint.CheckpointError, match="expected a MagicVideo upscaler file .*found an unrecognised"):
        checkpoint.load_upscaler(other)
    with pytest.raises(checkpoint.CheckpointError, match="expected a full MagicVideo model, found a MagicVideo upscaler"):
        checkpoint.load_model(up)
    with pytest.raises(checkpoint.CheckpointError, match="Super-Resolver"):
        checkpoint.load(up)
    bigger = checkpoint.save_upscaler(tmp_path / "big.safetensors", _model(channels=16))
    header = checkpoint.read_header(bigger)
    save_file({k: torch.zeros(s) for k, s in header.shapes.items()}, str(tmp_path / "mixed.safetensors"),
              metadata={**header.metadata, "upscaler_config": checkpoint._config_json(model)})
    with pytest.raises(checkpoint.CheckpointError, match="shape mismatches"):
        checkpoint.load_upscaler(tmp_path / "mixed.safetensors")


def test_the_training_stage_writes_an_upscaler_and_resumes(tmp_path):
    import json

    from magicvideo.training import cli

    config = {"seed": 3, "data": {"source": "world", "frames": 4, "size": 64},
              "upscale": {"config": {"channels": 4, "blocks": 1}, "pool_size": 3,
                          "shares": {"clean": 1, "vae": 1, "sampled": 1}, "batch_size": 2, "frames": 3, "crop": 6,
                          "steps": 3, "lr": 1e-3, "save_every": 2}}
    path = tmp_path / "up.json"
    path.write_text(json.dumps(config))
    run, out = tmp_path / "run", tmp_path / "out.safetensors"
    base = ["--config", str(path), "--stage", "upscale", "--run-dir", str(run), "--threads", "1"]
    with pytest.raises(SystemExit, match="--init a MagicVideo file"):
        cli.main(base)
    cli.main(base + ["--init", str(REPO / "weights" / "magicvideo_default.safetensors"), "--stop-at", "2"])
    assert checkpoint.read_header(run / "upscaler.safetensors").metadata["steps"] == "2"  # a leg of the 3-step run
    cli.main(base + ["--resume", "--out", str(out)])  # the pool is reused, the steps go on
    model = checkpoint.load_upscaler(out)
    header = checkpoint.read_header(out)
    assert model.config == UpscalerConfig(channels=4, blocks=1) and header.metadata["steps"] == "3"
    assert json.loads(header.metadata["training_recipe"])["config"]["upscale"]["steps"] == 3
    assert len([json.loads(line) for line in (run / "upscale.log").read_text().splitlines()]) >= 2

    # an upscaler reading latents and the prompt grown from that file: its pixel network loaded, its
    # latent scale the VAE's, trained on the pool's caption embeddings
    config["upscale"].update(config={"channels": 4, "blocks": 1, "latent_channels": 4, "latent_blocks": 1,
                                     "text_channels": 128},
                             init=str(out), crop=16, latent_drop=0.5)
    path.write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="holds no latents"):
        legacy = tmp_path / "legacy"
        legacy.mkdir()
        save_file({"inputs": torch.zeros(1, 4, 64, 64, 3, dtype=torch.uint8)}, str(legacy / "upscale_pool.safetensors"),
                  metadata={"format": "magicvideo-upscale-pool", "specs": "[]", "kinds": "[]"})
        cli.main(["--config", str(path), "--stage", "upscale", "--run-dir", str(legacy), "--threads", "1"])
    cli.main(["--config", str(path), "--stage", "upscale", "--run-dir", str(tmp_path / "latent"), "--threads", "1",
              "--init", str(REPO / "weights" / "magicvideo_default.safetensors"),
              "--out", str(tmp_path / "l.safetensors")])
    grown = checkpoint.load_upscaler(tmp_path / "l.safetensors")
    default_vae = checkpoint.load_model(REPO / "weights" / "magicvideo_default.safetensors").vae.config
    assert grown.config.latent_channels == 4 and grown.config.latent_scale == pytest.approx(default_vae.scaling_factor)
    recipe = json.loads(checkpoint.read_header(tmp_path / "l.safetensors").metadata["training_recipe"])
    assert recipe["config"]["upscale"]["init"] == "out.safetensors"
    [grown_from] = json.loads(checkpoint.read_header(tmp_path / "l.safetensors").metadata["lineage"])
    assert grown_from["config"]["upscale"]["config"] == {"channels": 4, "blocks": 1}  # the pixel file's recipe


def test_the_loss_weighs_the_truths_edges_when_asked():
    from magicvideo.training.upscale import edge_map, pixel_loss

    high = torch.zeros(1, 3, 16, 16)
    high[..., :, 8:] = 1.0  # a vertical edge between columns 7 and 8
    assert edge_map(high)[0, 0, 0].tolist() == [0] * 6 + [1] * 4 + [0] * 6  # both sides, widened by one
    at_edge, flat = high.clone(), high.clone()
    at_edge[..., 4, 8] -= 0.5
    flat[..., 4, 14] -= 0.5
    assert pixel_loss(at_edge, high) == pixel_loss(flat, high)  # L1: all pixels alike
    assert pixel_loss(at_edge, high, "mse") == pytest.approx(0.25 / 256)
    assert pixel_loss(at_edge, high, "l1", 4.0) == pytest.approx(5 * pixel_loss(flat, high, "l1", 4.0))
    with pytest.raises(ValueError, match="upscale.loss must be one of"):
        pixel_loss(flat, high, "huber")


@pytest.mark.skipif(not BUNDLED.exists(), reason="no bundled upscaler")
def test_bundled_upscaler_beats_bicubic():
    import numpy as np

    from magicvideo.models import world

    model = checkpoint.load_upscaler(BUNDLED)
    specs = [world.sample_spec(np.random.default_rng(s), "heldout") for s in range(3)]
    low, truth = world.render_batch(specs, 8, 64), world.render_batch(specs, 8, 256)
    ours = torch.stack([upscale.upscale(model, v) for v in low])
    bicubic = torch.nn.functional.interpolate(low.flatten(0, 1).movedim(-1, 1), scale_factor=4, mode="bicubic")
    bicubic = bicubic.clamp(0, 1).movedim(1, -1).view_as(truth)
    assert (ours - truth).pow(2).mean() < 0.9 * (bicubic - truth).pow(2).mean()  # measured: 0.86


@pytest.mark.host
def test_the_node_runs_in_the_host(comfy):
    """Core EmptyImage (odd size) -> Super-Resolver -> Save Video; a too-small image is refused by name."""
    from magicvideo.models import video_io

    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 30, "height": 22, "batch_size": 5, "color": 0x3366CC}},
        "2": {"class_type": "MagicVideoSuperResolver", "inputs": {"images": ["1", 0],
              "upscaler": "magicvideo_upscaler.safetensors", "frames": 0, "chunk_size": 2}},
        "3": {"class_type": "MagicVideoSaveVideo", "inputs": {"images": ["2", 0], "fps": 8.0, "format": "mp4",
                                                             "crf": 19, "odd_size": "pad", "filename_prefix": "sr"}},
    }
    [info] = comfy.output_files(comfy.run(prompt, timeout=300))
    video = video_io.read_video(comfy.output_path(info))
    assert video.frames.shape == (5, 88, 120, 3)
    # a flat colour no world clip shows, through H.264: the bundled upscaler measured 8.5 levels off
    assert abs(video.frames[2].astype(int).mean(axis=(0, 1)) - [0x33, 0x66, 0xCC]).max() < 12
    prompt["4"] = {"class_type": "MagicVideoEmptyLatent", "inputs": {"width": 64, "height": 64, "frames": 5, "batch": 1}}
    prompt["2"]["inputs"]["latents"] = ["4", 0]  # latents of another size than the images': refused by name
    assert "the latents must be the frames' own" in comfy.run_expect_error(prompt)
    del prompt["2"]["inputs"]["latents"]
    prompt["1"]["inputs"]["height"] = 2
    assert "4 to 2048 pixels a side" in comfy.run_expect_error(prompt)
    prompt["1"]["inputs"]["height"] = 22
    prompt["2"]["inputs"]["upscaler"] = "magicvideo_default.safetensors"
    assert "expected a MagicVideo upscaler file" in comfy.run_expect_error(prompt)


def test_guided_batches_are_neither_mirrored_nor_reversed():
    """A mirrored or time-reversed clip no longer matches its latents or its caption: batches for a
    guided model come as the pool holds them; a pixel model's are flipped at random."""
    import numpy as np

    from magicvideo.models import world
    from magicvideo.training.upscale import _batch

    spec = world.sample_spec(np.random.default_rng(0), "train")
    pool = {"inputs": torch.rand(1, 6, 16, 16, 3), "latents": torch.randn(1, 6, 4, 2, 2), "text": None,
            "specs": [spec]}
    tc = {"batch_size": 1, "frames": 3, "crop": 16}
    windows = [pool["inputs"][0, f:f + 3].movedim(-1, 1) for f in range(4)]
    rng = np.random.default_rng(1)
    for _ in range(10):
        low, _, _, latents, _ = _batch(pool, rng, tc, 2, unit=8, augment=False)
        assert any(torch.equal(low, w) for w in windows) and latents.shape == (3, 4, 2, 2)
    flipped = [not any(torch.equal(_batch(pool, rng, tc, 2)[0], w) for w in windows) for _ in range(10)]
    assert any(flipped)
