"""Save Video and Load Video in a real ComfyUI, mixed with core nodes."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from magicvideo.models import video_io

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = {"nodes": [{"id": 1, "type": "EmptyImage"}], "links": [], "extra": {"tag": "from the test"}}


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def save_node(images, *, fps=8.0, fmt="mp4", crf=19, odd_size="pad", prefix="tests/video"):
    return {"class_type": "MagicVideoSaveVideo", "inputs": {
        "images": images, "fps": fps, "format": fmt, "crf": crf, "odd_size": odd_size, "filename_prefix": prefix}}


def load_node(video, *, cap=0, skip=0, nth=1):
    return {"class_type": "MagicVideoLoadVideo", "inputs": {
        "video": video, "frame_cap": cap, "skip_first": skip, "every_nth": nth}}


def frames_node(sizes="64x48", count=8, fps=8.0):
    return {"class_type": "TestMVFrames", "inputs": {"sizes": sizes, "count": count, "fps": fps}}


def only_file(comfy, entry, node_id):
    files = entry["outputs"][node_id]["images"]
    assert len(files) == 1
    return files[0], comfy.output_path(files[0])


def test_nodes_are_well_described(comfy):
    ours = {name: info for name, info in comfy.object_info.items() if name.startswith("MagicVideo")}
    assert {"MagicVideoSaveVideo", "MagicVideoLoadVideo"} <= set(ours)
    for name, info in ours.items():
        assert info["category"].startswith("MagicVideo/"), name
        assert info["description"].strip(), f"{name} has no DESCRIPTION"
        assert info["display_name"] != name and " " in info["display_name"], f"{name} needs a readable display name"
        for section in ("required", "optional"):
            for input_name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert ours["MagicVideoSaveVideo"]["output_node"] is True
    assert ours["MagicVideoSaveVideo"]["category"] == ours["MagicVideoLoadVideo"]["category"] == "MagicVideo/video"


@pytest.mark.parametrize("fmt", list(video_io.FORMATS))
def test_save_video_from_core_nodes(comfy, fmt):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 5, "color": 0x3366CC}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 24, "batch_size": 4, "color": 0xCC6633}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear",
                                                       "width": 64, "height": 48, "crop": "disabled"}},
        "4": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["3", 0]}},
        "5": save_node(["4", 0], fmt=fmt, fps=10.0, prefix=f"core/{fmt}"),
    }
    entry = comfy.run(prompt, workflow=WORKFLOW)
    info, path = only_file(comfy, entry, "5")
    assert info["type"] == "output" and info["subfolder"] == "core" and path.suffix == f".{fmt}"
    assert entry["outputs"]["5"]["animated"] == [True]
    decoded = video_io.read_video(path)
    assert decoded.frames.shape == (9, 48, 64, 3)
    assert np.abs(decoded.frames[0].astype(int).mean(axis=(0, 1)) - [0x33, 0x66, 0xCC]).max() < 6
    assert np.abs(decoded.frames[-1].astype(int).mean(axis=(0, 1)) - [0xCC, 0x66, 0x33]).max() < 6
    embedded = video_io.read_metadata(path)
    assert embedded["workflow"] == WORKFLOW
    assert embedded["prompt"]["5"]["class_type"] == "MagicVideoSaveVideo"
    assert comfy.view(info) == path.read_bytes()  # served to the UI as-is


def test_files_are_numbered_like_the_hosts_savers(comfy):
    prompts = [{"1": frames_node(count=n), "2": save_node(["1", 0], prefix="numbered/clip")} for n in (2, 3)]
    names = [only_file(comfy, comfy.run(prompt), "2")[0]["filename"] for prompt in prompts]
    assert names == ["clip_00001_.mp4", "clip_00002_.mp4"]


def test_round_trip_save_then_load(comfy):
    """frames -> Save Video -> Load Video: same count, size and fps; pixels within codec tolerance."""
    source = {"1": frames_node("64x48", count=12, fps=12.5),
              "2": save_node(["1", 0], fps=["1", 1], prefix="roundtrip/clip"),
              "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "roundtrip/source"}}}
    entry = comfy.run(source)
    _, video_path = only_file(comfy, entry, "2")
    originals = [np.asarray(Image.open(comfy.output_path(f))) for f in entry["outputs"]["3"]["images"]]
    assert len(originals) == 12

    name = comfy.upload(video_path, "roundtrip.mp4")
    back = {"1": load_node(name),
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "roundtrip/decoded"}},
            "3": save_node(["1", 0], fps=["1", 1], fmt="webm", prefix="roundtrip/again")}
    entry = comfy.run(back)
    decoded = [np.asarray(Image.open(comfy.output_path(f))) for f in entry["outputs"]["2"]["images"]]
    assert len(decoded) == 12 and decoded[0].shape == (48, 64, 3)
    assert min(psnr(a, b) for a, b in zip(decoded, originals)) > 35
    again = entry["outputs"]["3"]["images"][0]
    assert again["frame_rate"] == 12.5 and again["frame_count"] == 12  # the fps output is exact
    assert video_io.read_video(comfy.output_path(again)).fps == pytest.approx(12.5)


@pytest.mark.parametrize("cap, skip, nth, count, fps", [(0, 0, 1, 10, 10.0), (3, 0, 1, 3, 10.0), (0, 4, 1, 6, 10.0),
                                                        (0, 0, 3, 4, 10 / 3), (2, 1, 4, 2, 2.5)])
def test_load_video_options(comfy, cap, skip, nth, count, fps):
    source = comfy.run({"1": frames_node("32x32", count=10, fps=10.0), "2": save_node(["1", 0], fps=10.0, prefix="opts/src")})
    name = comfy.upload(only_file(comfy, source, "2")[1], "opts.mp4")
    entry = comfy.run({"1": load_node(name, cap=cap, skip=skip, nth=nth),
                       "2": save_node(["1", 0], fps=["1", 1], fmt="gif", prefix="opts/out")})
    info = entry["outputs"]["2"]["images"][0]
    assert info["frame_count"] == count
    assert info["frame_rate"] == pytest.approx(fps)


def test_an_image_list_becomes_one_video(comfy):
    entry = comfy.run({"1": frames_node("40x30,40x30,40x30", count=2), "2": save_node(["1", 0], fmt="webm", prefix="list/v")})
    info, path = only_file(comfy, entry, "2")
    assert info["frame_count"] == 6
    assert video_io.read_video(path).frames.shape == (6, 30, 40, 3)


@pytest.mark.parametrize("policy, size", [("pad", (50, 66)), ("crop", (48, 64))])
def test_odd_sizes_are_fixed_for_h264_with_a_note(comfy, policy, size):
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 65, "height": 49, "batch_size": 3, "color": 0}},
              "2": save_node(["1", 0], odd_size=policy, prefix="odd/v")}
    info, path = only_file(comfy, comfy.run(prompt), "2")
    assert "65x49" in " ".join(info["notes"])
    assert video_io.read_video(path).frames.shape[1:3] == size
    assert "65x49" in comfy.log_text()  # the note is logged too


def test_load_video_lists_input_videos(comfy):
    comfy.upload(b"not checked here", "listed.webm")
    comfy.upload(b"ignored", "listed.txt")
    options = comfy.refresh_object_info()["MagicVideoLoadVideo"]["input"]["required"]["video"]
    assert "listed.webm" in options[0] and "listed.txt" not in options[0]
    assert options[1].get("video_upload") is True


def test_the_demo_workflow_converts_and_runs(comfy):
    workflow = json.loads((REPO / "workflows" / "video_demo.json").read_text())
    entry = comfy.run(comfy.workflow_to_prompt(workflow), workflow=workflow)
    files = comfy.output_files(entry)
    assert [comfy.output_path(f).suffix for f in files] == [".mp4"]
    assert video_io.read_metadata(comfy.output_path(files[0]))["workflow"] == workflow


def test_a_loaded_image_becomes_a_video(comfy, tmp_path):
    still = tmp_path / "still.png"
    Image.fromarray(np.full((40, 56, 3), (200, 40, 90), np.uint8)).save(still)
    name = comfy.upload(still)
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
              "2": {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 6}},
              "3": save_node(["2", 0], fmt="webm", prefix="still/v")}
    info, path = only_file(comfy, comfy.run(prompt), "3")
    decoded = video_io.read_video(path)
    assert decoded.frames.shape == (6, 40, 56, 3)
    assert np.abs(decoded.frames.astype(int).mean(axis=(0, 1, 2)) - [200, 40, 90]).max() < 6
