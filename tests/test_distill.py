"""The few-step student (training/distill.py) on a tiny teacher: one distillation step, where its
gradients go, the stage end to end with resume, the student's timesteps read from its file and
used by sampling, and the loaders that refuse a student. The shipped student in the real host:
tests/test_text_to_video.py."""

from __future__ import annotations

import json
import random

import pytest
import torch

from magicvideo.models import checkpoint, pipeline, sampling, world
from magicvideo.models.checkpoint import CheckpointError
from magicvideo.models.text import TextConfig, TextEncoder
from magicvideo.models.unet import UNetConfig, VideoUNet
from magicvideo.models.vae import VAEConfig, VideoVAE
from magicvideo.training import cli
from magicvideo.training import distill
from tiny_models import awake

WIDTH = 16
FRAMES = 4
SCHEDULE = (999, 749, 499, 249)
TINY = {
    "seed": 5,
    "data": {"source": "world", "frames": FRAMES, "size": 32, "fps": 8},
    "distill": {"batch_size": 2, "steps": 2, "fake_updates": 2, "pool_size": 4, "save_every": 2, "warmup": 1,
                "regression_weight": 0.5, "pairs": 2, "pair_steps": 2, "lr": 1e-3, "fake_lr": 1e-3},
}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A tiny full model with image-prior channels (so given frames reach it), saved as a file."""
    torch.manual_seed(0)
    unet = awake(VideoUNet(UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                       attention_resolutions=(1, 2), num_heads=2, context_dim=WIDTH, norm_groups=8,
                                       max_frames=8, prediction_type="v_prediction", noise_sharing=0.5,
                                       cond_channels=5)))
    vae = awake(VideoVAE(VAEConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4, temporal_head_dim=8)))
    text = awake(TextEncoder(TextConfig(**world.text_fields(), width=WIDTH, layers=1, heads=2)))
    path = tmp_path_factory.mktemp("distill") / "teacher.safetensors"
    return checkpoint.save_model(path, unet=unet, vae=vae, text_encoder=text,
                                 extra_metadata={"training_recipe": json.dumps({"seed": 1})})


def _distiller(teacher_file, **changes):
    bundle = checkpoint.load_model(teacher_file)
    dc = distill.distill_config({"distill": {**TINY["distill"], **changes}})
    d = distill.Distiller(bundle.unet, dc, fps=8)
    return d, bundle.text_encoder


def _batch(d, text, tasks):
    torch.manual_seed(1)
    x0 = torch.randn(2 * FRAMES, 4, 4, 4)
    return distill.make_batch(x0, ["a red circle moving left", "a blue square"], text, FRAMES, tasks,
                              torch.Generator().manual_seed(0), "cpu", cond_channels=5)


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _moved(module, before):
    return any(not torch.equal(p, b) for p, b in zip(module.parameters(), before))


def test_student_update_reaches_the_student_only(teacher_file):
    d, text = _distiller(teacher_file)
    batch = _batch(d, text, {"image": 1.0})  # frame 0 given in every video
    assert batch.given.view(2, FRAMES)[:, 0].all() and not batch.given.view(2, FRAMES)[:, 1:].any()
    d.fake.requires_grad_(False)
    d.disc.requires_grad_(False)
    teacher, fake, disc = _snapshot(d.teacher), _snapshot(d.fake), _snapshot(d.disc)
    opt = torch.optim.SGD(d.student.parameters(), lr=0.1)
    random.seed(0)
    loss, parts = d.student_loss(batch)
    assert torch.isfinite(loss) and set(parts) == {"dmd", "gan_g"} and parts["dmd"] > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    for net in (d.teacher, d.fake, d.disc):
        assert all(p.grad is None for p in net.parameters())
    opt.step()
    assert not _moved(d.teacher, teacher) and not _moved(d.fake, fake) and not _moved(d.disc, disc)


def test_given_frames_send_no_gradient_to_the_student(teacher_file):
    d, text = _distiller(teacher_file)
    d.fake.requires_grad_(False)
    d.disc.requires_grad_(False)
    batch = _batch(d, text, {"image": 1.0})
    outputs = []
    d.student.register_forward_hook(lambda m, i, out: outputs.append(out) if out.requires_grad else None)
    random.seed(0)
    loss, _ = d.student_loss(batch)
    [out] = outputs  # the one pass with gradients (backward simulation runs without)
    out.retain_grad()
    loss.backward()
    per_frame = out.grad.abs().flatten(1).sum(1)
    assert (per_frame[batch.given] == 0).all() and (per_frame[~batch.given] > 0).all()


def test_critic_update_leaves_the_student_alone(teacher_file):
    d, text = _distiller(teacher_file)
    batch = _batch(d, text, {"text": 0.5, "continue": 0.5})
    d.student.requires_grad_(False)
    student, teacher = _snapshot(d.student), _snapshot(d.teacher)
    params = list(d.fake.parameters()) + list(d.disc.parameters())
    fake, disc = _snapshot(d.fake), _snapshot(d.disc)
    opt = torch.optim.SGD(params, lr=0.1)
    loss, parts = d.critic_loss(batch)
    assert torch.isfinite(loss) and set(parts) == {"fake", "gan_d"}
    loss.backward()
    assert all(p.grad is None for p in d.student.parameters()) and all(p.grad is None for p in d.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.disc.parameters())
    opt.step()
    assert _moved(d.fake, fake) and _moved(d.disc, disc)
    assert not _moved(d.student, student) and not _moved(d.teacher, teacher)


def test_given_frames_stay_clean_and_unscored(teacher_file):
    d, text = _distiller(teacher_file)
    batch = _batch(d, text, {"image": 1.0})
    with torch.no_grad():
        sample = d.student_sample(batch, k=2)  # through two of its own earlier steps
        x = d.backward_simulation(batch, 0)
    assert torch.equal(sample[batch.given], batch.x0[batch.given])
    assert x.shape == batch.x0.shape


def test_regression_on_teacher_pairs(teacher_file):
    d, text = _distiller(teacher_file)
    pairs = distill.make_pairs(d, text, ["a red circle"], FRAMES, (4, 4, 4), seed=0, pair_steps=2, device="cpu")
    assert pairs["noise"].shape == pairs["x0"].shape == (FRAMES, 4, 4, 4)
    batch = distill.pair_batch(pairs, ["a red circle"], text, FRAMES, 1, random.Random(0), "cpu", 5)
    reg = d.regression_loss(batch)
    reg.backward()
    assert torch.isfinite(reg) and any(p.grad is not None for p in d.student.parameters())


def test_config_is_checked():
    with pytest.raises(SystemExit, match="must start at 999"):
        distill.distill_config({"distill": {"timesteps": [749, 499]}})
    with pytest.raises(SystemExit, match="falling from noise to clean"):
        distill.distill_config({"distill": {"timesteps": [999, 999, 10]}})
    with pytest.raises(SystemExit, match="unknown fields"):
        distill.distill_config({"distill": {"step": 3}})


def test_stage_writes_a_student_file_and_resumes(teacher_file, tmp_path):
    config = tmp_path / "distill.json"
    config.write_text(json.dumps(TINY))
    run = tmp_path / "run"
    args = ["--config", str(config), "--stage", "distill", "--run-dir", str(run), "--threads", "1"]
    out = tmp_path / "student.safetensors"
    cli.main(args + ["--init", str(teacher_file), "--out", str(out)])
    header = checkpoint.read_header(out)
    assert header.metadata["format_version"] == checkpoint.STUDENT_FORMAT_VERSION
    assert header.student_timesteps == list(SCHEDULE)
    assert "few-step student" in checkpoint.identify(header)
    recipe = json.loads(header.metadata["training_recipe"])
    assert recipe["distill"]["teacher"] == "teacher.safetensors" and json.loads(header.metadata["lineage"]) == [{"seed": 1}]
    logged = [json.loads(line) for line in (run / "distill.log").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 1]
    assert {"dmd", "gan_g", "fake", "gan_d", "reg"} <= set(logged[0])
    cli.main(args + ["--resume", "--set", "distill.steps=3"])  # no --init: the run kept its teacher
    steps = [json.loads(line)["step"] for line in (run / "distill.log").read_text().splitlines()]
    assert steps == [0, 1, 2]
    assert json.loads(checkpoint.read_header(run / "model.safetensors").metadata["training_recipe"])["distill"][
        "teacher"] == "teacher.safetensors"


@pytest.fixture(scope="module")
def student_file(teacher_file, tmp_path_factory):
    bundle = checkpoint.load_model(teacher_file)
    bundle.unet.config.student_timesteps = SCHEDULE
    return checkpoint.save_model(tmp_path_factory.mktemp("student") / "student.safetensors", unet=bundle.unet,
                                 vae=bundle.vae, text_encoder=bundle.text_encoder)


class _Timesteps:
    """Records the timesteps of the non-given frames the UNet is called with, and the batch size."""

    def __init__(self, unet):
        self.calls = []
        unet.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs):
        x, t = args[0], args[1]
        self.calls.append((int(t.max()), x.shape[0]))


def test_student_samples_at_its_own_timesteps(student_file):
    bundle = checkpoint.load_model(student_file)
    assert bundle.unet.config.student_timesteps == SCHEDULE
    seen = _Timesteps(bundle.unet)
    latents = torch.zeros(FRAMES, 4, 4, 4)
    context, _ = bundle.text_encoder.encode(["a red circle"])
    negative, _ = bundle.text_encoder.encode([""])
    main = sampling.PRESETS["main"]  # 20 steps, cfg 6, motion guidance: the file sets its own
    pipeline.sample_video(bundle.unet, latents, context, negative, num_frames=FRAMES, options=main)
    assert seen.calls == [(t, FRAMES) for t in SCHEDULE]  # one pass per step: no guidance
    for steps, expected in ((2, [999, 499]), (1, [999])):
        seen.calls.clear()
        pipeline.sample_video(bundle.unet, latents, context, None, num_frames=FRAMES, options=main.replace(steps=steps))
        assert [t for t, _ in seen.calls] == expected
    seen.calls.clear()  # as_set: the options as given (guided euler, 3 steps)
    options = sampling.PRESETS["plain"].replace(steps=3, settings="as_set")
    pipeline.sample_video(bundle.unet, latents, context, negative, num_frames=FRAMES, options=options)
    assert len(seen.calls) == 3 and all(n == 2 * FRAMES for _, n in seen.calls)


def test_for_model_and_student_steps():
    main = sampling.PRESETS["main"]
    assert sampling.for_model(main) is main  # a many-step model: unchanged
    student = sampling.for_model(main, SCHEDULE)
    assert (student.steps, student.timesteps, student.cfg, student.sampler, student.motion_guidance) == \
        (4, SCHEDULE, 1.0, "lcm", 0.0)
    assert sampling.for_model(student, SCHEDULE) == student  # resolving twice changes nothing
    assert sampling.student_steps(SCHEDULE, 3) == (999, 749, 249)
    lcm = sampling.for_model(main.replace(sampler="lcm", steps=2, settings="as_set"), SCHEDULE)
    assert lcm.timesteps == (999, 499) and lcm.cfg == main.cfg
    with pytest.raises(ValueError, match="timesteps must be 2"):
        main.replace(steps=2, timesteps=(999, 499, 10)).check()


def test_loaders_that_cannot_use_a_student_say_so(student_file, teacher_file, tmp_path, monkeypatch):
    bundle = checkpoint.load_model(student_file)
    with pytest.raises(CheckpointError, match=r"expected motion layers of a many-step model, found a MagicVideo "
                                              r"few-step student .*timesteps \[999, 749, 499, 249\]"):
        checkpoint.apply_motion(checkpoint.load_model(teacher_file).unet, student_file)
    with pytest.raises(CheckpointError, match="expected a many-step model to save motion layers from"):
        checkpoint.save_motion(tmp_path / "motion.safetensors", bundle.unet)
    # a pack that reads formats 1 and 2 only (as before students) refuses it by its version
    monkeypatch.setattr(checkpoint, "READABLE_VERSIONS", ("1", "2"))
    with pytest.raises(CheckpointError, match=r"expected MagicVideo format_version 1 or 2, found '3'"):
        checkpoint.load_model(student_file)
    assert checkpoint.load_model(teacher_file).unet is not None  # a many-step file is still version 2


def test_the_teacher_is_refused_as_a_student_and_vice_versa(student_file, tmp_path):
    config = tmp_path / "distill.json"
    config.write_text(json.dumps(TINY))
    with pytest.raises(SystemExit, match="expected a many-step teacher, found a few-step student"):
        cli.main(["--config", str(config), "--stage", "distill", "--run-dir", str(tmp_path / "r"),
                  "--init", str(student_file)])


def test_sliding_window_chainer_samples_a_student_at_its_timesteps(student_file):
    from magicvideo.models import long_video

    bundle = checkpoint.load_model(student_file)
    seen = _Timesteps(bundle.unet)
    spans = long_video.parse_schedule("a red circle moving to the left", 2)
    for method in ("continue", "fusion"):
        seen.calls.clear()
        totals = []
        out = long_video.sample_long_video(bundle.unet, bundle.text_encoder, spans, frames=10, latent_size=(4, 4),
                                           window=6, overlap=2, method=method, options=sampling.PRESETS["main"],
                                           callback=lambda s, total, x0: totals.append((s, total)))
        windows = len(long_video.plan_windows(10, 6, 2, method))
        assert out.shape == (10, 4, 4, 4) and torch.isfinite(out).all()
        assert sorted({t for t, _ in seen.calls}, reverse=True) == list(SCHEDULE)  # 4 steps, one pass each
        assert len(seen.calls) == 4 * (windows if method == "continue" else -(-windows // 4))
        assert totals[-1][0] == totals[-1][1] == 4 * (windows if method == "continue" else 1)


@pytest.fixture(scope="module")
def nodes(host_modules):
    import importlib

    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
    return importlib.import_module("magicvideo.nodes.model")


def test_sampler_node_takes_the_students_settings(nodes, student_file):
    bundle = checkpoint.load_model(student_file)
    model = pipeline.VideoModel(bundle.unet)
    seen = _Timesteps(bundle.unet)
    latent = nodes.EmptyVideoLatent().generate(width=32, height=32, frames=FRAMES, batch=1)[0]
    cond = [[torch.zeros(1, 6, WIDTH), {}]]
    main = nodes.MAIN
    args = dict(model=model, positive=cond, negative=cond, latent=latent, seed=1, steps=main.steps, cfg=main.cfg,
                sampler=main.sampler, scheduler=main.scheduler, fps=8.0, denoise=1.0, frames=0)
    out = nodes.KeyframeSampler().sample(**args)[0]  # the node's defaults: the file sets 4 steps, cfg 1
    assert out["samples"].shape == (FRAMES, 4, 4, 4) and seen.calls == [(t, FRAMES) for t in SCHEDULE]
    seen.calls.clear()
    nodes.KeyframeSampler().sample(**{**args, "steps": 2, "settings": "as_set"})  # asked: guided euler
    assert len(seen.calls) == 2 and all(n == 2 * FRAMES for _, n in seen.calls)
    assert nodes.KeyframeSampler.INPUT_TYPES()["optional"]["settings"][1]["default"] == "model"
