"""Bad input through a real ComfyUI: a clear message through the host, no half-written file,
and the server keeps serving the next prompt."""

import pytest

pytestmark = pytest.mark.host


def save(images, fps=8.0, fmt="mp4"):
    return {"class_type": "MagicVideoSaveVideo", "inputs": {
        "images": images, "fps": fps, "format": fmt, "crf": 19, "odd_size": "pad", "filename_prefix": "bad/video"}}


def load(video, **options):
    inputs = {"video": video, "frame_cap": 0, "skip_first": 0, "every_nth": 1} | options
    return {"class_type": "MagicVideoLoadVideo", "inputs": inputs}


def frames(sizes="32x32", count=4, fps=8.0):
    return {"class_type": "TestMVFrames", "inputs": {"sizes": sizes, "count": count, "fps": fps}}


def files_under(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def inputs(comfy):
    """Files in the input folder: a good clip, a text file named .mp4, a truncated mp4."""
    good = comfy.run({"1": frames(count=6), "2": save(["1", 0])})
    clip = comfy.output_path(comfy.output_files(good)[0]).read_bytes()
    (comfy.input_dir.parent / "secret.mp4").write_bytes(clip)  # beside the input folder, not in it
    return {
        "good": comfy.upload(clip, "good.mp4"),
        "text": comfy.upload(b"just some words, not a video\n", "words.mp4"),
        "truncated": comfy.upload(clip[:300], "truncated.mp4"),
        "empty": comfy.upload(b"", "empty.webm"),
    }


def generate(prompt="a red ball moving left", **sampler):
    """The bundled default from a prompt to a saved video, with sampler settings changed."""
    settings = {"seed": 0, "steps": 2, "cfg": 6.0, "sampler": "euler", "scheduler": "normal", "fps": 8.0,
                "denoise": 1.0, "frames": 0} | sampler
    return {
        "m": {"class_type": "MagicVideoModelLoader", "inputs": {"model_name": "magicvideo_default.safetensors",
                                                                "sd15_checkpoint": "none", "motion_module": "none",
                                                                "dtype": "fp32"}},
        "p": {"class_type": "MagicVideoTextEncode", "inputs": {"text_encoder": ["m", 2], "text": prompt}},
        "n": {"class_type": "MagicVideoTextEncode", "inputs": {"text_encoder": ["m", 2], "text": ""}},
        "l": {"class_type": "MagicVideoEmptyLatent", "inputs": {"width": 64, "height": 64, "frames": 4, "batch": 1}},
        "s": {"class_type": "MagicVideoKeyframeSampler", "inputs": {"model": ["m", 0], "positive": ["p", 0],
                                                                    "negative": ["n", 0], "latent": ["l", 0],
                                                                    **settings}},
        "d": {"class_type": "MagicVideoVAEDecode", "inputs": {"vae": ["m", 1], "samples": ["s", 0], "frames": 0,
                                                              "chunk_size": 8}},
        "v": save(["d", 0]),
    }


CASES = {
    # name: (prompt builder, words the message must hold)
    "path outside the input folder": (lambda i: {"1": load("../secret.mp4"), "2": save(["1", 0])},
                                      ["outside", "input folder", "../secret.mp4"]),
    "absolute path": (lambda i: {"1": load("/etc/hostname"), "2": save(["1", 0])}, ["input folder", "/etc/hostname"]),
    "no such file": (lambda i: {"1": load("missing.mp4"), "2": save(["1", 0])}, ["no file", "missing.mp4"]),
    "a text file named .mp4": (lambda i: {"1": load(i["text"]), "2": save(["1", 0])}, ["expected a video", "words.mp4"]),
    "a truncated mp4": (lambda i: {"1": load(i["truncated"]), "2": save(["1", 0])}, ["truncated.mp4"]),
    "an empty file": (lambda i: {"1": load(i["empty"]), "2": save(["1", 0])}, ["expected a video", "empty.webm"]),
    "skipping every frame": (lambda i: {"1": load(i["good"], skip_first=50), "2": save(["1", 0])},
                             ["no frames", "has 6 frame", "skip_first=50"]),
    "zero frames to save": (lambda i: {"1": frames(count=0), "2": save(["1", 0])}, ["zero frames"]),
    "frames of mixed sizes": (lambda i: {"1": frames("32x32,48x32"), "2": save(["1", 0])},
                              ["one size", "32x32", "48x32"]),
    "fps 0 typed in": (lambda i: {"1": frames(), "2": save(["1", 0], fps=0.0)}, ["fps", "smaller than min"]),
    "fps -5 typed in": (lambda i: {"1": frames(), "2": save(["1", 0], fps=-5.0)}, ["fps", "smaller than min"]),
    "fps 0 from a link": (lambda i: {"1": frames(fps=0.0), "2": save(["1", 0], fps=["1", 1])}, ["fps above 0", "0.0"]),
    "fps -2 from a link": (lambda i: {"1": frames(fps=-2.0), "2": save(["1", 0], fps=["1", 1])}, ["fps above 0", "-2.0"]),
    "an unknown format": (lambda i: {"1": frames(), "2": save(["1", 0], fmt="avi")}, ["format", "avi", "mp4"]),
    "a word the text encoder does not know": (lambda i: generate("a red unicorn moving left"),
                                              ["does not know 1 word", "'unicorn'", "ignore_unknown_words"]),
    "a guidance interval that ends before it starts": (lambda i: generate(cfg_start=0.9, cfg_end=0.1),
                                                       ["cfg_start <= cfg_end", "cfg_start=0.9, cfg_end=0.1"]),
    "frames that do not divide the latent batch": (lambda i: generate(frames=3),
                                                   ["4 frames", "not divisible by num_frames=3"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_ends_the_prompt_clearly_and_the_host_keeps_serving(comfy, inputs, case):
    build, words = CASES[case]
    before = files_under(comfy.output_dir)

    message = comfy.run_expect_error(build(inputs))

    for word in words:
        assert word in message, f"{word!r} missing from the host's message:\n{message}"
    assert "Traceback" not in message
    assert files_under(comfy.output_dir) == before, "a failed prompt left a file behind"
    # the server still serves: a fresh good prompt (not a cached one) runs right after
    fps = 5.0 + list(CASES).index(case)
    follow_up = comfy.run({"1": frames(count=2, fps=fps), "2": save(["1", 0], fps=["1", 1], fmt="gif")})
    assert comfy.output_files(follow_up)[0]["frame_rate"] == fps
