"""Training under torchrun: two gloo processes on the CPU train as one process does at the same
global batch, a run saved by N processes resumes on M, and the file renders.

The multi-process runs go through ``torchrun`` in a subprocess with a timeout (a hung process
group fails the test instead of the suite); each is a few steps of the tiny config.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import magicvideo
from magicvideo.models import checkpoint, pipeline
from magicvideo.models.sampling import PRESETS
from magicvideo.training import cli, data, distributed

from test_train import TINY

# the UNet stage at a global batch of 4 clips; the VAE stage at 2
CONFIG = {**TINY, "vae": {**TINY["vae"], "batch_size": 2}, "unet": {**TINY["unet"], "batch_size": 4, "steps": 4}}
TIMEOUT = 240  # seconds for one torchrun on two busy CPU cores (a healthy run takes ~15 s)


def torchrun(args: list[str], nproc: int = 2):
    """``torchrun --standalone --nproc-per-node N -m magicvideo.train ARGS``, killed (its whole
    process group) when it outlives TIMEOUT."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(magicvideo.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "magicvideo.train", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def losses(run: Path, stage: str = "unet") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / f"{stage}.log").read_text().splitlines())}


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, both stages: the reference run (global batches 2 and 4)."""
    root = tmp_path_factory.mktemp("single")
    config = root / "tiny.json"
    config.write_text(json.dumps(CONFIG))
    run = root / "run"
    cli.main(["--config", str(config), "--stage", "all", "--run-dir", str(run), "--threads", "1"])
    return config, run


def test_two_processes_train_as_one_and_resume_on_one(single, tmp_path):
    """2 gloo processes at the same global batch: the same VAE and the same UNet losses as one
    process (measured: equal to float rounding, weights within 2e-7 after 4 steps); a UNet run they
    stop at step 2 resumes in one process and ends where the unbroken one-process run ends; the
    file they wrote loads and renders."""
    config, ref = single
    run = tmp_path / "run"
    torchrun(["--config", str(config), "--stage", "all", "--run-dir", str(run), "--threads", "1", "--stop-at", "2"])
    assert max_diff(run / "vae.safetensors", ref / "vae.safetensors") < 1e-5
    two, one = losses(run), losses(ref)
    assert two.keys() == {0, 1} and two[0] == pytest.approx(one[0], rel=1e-5)
    assert losses(run, "vae") == pytest.approx(losses(ref, "vae"), rel=1e-5)

    bundle = checkpoint.load_model(run / "model.safetensors")  # rank 0's export renders
    options = PRESETS["plain"].replace(steps=2, motion_guidance=0.0)
    video = pipeline.text_to_video(bundle, "a red ball moving left", frames=4, width=32, height=32, options=options)
    assert video.shape == (4, 32, 32, 3) and torch.isfinite(video).all()

    cli.main(["--config", str(config), "--stage", "unet", "--run-dir", str(run), "--threads", "1", "--resume"])
    assert losses(run)[3] == pytest.approx(one[3], rel=1e-5)
    assert max_diff(run / "model.safetensors", ref / "model.safetensors") < 1e-5


def test_a_one_process_run_resumes_on_two_sharded_with_its_optimizer_and_data_position(single, tmp_path):
    """Saved by one process, resumed by two under FSDP (unet.shard fsdp: the UNet, its Adam state
    and its EMA in shards) with 2 micro-batches each: the same last steps as the unbroken run."""
    config, ref = single
    run = tmp_path / "run"
    run.mkdir()
    (run / "vae.safetensors").write_bytes((ref / "vae.safetensors").read_bytes())
    base = ["--config", str(config), "--stage", "unet", "--run-dir", str(run), "--threads", "1"]
    cli.main(base + ["--stop-at", "2"])
    torchrun(base + ["--resume", "--set", "unet.accumulate=2", "--set", "unet.shard=fsdp"])
    assert losses(run)[3] == pytest.approx(losses(ref)[3], rel=1e-5)
    assert max_diff(run / "model.safetensors", ref / "model.safetensors") < 1e-5
    state = torch.load(run / "unet_state.pt", weights_only=True)
    assert state["step"] == 3 and state["optimizer"]["state"]  # rank 0 saved the whole Adam state
    moments = [st["exp_avg"] for st in state["optimizer"]["state"].values()]  # whole, not shards
    assert all(type(m) is torch.Tensor for m in moments)
    assert sum(m.numel() for m in moments) == sum(v.numel() for k in ("unet", "text") for v in state[k].values())


def test_a_global_batch_splits_into_the_same_clips_for_any_number_of_processes():
    """Rank r takes draws k % W == r of the stream and positions r, r + W, ... of a batch; the
    shares of any W put back in draw order are one process's draws, from any start."""
    args = type("Args", (), {"data_dir": None})()
    cfg = {"data": {"frames": 2, "size": 16}}
    one = data.make_source(cfg, args, seed=5, first=3)
    videos, captions = one.batch(6)
    for size in (2, 3):
        shares = [data.make_source(cfg, args, seed=5, first=3, dist=distributed.Dist(r, size)).batch(6)
                  for r in range(size)]
        stream = data.make_source(cfg, args, seed=5, first=3).stream
        stream.take(6)
        merged = stream.interleave(6, [list(zip(v, c)) for v, c in shares])
        assert [c for _, c in merged] == captions
        assert torch.equal(torch.stack([v for v, _ in merged]), videos)
    x = torch.arange(12).view(6, 2)  # 6 clips of 2 rows
    assert distributed.Dist(1, 3).shard(x.flatten(0), per=2).tolist() == [2, 3, 8, 9]
    with pytest.raises(SystemExit, match="must split evenly over 2 process"):
        distributed.Dist(0, 2).check_batch(6, "unet.batch_size", accumulate=2)


def test_folder_clips_are_decoded_when_drawn_each_process_its_share(tmp_path):
    from magicvideo.models.video_io import write_video

    rng = np.random.default_rng(0)
    for i in range(3):
        write_video(tmp_path / f"clip{i}.mp4", rng.random((6, 24, 32, 3)).astype(np.float32), fps=8)
        (tmp_path / f"clip{i}.txt").write_text(f"clip {i}")
    args = type("Args", (), {"data_dir": str(tmp_path)})()
    cfg = {"data": {"frames": 4, "size": 16, "workers": 1}}
    videos, captions = data.make_source(cfg, args, seed=1).batch(6)
    assert videos.shape == (6, 4, 3, 16, 16) and videos.min() >= -1 and videos.max() <= 1
    assert sorted(captions[:3]) == ["clip 0", "clip 1", "clip 2"]  # an epoch visits every clip once
    second, _ = data.make_source(cfg, args, seed=1, dist=distributed.Dist(1, 2)).batch(6)
    assert torch.allclose(second, videos[1::2])
