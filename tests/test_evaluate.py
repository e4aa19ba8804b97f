"""The evaluator: exact on the world's own clips, robust to blur and noise, strict when wrong."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from magicvideo.models import evaluate as ev
from magicvideo.models import world
from magicvideo.models.sampling import PRESETS

# quick runs of the tiny model: two steps, motion guidance off (an extra UNet pass and backward per step)
QUICK = PRESETS["main"].replace(steps=2, cfg=2.0, motion_guidance=0.0)


@pytest.fixture(scope="module")
def ground_truth():
    """300 prompts of the fixed set and their clips rendered by the world (16 x 64 x 64)."""
    prompts = ev.prompt_set(seed=0, n=300)
    clips = world.render_batch([p.spec for p in prompts]).numpy()
    return prompts, clips


def score_all(prompts, clips, transform=lambda c: c):
    scored = [{"heldout": p.heldout, **ev.score_clip(transform(c), p.spec)} for p, c in zip(prompts, clips)]
    return ev.summarise(scored)


def test_ground_truth_adherence_at_least_98_percent(ground_truth):
    summary = score_all(*ground_truth)
    for group in ("all", "seen", "heldout"):
        s = summary[group]
        assert s["all"] >= 0.98, (group, s)
        for attribute in ev.ATTRIBUTES:
            assert s[attribute] >= 0.98, (group, attribute, s)
        assert s["presence"] == 1.0
        assert s["flicker"] < 1e-3
        assert s["size_jitter"] < 0.05


def test_robust_to_blur_and_noise(ground_truth):
    prompts, clips = ground_truth
    rng = np.random.default_rng(0)

    def degrade(c):  # roughly what a VAE decode does to edges, plus grain
        return ndimage.gaussian_filter(c, (0, 1.0, 1.0, 0)) + rng.normal(0, 0.03, c.shape)

    summary = score_all(prompts[:150], clips[:150], degrade)
    assert summary["all"]["all"] >= 0.95, summary["all"]


def test_other_sizes_and_frame_counts():
    prompts = ev.prompt_set(seed=1, n=16)
    for frames, size in ((8, 64), (24, 96), (61, 48), (16, 128)):
        clips = world.render_batch([p.spec for p in prompts], frames, size).numpy()
        assert score_all(prompts, clips)["all"]["all"] >= 0.95, (frames, size)


def test_wrong_attributes_are_caught():
    obj = world.ObjectSpec("red", "circle", "left", "fast", 0.7, 0.5, 0.15)
    spec = world.ClipSpec((obj,), "charcoal", "stripes_v")
    clip = world.render(spec)
    assert ev.score_clip(clip, spec)["all_ok"]

    def judged(**changes):
        return ev.score_clip(clip, world.ClipSpec((dataclasses.replace(obj, **changes),)))["objects"][0]

    r = judged(colour="blue")
    assert not r["colour_ok"] and r["shape_ok"] and r["motion_ok"] and not r["all_ok"]
    r = judged(shape="triangle")
    assert r["colour_ok"] and not r["shape_ok"]
    r = judged(motion="right")
    assert not r["motion_ok"] and r["speed_ok"]
    r = judged(speed="slow")
    assert r["motion_ok"] and not r["speed_ok"] and not r["all_ok"]
    r = judged(motion="still", speed=None)
    assert not r["motion_ok"] and r["speed_ok"] is None


def test_missing_object_and_flicker():
    obj = world.ObjectSpec("yellow", "square", "grow", "slow", 0.5, 0.5, 0.1)
    spec = world.ClipSpec((obj,), "navy")
    blank = world.render(world.ClipSpec((dataclasses.replace(obj, x=5.0),), "navy"))  # off-screen
    r = ev.score_clip(blank, spec)
    assert not r["all_ok"] and r["objects"][0]["presence"] == 0.0 and r["objects"][0]["found"] is None

    clip = world.render(spec).clone()
    assert ev.score_clip(clip, spec)["flicker"] == 0.0
    clip[1::2] = (clip[1::2] + 0.05).clamp(0, 1)  # every other frame brighter
    assert ev.score_clip(clip, spec)["flicker"] > 0.03


def test_two_objects_are_told_apart():
    a = world.ObjectSpec("white", "triangle", "up", "slow", 0.25, 0.7, 0.14)
    b = world.ObjectSpec("orange", "square", "rotate", "fast", 0.72, 0.4, 0.15, angle=0.3)
    spec = world.ClipSpec((a, b), "olive", "checker")
    r = ev.score_clip(world.render(spec), spec)
    assert r["all_ok"], r
    swapped = world.ClipSpec((dataclasses.replace(a, motion="rotate"), b), "olive")
    assert not ev.score_clip(world.render(spec), swapped)["all_ok"]


def test_prompt_set_is_fixed_with_enough_heldout():
    prompts = ev.prompt_set(seed=0, n=200)
    assert len(prompts) == 200
    assert sum(p.heldout for p in prompts) >= 40
    assert all(p.heldout == p.spec.heldout for p in prompts)
    assert len({p.seed for p in prompts}) == 200
    again = ev.prompt_set(seed=0, n=200)
    assert [p.caption for p in again] == [p.caption for p in prompts]
    assert ev.prompt_set(seed=1, n=5)[0].caption != prompts[0].caption


def test_evaluate_generator_results_and_table():
    prompts = ev.prompt_set(seed=2, n=12)
    calls = []

    def generate(caption, seed):
        calls.append((caption, seed))
        return ev.ground_truth_fn(prompts)(caption, seed)

    results = ev.evaluate_generator(generate, prompts)
    assert [c for c, _ in calls] == [p.caption for p in prompts]
    assert results["summary"]["all"]["prompts"] == 12
    assert results["summary"]["all"]["all"] == 1.0
    json.dumps(results, allow_nan=False)
    table = ev.format_table(results)
    for word in ("colour", "shape", "motion", "speed", "seen", "heldout", "flicker"):
        assert word in table

    def broken(caption, seed):  # a generator that ignores the prompt
        return torch.full((16, 64, 64, 3), 0.1)

    bad = ev.evaluate_generator(broken, prompts)["summary"]["all"]
    assert bad["all"] == 0.0 and bad["presence"] == 0.0
    assert results["summary"]["all"]["mistakes"] == {"colour": {}, "shape": {}, "motion": {}}
    asked = {o.motion for p in prompts for o in p.spec.objects}
    assert set(results["summary"]["all"]["by_motion"]) == asked and set(bad["by_motion"]) == asked
    assert all(v == 1.0 for v in results["summary"]["all"]["by_motion"].values())
    assert all(v == 0.0 for v in bad["by_motion"].values()) and all(v == 0.0 for v in bad["by_objects"].values())
    assert set(results["summary"]["all"]["by_objects"]) == {str(len(p.spec.objects)) for p in prompts}
    assert "motion by kind" in table and "all by objects" in table
    assert bad["mistakes"]["colour"] and all(k.endswith("-> none") for k in bad["mistakes"]["colour"])

    def spotted(caption, seed):  # the right clip plus a still white spot in a corner
        frames = ev.ground_truth_fn(prompts)(caption, seed).clone()
        frames[:, 1:7, 1:7] = 1.0
        return frames

    spots = ev.evaluate_generator(spotted, prompts)["summary"]["all"]
    assert results["summary"]["all"]["extra_objects"] == 0.0 and spots["extra_objects"] >= 0.75
    assert "extra objects" in table


def test_cli_ground_truth_and_strip(tmp_path, capsys):
    out, strip = tmp_path / "gt.json", tmp_path / "strip.png"
    assert ev.main(["--ground-truth", "--n", "8", "--out", str(out), "--strip", str(strip), "--strip-count", "3"]) == 0
    results = json.loads(out.read_text())
    assert results["summary"]["all"]["prompts"] == 8 and results["config"]["source"] == "ground truth"
    assert "prompt (all)" in capsys.readouterr().out
    with Image.open(strip) as im:
        assert im.width > 16 * 64 and im.height > 3 * 64


def test_save_strip(tmp_path):
    videos = [torch.rand(8, 32, 32, 3), np.zeros((8, 32, 32, 3))]
    ev.save_strip(tmp_path / "s.png", videos, ["one", "two"], every=2, scale=1)
    with Image.open(tmp_path / "s.png") as im:
        assert im.size == (4 * 34 + 2, 2 * (32 + 14 + 2) + 2)


@pytest.fixture
def tiny_model(tmp_path):
    """A tiny random full MagicVideo file (UNet, VAE, built-in text encoder)."""
    from magicvideo.models.checkpoint import save_model
    from magicvideo.models.text import TextConfig, TextEncoder
    from magicvideo.models.unet import UNetConfig, VideoUNet
    from magicvideo.models.vae import VAEConfig, VideoVAE

    torch.manual_seed(0)
    unet = VideoUNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                                num_heads=2, context_dim=16, max_frames=8))
    vae = VideoVAE(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, temporal_layers=1, temporal_head_dim=16))
    text = TextEncoder(TextConfig(**world.text_fields(), width=16, layers=1, heads=2))
    return str(save_model(tmp_path / "tiny.safetensors", unet=unet, vae=vae, text_encoder=text))


def test_model_glue_runs_a_tiny_full_model(tiny_model):
    """The evaluator's bridge to checkpoint + sampler + VAE, on a tiny random model."""
    path = tiny_model
    generate = ev.model_generate_fn(str(path), frames=8, size=16, options=QUICK)
    frames = generate("a red ball moving left", 3)
    assert frames.shape == (8, 16, 16, 3) and 0 <= frames.min() and frames.max() <= 1
    assert torch.equal(frames, generate("a red ball moving left", 3))  # seeded: each prompt's seed is used ...
    assert not torch.equal(frames, generate("a red ball moving left", 4))
    assert torch.equal(frames, ev.model_generate_fn(str(path), frames=8, size=16, options=QUICK.replace(seed=9))(
        "a red ball moving left", 3))  # ... in place of the options' own
    latents = ev.model_generate_fn(str(path), frames=8, size=16, options=QUICK, latents_only=True)("a red ball", 3)
    assert latents.shape == (8, 4, 8, 8)
    # the options reach the sampler: motion guidance steers this prompt, and is refused where it cannot work
    steered = ev.model_generate_fn(str(path), frames=8, size=16, options=QUICK.replace(motion_guidance=0.2))
    assert not torch.allclose(steered("a red ball moving left", 3), frames, atol=1e-4)
    with pytest.raises(ValueError, match="motion guidance needs cross-attention blocks of at least 8x8"):
        ev.model_generate_fn(str(path), frames=8, size=8, options=QUICK.replace(motion_guidance=0.2))(
            "a red ball moving left", 3)
    r = ev.evaluate_generator(generate, ev.prompt_set(n=2))
    assert r["summary"]["all"]["prompts"] == 2


def test_from_truth_starts_from_the_prompts_own_clip(tiny_model):
    """--from-truth 0 is exactly the VAE round trip of the world clip; a strength in between
    keeps the truth's layout more than sampling from pure noise does; out of range is refused."""
    from magicvideo.models.checkpoint import load_model

    prompts = ev.prompt_set(n=2)
    p = prompts[0]
    kw = dict(frames=8, size=16, options=QUICK.replace(steps=4))
    vae = load_model(tiny_model).vae
    clip = world.render(p.spec, 8, 16)
    with torch.no_grad():
        round_trip = ((vae.decode(vae.encode(clip.permute(0, 3, 1, 2) * 2 - 1), num_frames=8) + 1) / 2).clamp(0, 1)
    at0 = ev.model_generate_fn(tiny_model, from_truth=0.0, prompts=prompts, **kw)(p.caption, p.seed)
    assert torch.allclose(at0, round_trip.permute(0, 2, 3, 1), atol=1e-5)

    def distance(strength):
        frames = ev.model_generate_fn(tiny_model, from_truth=strength, prompts=prompts, **kw)(p.caption, p.seed)
        return (frames - at0).abs().mean().item()

    assert 0 < distance(0.5) < distance(1.0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        ev.model_generate_fn(tiny_model, from_truth=1.5, prompts=prompts, **kw)
    with pytest.raises(ValueError, match="need the prompts being scored"):
        ev.model_generate_fn(tiny_model, from_truth=0.5, **kw)
    with pytest.raises(SystemExit):
        ev.main(["--model", tiny_model, "--from-truth", "2"])


def test_given_frames_scores_image_to_video(tiny_model):
    """--given-frames K: the prompt's own first K world frames are given to an image-first model."""
    from magicvideo.models import checkpoint

    bundle = checkpoint.load_model(tiny_model)
    bundle.unet.config.image_first = True
    path = tiny_model.replace("tiny", "tiny_i2v")
    checkpoint.save_model(path, unet=bundle.unet, vae=bundle.vae, text_encoder=bundle.text_encoder)
    prompts = ev.prompt_set(n=2)
    p = prompts[0]
    generate = ev.model_generate_fn(path, frames=8, size=16, options=QUICK, given_frames=1, prompts=prompts)
    frames = generate(p.caption, p.seed)
    with torch.no_grad():
        first = world.render(p.spec, 8, 16)[:1].permute(0, 3, 1, 2) * 2 - 1
        expected = ((bundle.vae.decode(bundle.vae.encode(first), num_frames=1) + 1) / 2).clamp(0, 1)
    assert torch.allclose(frames[0], expected[0].permute(1, 2, 0), atol=1e-5)  # frame 0 is the world's
    with pytest.raises(ValueError, match="two different diagnostics"):
        ev.model_generate_fn(path, given_frames=1, from_truth=0.5, prompts=prompts)
    with pytest.raises(ValueError, match="given_frames must be at least 0, got -1"):  # not "all but the last"
        ev.model_generate_fn(path, given_frames=-1, prompts=prompts)


def test_window_drift():
    obj = world.ObjectSpec("cyan", "triangle", "still", None, 0.5, 0.5, 0.15)
    steady = world.render(world.ClipSpec((obj,), "grey"), frames=48)
    d = ev.window_drift(steady, window=16)
    assert len(d["windows"]) == 3 and d["kept_colour"] and d["kept_shape"]
    assert d["max_background_drift"] == 0.0 and d["windows"][2]["size_drift"] == pytest.approx(0.0)
    drifting = steady.clone()
    drifting[32:] = world.render(world.ClipSpec((dataclasses.replace(obj, shape="square", colour="blue"),), "black"), frames=16)
    d = ev.window_drift(drifting, window=16)
    assert not d["kept_colour"] and not d["kept_shape"] and d["max_background_drift"] > 0.1


def test_shards_merge_into_exactly_the_unsharded_run(tiny_model, tmp_path, capsys):
    """--shard I/N scores every N-th prompt (N processes share a set, e.g. on one GPU);
    --merge joins their files into what one whole run writes."""
    common = ["--model", tiny_model, "--n", "5", "--frames", "8", "--size", "16", "--steps", "2",
              "--motion-guidance", "0.2"]
    whole = tmp_path / "whole.json"
    assert ev.main(common + ["--out", str(whole)]) == 0
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"part{i}.json")
        assert ev.main(common + ["--shard", f"{i}/2", "--out", str(parts[i])]) == 0
    assert [len(json.loads(p.read_text())["prompts"]) for p in parts] == [3, 2]
    merged = tmp_path / "merged.json"
    assert ev.main(["--merge", str(parts[1]), str(parts[0]), "--out", str(merged)]) == 0
    assert json.loads(merged.read_text()) == json.loads(whole.read_text())

    capsys.readouterr()
    assert ev.main(["--merge", str(parts[0]), "--out", str(tmp_path / "x.json")]) == 2
    assert "expected shards 0/1 .. 0/1 once each, found 0/2" in capsys.readouterr().err
    other = json.loads(parts[1].read_text())
    other["config"]["cfg"] = 3.0
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert ev.main(["--merge", str(parts[0]), str(tmp_path / "other.json"), "--out", str(tmp_path / "x.json")]) == 2
    assert "the shards were run with different settings: ['cfg']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(common + ["--shard", "2/2"])
