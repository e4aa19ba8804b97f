"""`python -m magicvideo generate` on a tiny random model file written here."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from magicvideo.cli import main
from magicvideo.models import checkpoint, video_io, world
from magicvideo.models.text import TextConfig, TextEncoder
from magicvideo.models.unet import UNetConfig, VideoUNet
from magicvideo.models.vae import VAEConfig, VideoVAE
from tiny_models import awake

WIDTH = 16



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny full model file without a text encoder, and a conditioning file for it."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    unet = awake(VideoUNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                       attention_resolutions=(2,), num_heads=2, context_dim=WIDTH, max_frames=8)))
    vae = awake(VideoVAE(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_head_dim=16)))
    model = checkpoint.save_model(root / "tiny.safetensors", unet=unet, vae=vae)
    cond = root / "cond.safetensors"
    save_file({"positive": torch.randn(1, 5, WIDTH), "negative": torch.zeros(1, 5, WIDTH)}, cond)
    text = TextEncoder(TextConfig(**world.text_fields(), width=WIDTH, layers=1, heads=2))
    checkpoint.save_model(root / "tiny_text.safetensors", unet=unet, vae=vae, text_encoder=text)
    return model, cond, root


def _args(model, cond, output, *extra):
    return ["generate", "--model", str(model), "--conditioning", str(cond), "--output", str(output),
            "--frames", "3", "--width", "32", "--height", "24", "--steps", "2", "--seed", "5", *extra]


def test_generate_writes_the_video(files):
    model, cond, root = files
    assert main(_args(model, cond, root / "a.gif", "--sampler", "dpmpp_2m", "--scheduler", "karras")) == 0
    assert main(_args(model, cond, root / "b.gif", "--sampler", "dpmpp_2m", "--scheduler", "karras")) == 0
    a = video_io.read_video(root / "a.gif").frames
    assert a.shape == (3, 24, 32, 3)
    assert (a == video_io.read_video(root / "b.gif").frames).all()  # the seed reproduces
    assert main(_args(model, cond, root / "s.gif", "--sampler", "dpmpp_2m", "--scheduler", "karras",
                      "--noise-sharing", "0.9")) == 0
    assert not (a == video_io.read_video(root / "s.gif").frames).all()  # shared noise starts elsewhere
    assert main(_args(model, cond, root / "i.gif", "--sampler", "dpmpp_2m", "--scheduler", "karras",
                      "--cfg-end", "0.5")) == 0  # the guidance interval reaches the sampler (its tests check it)


def test_python_dash_m(files):
    model, cond, root = files
    out = root / "c.mp4"
    run = subprocess.run([sys.executable, "-m", "magicvideo", *_args(model, cond, out, "--cfg", "1")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stderr
    assert video_io.read_video(out).frames.shape == (3, 24, 32, 3)


def test_errors(files, capsys):
    model, cond, root = files
    with pytest.raises(SystemExit, match="multiples of 8"):
        main(_args(model, cond, root / "d.gif", "--width", "30"))
    with pytest.raises(SystemExit, match="no built-in text encoder"):
        main(["generate", "--model", str(model), "--prompt", "a red circle", "--output", str(root / "e.gif")])
    with pytest.raises(SystemExit, match="extensions"):
        main(_args(model, cond, root / "f.avi"))
    # settings out of range are named before any sampling (SamplingOptions.check)
    with pytest.raises(SystemExit, match="noise_sharing must be at least 0 and below 1, got 1"):
        main(_args(model, cond, root / "h.gif", "--noise-sharing", "1"))
    with pytest.raises(SystemExit, match=r"cfg_start <= cfg_end <= 1, got cfg_start=0.0, cfg_end=1.5"):
        main(_args(model, cond, root / "h.gif", "--cfg-end", "1.5"))
    with pytest.raises(SystemExit, match="denoise must be between 0 and 1, got 2"):
        main(_args(model, cond, root / "h.gif", "--denoise", "2"))
    with pytest.raises(SystemExit) as info:  # argparse: an unknown sampler name
        main(_args(model, cond, root / "h.gif", "--sampler", "heun"))
    assert info.value.code == 2 and "invalid choice: 'heun'" in capsys.readouterr().err
    assert not (root / "h.gif").exists()
    with pytest.raises(SystemExit, match="cfg_start <= cfg_end"):
        main(_args(model, cond, root / "h.gif", "--cfg-start", "0.8", "--cfg-end", "0.2"))
    wide = root / "wide.safetensors"
    save_file({"positive": torch.zeros(1, 77, 768), "negative": torch.zeros(1, 77, 768)}, wide)
    with pytest.raises(SystemExit, match="expects text embeddings of width 16.*got 768 in the positive"):
        main(_args(model, wide, root / "g.gif"))
    assert not (root / "g.gif").exists()


def test_prompt_through_the_built_in_text_encoder(files):
    _, _, root = files
    model = root / "tiny_text.safetensors"
    args = ["generate", "--model", str(model), "--frames", "2", "--width", "16", "--height", "16", "--steps", "1"]
    # at 16x16 this tiny model attends at 1x1 cells, too coarse for motion guidance (on by default): a clear error
    with pytest.raises(SystemExit, match="motion guidance needs cross-attention blocks of at least 8x8"):
        main([*args, "--prompt", "a red circle moving left", "--output", str(root / "p.gif")])
    assert main([*args, "--prompt", "a red circle moving left", "--motion-guidance", "0",
                 "--output", str(root / "p.gif")]) == 0
    assert video_io.read_video(root / "p.gif").frames.shape == (2, 16, 16, 3)
    with pytest.raises(SystemExit, match="does not know 1 word"):
        main([*args, "--prompt", "a red circel", "--output", str(root / "q.gif")])
    assert main([*args, "--prompt", "a red circel", "--ignore-unknown-words", "--output", str(root / "q.gif")]) == 0


def test_interpolate_flag(files, capsys):
    """--interpolate K: K frames per keyframe gap at K times the rate, by a model that takes given
    frames (``--interpolator``; by default the bundled interpolator with the bundled model, else the model itself;
    the tiny model here does not take given frames: a clear error)."""
    model, cond, root = files
    with pytest.raises(SystemExit, match="not trained to take given frames"):
        main(_args(model, cond, root / "k.mp4", "--interpolate", "2"))  # another model interpolates itself
    unet = VideoUNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                                num_heads=2, context_dim=WIDTH, max_frames=8, cond_channels=5))
    vae = VideoVAE(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_head_dim=16))
    given = checkpoint.save_model(root / "given.safetensors", unet=awake(unet), vae=awake(vae))
    assert main(_args(given, cond, root / "k.mp4", "--interpolate", "2", "--fps", "8", "--interpolator", str(given))) == 0
    video = video_io.read_video(root / "k.mp4")
    assert video.frames.shape[0] == 5 and video.fps == pytest.approx(16.0)


def test_convert_writes_half_precision_weights_and_keeps_the_rest(files, tmp_path, capsys):
    model, _, root = files
    out = tmp_path / "half.safetensors"
    assert main(["convert", str(root / "tiny_text.safetensors"), str(out)]) == 0
    full, half = checkpoint.read_header(root / "tiny_text.safetensors"), checkpoint.read_header(out)
    assert half.metadata == full.metadata
    assert out.stat().st_size < 0.6 * (root / "tiny_text.safetensors").stat().st_size
    a, b = checkpoint.load_model(root / "tiny_text.safetensors"), checkpoint.load_model(out)
    for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-2, rtol=1e-3)
    assert main(["convert", str(model), str(tmp_path / "x.safetensors"), "--dtype", "int4"]) == 2
    assert "expected a dtype among ['fp16', 'bf16', 'fp32'], found 'int4'" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    (tmp_path / "not.safetensors").write_bytes(b"nothing")
    assert main(["convert", str(tmp_path / "not.safetensors"), str(tmp_path / "y.safetensors")]) == 2
    assert not (tmp_path / "y.safetensors").exists()


def test_upscaler_flag(files, tmp_path):
    """--upscaler FILE: the decoded frames raised 4x, the upscaler given the latents and the prompt
    it reads; one that reads another text encoder's prompt is refused before sampling."""
    from magicvideo.models.upscale import UpscalerConfig, VideoUpscaler

    model, cond, root = files
    torch.manual_seed(0)
    guided = awake(VideoUpscaler(UpscalerConfig(channels=4, blocks=1, latent_channels=4, latent_blocks=1,
                                                text_channels=WIDTH)))
    path = checkpoint.save_upscaler(tmp_path / "up.safetensors", guided)
    assert main(_args(model, cond, tmp_path / "u.gif", "--upscaler", str(path))) == 0
    assert video_io.read_video(tmp_path / "u.gif").frames.shape == (3, 96, 128, 3)
    other = checkpoint.save_upscaler(tmp_path / "other.safetensors",
                                     VideoUpscaler(UpscalerConfig(channels=4, blocks=1, text_channels=12)))
    with pytest.raises(SystemExit, match=r"\[1, tokens, 12\]"):
        main(_args(model, cond, tmp_path / "v.gif", "--upscaler", str(other)))
    assert not (tmp_path / "v.gif").exists()
