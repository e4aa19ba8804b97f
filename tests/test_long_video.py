"""models/long_video.py: the prompt schedule and its errors, window plans for any length,
seeded windows on a tiny random model with image-prior channels, and the streaming writer
against the whole-tensor path."""

from __future__ import annotations

import pytest
import torch

from magicvideo.models import long_video as lv
from magicvideo.models import sampling, video_io, world
from magicvideo.models.text import TextConfig, TextEncoder
from magicvideo.models.unet import UNetConfig, VideoUNet
from magicvideo.models.vae import VAEConfig, VideoVAE
from tiny_models import awake

WIDTH = 16
FAST = sampling.PRESETS["main"].replace(steps=2, motion_guidance=0.0)



@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    unet = awake(VideoUNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                                       num_heads=2, context_dim=WIDTH, max_frames=8, cond_channels=5)))
    vae = awake(VideoVAE(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_head_dim=16)))
    text = awake(TextEncoder(TextConfig(**world.text_fields(), width=WIDTH, layers=1, heads=2)))
    return unet, vae, text


# ----------------------------------------------------------------------------- schedule


def test_schedule_ranges_as_typed():
    spans = lv.parse_schedule("0-10: a red circle moving to the left\n\n# then\n10 s - 20 s: a red circle moving up\n"
                              "20-end: a red circle", 30)
    assert [(s.start, s.end, s.prompt) for s in spans] == [
        (0, 10, "a red circle moving to the left"), (10, 20, "a red circle moving up"), (20, 30, "a red circle")]
    assert lv.parse_schedule("a blue square moving up", 60) == [lv.Span(0.0, 60.0, "a blue square moving up")]
    assert lv.parse_schedule("0-2.5: a\n2.5-5: b", 5)[1] == lv.Span(2.5, 5.0, "b")


@pytest.mark.parametrize("text, seconds, message", [
    ("", 10, "empty"),
    ("0-5: a red circle\n6-10: a red circle", 10, r"line 2: a gap between 5 s and 6 s"),
    ("0-5: a red circle\n4-10: a red circle", 10, r"line 2: an overlap between 5 s and 4 s"),
    ("2-10: a red circle", 10, r"line 1: a gap between 0 s and 2 s"),
    ("0-5: a red circle", 10, "ends at 5 s but the video lasts 10 s"),
    ("0-20: a red circle", 10, "runs to 20 s but the video lasts 10 s"),
    ("0-5: a red circle\nthen a blue one", 10, "line 2: expected 'START-END: prompt'"),
    ("0-5:\n5-10: a red circle", 10, "line 1: the range 0-5 s has no prompt"),
    ("5-5: a red circle", 10, "must end after it starts"),
    ("a red circle", 0, "more than 0 seconds"),
])
def test_schedule_errors_name_the_line(text, seconds, message):
    with pytest.raises(lv.ScheduleError, match=message):
        lv.parse_schedule(text, seconds)


def test_a_window_between_two_prompts_blends_them():
    spans = lv.parse_schedule("0-1: a\n1-2: b", 2)
    assert lv.window_weights(spans, range(0, 8), 8) == [1.0, 0.0]
    assert lv.window_weights(spans, range(4, 12), 8) == [0.5, 0.5]
    assert lv.window_weights(spans, range(12, 16), 8) == [0.0, 1.0]


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("total", [1, 5, 16, 17, 28, 29, 100, 480])
@pytest.mark.parametrize("window, overlap", [(16, 4), (8, 1), (5, 4), (16, 8)])
def test_windows_cover_every_frame_once(total, window, overlap):
    cont = lv.plan_windows(total, window, overlap, "continue")
    made = [i for w in cont for i in w.new]
    assert made == list(range(total))  # every keyframe made exactly once, in order
    for before, after in zip(cont, cont[1:]):  # each window continues from the last frames of the one before
        assert after.given == overlap and after.start == before.end - overlap
    assert all(1 <= w.frames <= window and w.frames > w.given for w in cont)
    fusion = lv.plan_windows(total, window, overlap, "fusion")
    assert fusion[0].start == 0 and fusion[-1].end == total
    assert all(w.frames == min(window, total) for w in fusion)
    assert all(b.start - a.start <= window - overlap for a, b in zip(fusion, fusion[1:]))
    independent = lv.plan_windows(total, window, overlap, "independent")
    assert [i for w in independent for i in w.new] == list(range(total))


@pytest.mark.parametrize("args, message", [
    ((32, 16, 16, "continue"), "less than the window"),
    ((32, 16, -1, "continue"), "at least 0"),
    ((32, 16, 0, "continue"), "at least 1 frame"),
    ((32, 0, 0, "fusion"), "at least one frame"),
    ((0, 16, 4, "continue"), "at least one keyframe"),
    ((32, 16, 4, "slide"), "one of continue, fusion, independent"),
])
def test_window_errors(args, message):
    with pytest.raises(ValueError, match=message):
        lv.plan_windows(*args)


def test_errors_before_any_step(tiny):
    unet, _, text = tiny
    spans = lv.parse_schedule("a red circle", 2)
    steps = []

    def count(step, total, x0):
        steps.append(step)

    with pytest.raises(ValueError, match="longer than this model takes"):
        lv.sample_long_video(unet, text, spans, frames=16, latent_size=(4, 4), window=12, overlap=2, options=FAST,
                             callback=count)
    with pytest.raises(ValueError, match="blorp"):
        lv.sample_long_video(unet, text, lv.parse_schedule("0-1: a red circle\n1-2: a blorp square", 2), frames=16,
                             latent_size=(4, 4), window=8, overlap=2, options=FAST, callback=count)
    plain = VideoUNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                                 num_heads=2, context_dim=WIDTH, max_frames=8))
    with pytest.raises(ValueError, match="not trained to take given frames"):
        lv.sample_long_video(plain, text, spans, frames=16, latent_size=(4, 4), window=8, overlap=2, options=FAST)
    assert steps == []


@pytest.mark.parametrize("method", lv.METHODS)
def test_same_seed_same_video_and_given_frames_kept(tiny, method):
    unet, _, text = tiny
    spans = lv.parse_schedule("0-1: a red circle moving to the left\n1-end: a red circle moving up", 2)
    steps = []

    def run(seed):
        return lv.sample_long_video(unet, text, spans, frames=13, latent_size=(4, 4), window=6, overlap=2,
                                    method=method, options=FAST.replace(seed=seed),
                                    callback=lambda s, total, x0: steps.append((s, total)))

    a = run(3)
    assert a.shape == (13, 4, 4, 4) and torch.isfinite(a).all() and a.abs().sum(dim=(1, 2, 3)).min() > 0
    assert torch.equal(a, run(3))
    assert not torch.allclose(a, run(4))
    windows = lv.plan_windows(13, 6, 2, method)
    total = FAST.steps * (len(windows) if method != "fusion" else 1)
    assert steps[-1] == (total, total)


def test_a_cancel_inside_a_window_stops(tiny):
    unet, _, text = tiny

    def stop(step, total, x0):
        if step > 3:
            raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        lv.sample_long_video(unet, text, lv.parse_schedule("a red circle", 2), frames=16, latent_size=(4, 4),
                             window=6, overlap=2, options=FAST, callback=stop)


# ----------------------------------------------------------------------------- streaming


def test_bounded_context_decodes_the_same_in_any_chunks(tiny):
    _, vae, _ = tiny
    z = torch.randn(20, 4, 4, 4)
    with torch.no_grad():
        whole = vae.decode(z, 20, chunk_size=None, context=6)
        chunked = torch.cat(list(vae.decode_chunks(z / vae.config.scaling_factor, 20, 7, 6)))
        unbounded = vae.decode(z, 20, chunk_size=None)
        short = vae.decode(z[:6], 6, chunk_size=None)
        short_bounded = vae.decode(z[:6], 6, chunk_size=4, context=6)
    assert (whole - chunked).abs().max() < 1e-4
    assert (whole[:6] - unbounded[:6]).abs().max() < 1e-4  # within the context nothing changes
    assert (whole[6:] - unbounded[6:]).abs().max() > 1e-4  # beyond it, frames see less of the past
    assert (short - short_bounded).abs().max() < 1e-4


def test_streamed_file_equals_the_whole_tensor_path(tiny, tmp_path):
    _, vae, _ = tiny
    z = torch.randn(12, 4, 4, 4)
    chunks = []
    written = lv.write_long_video(tmp_path / "stream.mp4", vae, z, 8, chunk_size=5, context=16,
                                  metadata={"prompt": {"1": "x"}}, on_chunk=lambda done, total: chunks.append(done))
    assert written.frames == 12 and chunks == [0, 5, 10, 12]
    with torch.no_grad():
        whole = ((vae.decode(z, 12, chunk_size=None).float() + 1) / 2).clamp(0, 1).movedim(1, -1)
        streamed = torch.cat(list(lv.decode_stream(vae, z, chunk_size=5, context=16)))
    assert (streamed - whole).abs().max() < 1e-4  # chunk by chunk = all at once
    video_io.write_video(tmp_path / "whole.mp4", whole, 8)
    a = video_io.read_video(tmp_path / "stream.mp4").frames
    b = video_io.read_video(tmp_path / "whole.mp4").frames
    assert a.shape == b.shape == (12, 32, 32, 3)
    assert abs(a.astype(float) - b.astype(float)).mean() < 1.0  # the same frames, through a lossy codec
    assert video_io.read_metadata(tmp_path / "stream.mp4")["prompt"] == {"1": "x"}


def test_a_stream_that_fails_midway_leaves_no_file(tmp_path):
    def frames():
        yield torch.zeros(4, 16, 16, 3)
        yield torch.zeros(4, 16, 24, 3)

    with pytest.raises(video_io.VideoError, match="frame 4 is 24x16"):
        video_io.write_video(tmp_path / "bad.mp4", frames(), 8)

    def cancelled():
        yield torch.zeros(4, 16, 16, 3)
        raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        video_io.write_video(tmp_path / "cancelled.mp4", cancelled(), 8)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- in the host


def _minute_workflow():
    import json
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parents[1] / "workflows" / "minute_video.json").read_text())


SHORT = "0-4: a red circle moving to the right\n4-8: a red circle moving to the left\n8-end: a red circle bouncing"


@pytest.mark.host
def test_the_minute_workflow_runs_in_the_host(comfy):
    """workflows/minute_video.json with a 12-second schedule (the full minute is measured by
    scripts/long_video_report.py through the same library call): windows continuing each
    other, written chunk by chunk into one mp4 with the workflow embedded."""
    workflow = _minute_workflow()
    prompt = comfy.workflow_to_prompt(workflow)
    [sampler] = [n["inputs"] for n in prompt.values() if n["class_type"] == "MagicVideoSlidingWindowSampler"]
    spans = lv.parse_schedule(sampler["schedule"], sampler["seconds"])
    assert sampler["seconds"] == 60 and len(spans) > 1 and sampler["method"] == "continue"
    sampler.update(schedule=SHORT, seconds=12.0)
    entry = comfy.run(prompt, workflow=workflow, timeout=900)
    [info] = comfy.output_files(entry)
    path = comfy.output_path(info)
    video = video_io.read_video(path)
    assert video.frames.shape == (96, 64, 64, 3) and video.fps == pytest.approx(8.0)
    assert video.frames[::12].std(axis=(1, 2, 3)).min() > 2, "a window came out one flat colour"
    assert video_io.read_metadata(path)["workflow"]["nodes"] == workflow["nodes"]


@pytest.mark.host
@pytest.mark.parametrize("change, message", [
    ({"schedule": "0-10: a red circle\n12-60: a red circle"}, "line 2: a gap between 10 s and 12 s"),
    ({"schedule": "0-60: a red blorp"}, "blorp"),
    ({"overlap": 16}, "less than the window"),
    ({"window": 40}, "longer than this model takes"),
    ({"width": 60}, "multiples of 8"),
])
def test_bad_settings_are_clear_errors_before_sampling(comfy, change, message):
    workflow = _minute_workflow()
    prompt = comfy.workflow_to_prompt(workflow)
    [sampler] = [n for n in prompt.values() if n["class_type"] == "MagicVideoSlidingWindowSampler"]
    sampler["inputs"].update(change)
    assert message in comfy.run_expect_error(prompt)
