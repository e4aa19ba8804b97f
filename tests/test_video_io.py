"""models/video_io.py without a host: round trips, metadata, odd sizes, bad input, bounded reads."""

import math

import numpy as np
import pytest
import torch

from host_nodes.magicvideo_testkit import moving_pattern
from magicvideo.models import video_io
from magicvideo.models.video_io import VideoError


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return moving_pattern(16, 48, 64)


@pytest.mark.parametrize("fps", [8.0, 12.5, 24.0, 30000 / 1001])
def test_mp4_round_trip_is_exact_in_count_size_fps_and_close_in_pixels(tmp_path, clip, fps):
    path = tmp_path / "clip.mp4"
    written = video_io.write_video(path, clip, fps, "mp4")
    decoded = video_io.read_video(path)

    assert (written.frames, written.width, written.height, written.notes) == (16, 64, 48, [])
    assert decoded.frames.shape == (16, 48, 64, 3)
    assert decoded.fps == pytest.approx(fps, rel=1e-9)
    assert psnr(decoded.frames, video_io.frames_to_uint8(clip)) > 35


def test_webm_round_trip(tmp_path, clip):
    path = tmp_path / "clip.webm"
    video_io.write_video(path, clip, 12.5, "webm")
    decoded = video_io.read_video(path)
    assert decoded.frames.shape == (16, 48, 64, 3)
    assert decoded.fps == pytest.approx(12.5)
    assert psnr(decoded.frames, video_io.frames_to_uint8(clip)) > 33


@pytest.mark.parametrize("fmt, fps, expect_fps", [("gif", 10.0, 10.0), ("gif", 8.0, 100 / 12), ("webp", 8.0, 8.0)])
def test_animated_images_keep_frames_and_size(tmp_path, clip, fmt, fps, expect_fps):
    path = tmp_path / f"clip.{fmt}"
    video_io.write_video(path, clip, fps, fmt)
    decoded = video_io.read_video(path)
    assert decoded.frames.shape == (16, 48, 64, 3)
    assert decoded.fps == pytest.approx(expect_fps)  # gif stores 1/100 s steps: 125 ms -> 120 ms
    assert psnr(decoded.frames, video_io.frames_to_uint8(clip)) > 25  # 256-colour palettes / lossy webp


@pytest.mark.parametrize("fmt", ["gif", "webp"])
@pytest.mark.parametrize("fps", [8.0, 12.5, 25.0])
def test_identical_frames_merged_by_animated_image_encoders_come_back(tmp_path, fmt, fps):
    """Pillow/libwebp store runs of identical frames as one longer frame; reading expands them."""
    frames = torch.cat([torch.full((5, 16, 16, 3), 0.2), torch.full((4, 16, 16, 3), 0.8), torch.rand(2, 16, 16, 3)])
    video_io.write_video(tmp_path / f"runs.{fmt}", frames, fps, fmt)
    decoded = video_io.read_video(tmp_path / f"runs.{fmt}")
    assert len(decoded.frames) == 11
    assert decoded.frames[:5, 0, 0, 0].tolist() == [51] * 5 and decoded.frames[5:9, 0, 0, 0].tolist() == [204] * 4


@pytest.mark.parametrize("fmt", list(video_io.FORMATS))
def test_prompt_and_workflow_are_embedded(tmp_path, clip, fmt):
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64}}}
    workflow = {"nodes": [{"id": 1, "type": "EmptyImage"}], "links": [], "note": "ünïcode ✓"}
    path = tmp_path / f"clip.{fmt}"
    video_io.write_video(path, clip[:3], 8, fmt, metadata={"prompt": prompt, "workflow": workflow})
    assert video_io.read_metadata(path) == {"prompt": prompt, "workflow": workflow}


def test_no_metadata_means_none_embedded(tmp_path, clip):
    path = tmp_path / "clip.mp4"
    video_io.write_video(path, clip[:2], 8, "mp4", metadata=None)
    assert video_io.read_metadata(path) == {}


@pytest.mark.parametrize("policy, size", [("pad", (50, 66)), ("crop", (48, 64))])
def test_odd_sizes_for_h264_are_fixed_with_a_note(tmp_path, policy, size):
    frames = moving_pattern(3, 49, 65)
    written = video_io.write_video(tmp_path / "odd.mp4", frames, 8, "mp4", odd_size=policy)
    assert (written.height, written.width) == size
    assert len(written.notes) == 1 and "65x49" in written.notes[0] and policy[:3] in written.notes[0]
    decoded = video_io.read_video(tmp_path / "odd.mp4")
    assert decoded.frames.shape[1:3] == size
    # the original pixels survive where they exist
    assert psnr(decoded.frames[:, :48, :64], video_io.frames_to_uint8(frames)[:, :48, :64]) > 35


def test_one_pixel_wide_frames_are_padded_even_when_crop_is_asked(tmp_path):
    written = video_io.write_video(tmp_path / "thin.mp4", torch.rand(2, 7, 1, 3), 8, "mp4", odd_size="crop")
    assert (written.width, written.height) == (2, 8)


def test_webm_keeps_odd_sizes(tmp_path):
    written = video_io.write_video(tmp_path / "odd.webm", moving_pattern(3, 49, 65), 8, "webm")
    assert (written.width, written.height, written.notes) == (65, 49, [])
    assert video_io.read_video(tmp_path / "odd.webm").frames.shape == (3, 49, 65, 3)


def test_a_list_of_batches_becomes_one_video_and_uint8_numpy_is_accepted(tmp_path):
    batches = [moving_pattern(2, 32, 32), video_io.frames_to_uint8(moving_pattern(3, 32, 32)), torch.rand(32, 32, 3)]
    written = video_io.write_video(tmp_path / "list.mp4", batches, 8, "mp4")
    assert written.frames == 6
    assert video_io.read_video(tmp_path / "list.mp4").frames.shape == (6, 32, 32, 3)


def test_alpha_is_dropped(tmp_path):
    written = video_io.write_video(tmp_path / "rgba.mp4", torch.rand(2, 16, 16, 4), 8, "mp4")
    assert written.frames == 2


# ----------------------------------------------------------------------------- bad input


BAD_WRITES = {
    "zero frames": (dict(frames=torch.zeros(0, 16, 16, 3)), "zero frames"),
    "empty list": (dict(frames=[]), "zero frames"),
    "mixed sizes": (dict(frames=[torch.rand(2, 16, 16, 3), torch.rand(1, 16, 24, 3)]), "one size"),
    "fps zero": (dict(fps=0), "fps above 0"),
    "fps negative": (dict(fps=-5), "fps above 0"),
    "fps nan": (dict(fps=float("nan")), "fps above 0"),
    "fps inf": (dict(fps=float("inf")), "fps above 0"),
    "fps text": (dict(fps="fast"), "fps as a number"),
    "unknown format": (dict(format="avi"), "expected one of mp4, webm, gif, webp"),
    "unknown odd_size": (dict(odd_size="stretch"), "odd_size"),
    "grey frames": (dict(frames=torch.rand(2, 16, 16, 1)), "3 channels"),
    "flat tensor": (dict(frames=torch.rand(16, 16)), "shape"),
    "not a tensor": (dict(frames=["frame"]), "tensors"),
}


@pytest.mark.parametrize("case", list(BAD_WRITES))
def test_bad_writes_raise_a_clear_error_and_leave_no_file(tmp_path, case):
    changes, expected = BAD_WRITES[case]
    args = dict(frames=torch.rand(2, 16, 16, 3), fps=8.0, format="mp4", odd_size="pad") | changes
    with pytest.raises(VideoError, match=expected) as info:
        video_io.write_video(tmp_path / "out.mp4", args["frames"], args["fps"], args["format"], odd_size=args["odd_size"])
    assert isinstance(info.value, ValueError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_a_failure_while_encoding_removes_the_partial_file(tmp_path, monkeypatch, fmt):
    calls = {"n": 0}
    real = video_io.frames_to_uint8

    def failing(frame):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(frame)

    monkeypatch.setattr(video_io, "frames_to_uint8", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        video_io.write_video(tmp_path / f"out.{fmt}", torch.rand(5, 16, 16, 3), 8, fmt)
    assert list(tmp_path.iterdir()) == []


def test_writing_never_clobbers_with_a_partial_file(tmp_path):
    target = tmp_path / "out.mp4"
    video_io.write_video(target, torch.rand(2, 16, 16, 3), 8, "mp4")
    before = target.read_bytes()
    with pytest.raises(VideoError):
        video_io.write_video(target, torch.rand(0, 16, 16, 3), 8, "mp4")
    assert target.read_bytes() == before


def test_non_video_files_are_refused_clearly(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("these are not frames")
    with pytest.raises(VideoError, match="could not be opened"):
        video_io.read_video(text)


def test_truncated_video_is_refused_clearly(tmp_path, clip):
    good = tmp_path / "good.mp4"
    video_io.write_video(good, clip, 8, "mp4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(VideoError, match="cut.mp4"):
        video_io.read_video(cut)


def test_missing_file_and_fake_webp(tmp_path):
    with pytest.raises(VideoError, match="found nothing"):
        video_io.read_video(tmp_path / "nope.mp4")
    (tmp_path / "fake.webp").write_bytes(b"RIFF0000WEBPjunk")
    with pytest.raises(VideoError, match="could not be opened"):
        video_io.read_video(tmp_path / "fake.webp")


# ----------------------------------------------------------------------------- reading options


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    video_io.write_video(path, moving_pattern(30, 32, 32), 10, "mp4", crf=0)
    return path, video_io.read_video(path).frames


@pytest.mark.parametrize("cap, skip, nth", [(0, 0, 1), (5, 0, 1), (0, 7, 1), (0, 0, 4), (4, 3, 5), (100, 29, 1)])
def test_cap_skip_and_every_nth_pick_the_right_frames(long_clip, cap, skip, nth):
    path, full = long_clip
    decoded = video_io.read_video(path, frame_cap=cap, skip_first=skip, every_nth=nth)
    expected = full[skip::nth][: cap or None]
    assert np.array_equal(decoded.frames, expected)
    assert decoded.fps == pytest.approx(10 / nth)
    assert decoded.source_fps == pytest.approx(10)


@pytest.mark.parametrize("kwargs", [dict(skip_first=30), dict(skip_first=1000, every_nth=3)])
def test_selecting_no_frames_is_a_clear_error(long_clip, kwargs):
    with pytest.raises(VideoError, match="has 30 frame"):
        video_io.read_video(long_clip[0], **kwargs)


@pytest.mark.parametrize("kwargs", [dict(frame_cap=-1), dict(skip_first=-1), dict(every_nth=0)])
def test_bad_read_options(long_clip, kwargs):
    with pytest.raises(VideoError, match="expected frame_cap"):
        video_io.read_video(long_clip[0], **kwargs)


def test_decoding_stops_at_the_cap(long_clip, monkeypatch):
    """Memory is bounded by the cap: no frame past it is decoded or kept."""
    seen = []
    real = video_io._select

    def spy(frames, *args):
        def counted():
            for frame in frames:
                seen.append(1)
                yield frame
        return real(counted(), *args)

    monkeypatch.setattr(video_io, "_select", spy)
    decoded = video_io.read_video(long_clip[0], frame_cap=3, skip_first=2, every_nth=2)
    assert len(decoded.frames) == 3
    assert len(seen) == 2 + 2 * 2 + 1  # frames 0..6 pulled from the decoder, none after frame 6
    assert decoded.frames.base is not None and decoded.frames.base.shape[0] == 3  # one buffer of cap frames


def test_list_videos_offers_only_video_files(tmp_path):
    for name in ["b.mp4", "a.webm", "c.GIF", "notes.txt", ".hidden.mp4", "d.webp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.mp4").mkdir()
    assert video_io.list_videos(tmp_path) == ["a.webm", "b.mp4", "c.GIF", "d.webp"]
    assert video_io.list_videos(tmp_path / "missing") == []


def test_frame_conversions():
    frames = torch.tensor([[[[0.0, 0.5, 1.0]]], [[[-1.0, 2.0, 0.2]]]])
    as_uint8 = video_io.frames_to_uint8(frames)
    assert as_uint8.dtype == np.uint8 and as_uint8.tolist() == [[[[0, 128, 255]]], [[[0, 255, 51]]]]
    back = video_io.frames_to_float(as_uint8)
    assert back.dtype == torch.float32 and back.shape == (2, 1, 1, 3) and float(back.max()) == 1.0
    assert video_io.fps_fraction(29.97) == video_io.Fraction(2997, 100)
