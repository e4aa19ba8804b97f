"""The training entry point on tiny configs: both stages run, write loadable files, resume."""

import argparse
import json

import numpy as np
import pytest
import torch

from magicvideo.models import checkpoint, world
from magicvideo.models.sampling import PRESETS
from magicvideo.models.text import TextConfig, TextEncoder
from magicvideo.training import cli, data, export, loop
from magicvideo.training import unet as unet_stage
from magicvideo.training import vae as vae_stage
from magicvideo.models.unet import CrossAttention

TINY = {
    "seed": 3,
    "data": {"source": "world", "frames": 4, "size": 32, "fps": 8},
    "vae": {
        "config": {"ch": 8, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "norm_groups": 4,
                   "temporal_layers": 2, "temporal_head_dim": 8},
        "frames": 2, "batch_size": 1, "steps": 3, "lr": 1e-3, "kl_weight": 1e-6,
        "foreground_weight": 8.0, "save_every": 2,
    },
    "unet": {
        "config": {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                   "attention_resolutions": [1, 2], "num_heads": 2, "context_dim": 16,
                   "norm_groups": 8, "max_frames": 8, "prediction_type": "v_prediction",
                   "noise_sharing": 0.5},
        "text_config": {"width": 16, "layers": 1, "heads": 2},
        "batch_size": 2, "steps": 3, "lr": 1e-3, "ema": 0.9, "cond_drop": 0.5,
        "pool_size": 4, "pool_refresh": 1, "save_every": 2, "foreground_weight": 4.0,
    },
}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def test_both_stages_write_a_full_model_with_its_recipe(config_file, tmp_path):
    run = tmp_path / "run"
    out = tmp_path / "model.safetensors"
    cli.main(["--config", str(config_file), "--stage", "all", "--run-dir", str(run), "--threads", "1",
              "--out", str(out)])

    bundle = checkpoint.load_model(out)
    assert bundle.unet is not None and bundle.vae is not None and bundle.text_encoder is not None
    assert json.loads(bundle.metadata["training_recipe"])["unet"]["steps"] == 3
    assert bundle.vae.config.scaling_factor != 1.0  # measured from the data, not the default
    assert bundle.unet.config.noise_sharing == 0.5  # the noise prior it trained with travels with it
    logged = [json.loads(line) for line in (run / "unet.log").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)

    # the model it wrote generates through the same library path as the CLI
    with torch.no_grad():
        context, unknown = bundle.text_encoder.encode(["a red ball moving left"])
    assert unknown == [] and context.shape == (1, 77, 16)


def test_resume_carries_on_from_the_saved_step(config_file, tmp_path):
    run = tmp_path / "run"
    args = ["--config", str(config_file), "--stage", "vae", "--run-dir", str(run), "--threads", "1"]
    cli.main(args + ["--set", "vae.steps=2"])
    cli.main(args + ["--resume", "--set", "vae.steps=4"])
    steps = [json.loads(line)["step"] for line in (run / "vae.log").read_text().splitlines()]
    assert steps == [0, 1, 3]  # the second run started at step 2 (logged: every 10th and the last)


def test_set_rejects_unknown_sections(config_file, tmp_path):
    with pytest.raises(SystemExit, match="no 'vea' in the config"):
        cli.main(["--config", str(config_file), "--run-dir", str(tmp_path), "--set", "vea.steps=1"])


def test_foreground_weights_emphasise_pixels_unlike_the_frame_median():
    x = -torch.ones(1, 3, 8, 8)
    x[..., 2:4, 2:4] = 1.0  # a small bright object on a dark background
    w = data.foreground_weights(x, 8.0)
    assert w[0, 0, 2, 2] == 9.0 and w[0, 0, 0, 0] == 1.0
    assert torch.equal(data.foreground_weights(x, 0.0), torch.ones_like(w))


def test_decoder_stage_keeps_the_encoder_and_export_takes_the_new_decoder(config_file, tmp_path):
    run = tmp_path / "run"
    base = ["--config", str(config_file), "--run-dir", str(run), "--threads", "1"]
    cli.main(base + ["--stage", "all"])
    before = checkpoint.load_model(run / "vae.safetensors").vae.state_dict()
    cli.main(base + ["--stage", "decoder", "--set", "vae.decoder_steps=2"])
    after = checkpoint.load_model(run / "vae.safetensors").vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))

    out = tmp_path / "final.safetensors"
    cli.main(base + ["--stage", "export", "--out", str(out)])
    exported = checkpoint.load_model(out)
    assert torch.equal(exported.vae.state_dict()["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
    assert exported.unet is not None and exported.text_encoder is not None


def test_latent_weights_cover_still_and_moving_objects_only():
    x = -torch.ones(4, 3, 32, 32)  # 4 frames of a black background
    x[:, 0, 2:6, 2:6] = 1  # a still red square in the top-left cell
    for f in range(4):  # a short bar moving right along the bottom
        x[f, 1, 28:30, 4 * f + 8: 4 * f + 10] = 1
    w = data.latent_weights(x, (4, 4), 4, 3.0)
    assert w.shape == (4, 1, 4, 4)
    assert torch.all(w[:, 0, 0, 0] == 4)  # the still square's cell, in every frame
    assert w[0, 0, 3, 1] == 4 and w[3, 0, 3, 2] == 4  # the moving line where it is
    assert w[:, 0, 1:3, 1:3].eq(1).all()  # empty background
    assert torch.equal(data.latent_weights(x, (4, 4), 4, 0.0), torch.ones(4, 1, 4, 4))


def test_stop_at_splits_the_unet_run_without_changing_its_schedule(config_file, tmp_path):
    run = tmp_path / "run"
    base = ["--config", str(config_file), "--run-dir", str(run), "--threads", "1", "--set", "unet.steps=5"]
    cli.main(base + ["--stage", "all", "--stop-at", "2"])
    first = [json.loads(line) for line in (run / "unet.log").read_text().splitlines()]
    assert [r["step"] for r in first] == [0, 1]  # stopped, and saved, before step 2
    cli.main(base + ["--stage", "unet", "--resume", "--set", "unet.config.noise_sharing=0"])
    logged = [json.loads(line) for line in (run / "unet.log").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 1, 4]  # the second leg started at step 2
    assert logged[-1]["lr"] == pytest.approx(loop.cosine_lr(4, 5, TINY["unet"]["lr"]))


def test_init_from_a_magicvideo_file_goes_on_from_its_weights(config_file, tmp_path):
    first = tmp_path / "first.safetensors"
    cli.main(["--config", str(config_file), "--stage", "all", "--run-dir", str(tmp_path / "a"), "--threads", "1",
              "--out", str(first)])
    again = tmp_path / "again.safetensors"
    # a fresh run folder, learning rate 0: the exported EMA weights are the file's own
    cli.main(["--config", str(config_file), "--stage", "unet", "--run-dir", str(tmp_path / "b"), "--threads", "1",
              "--init", str(first), "--set", "unet.lr=0", "--set", "unet.steps=2"])
    cli.main(["--config", str(config_file), "--stage", "export", "--run-dir", str(tmp_path / "b"), "--out", str(again)])
    a, b = checkpoint.load_model(first), checkpoint.load_model(again)
    for name in ("unet", "text_encoder", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    # each leg records the recipes it went on from, newest first (export and soups keep them)
    recipe = lambda m: json.loads(m.metadata["training_recipe"])  # noqa: E731
    assert "lineage" not in a.metadata and json.loads(b.metadata["lineage"]) == [recipe(a)]
    legs = []
    for seed in (5, 6):
        cli.main(["--config", str(config_file), "--stage", "unet", "--run-dir", str(tmp_path / f"leg{seed}"),
                  "--threads", "1", "--init", str(again), "--set", f"seed={seed}", "--set", "unet.steps=1"])
        legs.append(tmp_path / f"leg{seed}" / "model.safetensors")
    third = checkpoint.load_model(legs[0])
    assert recipe(third)["seed"] == 5 and json.loads(third.metadata["lineage"]) == [recipe(b), recipe(a)]
    soup = checkpoint.load_model(checkpoint.average_models(legs, tmp_path / "soup.safetensors"))
    assert json.loads(soup.metadata["lineage"]) == [recipe(b), recipe(a)]
    # a leg resumed without --init keeps the lineage its folder's file has
    cli.main(["--config", str(config_file), "--stage", "unet", "--run-dir", str(tmp_path / "leg5"),
              "--threads", "1", "--resume", "--set", "seed=5", "--set", "unet.steps=2"])
    resumed = checkpoint.load_model(legs[0])
    assert recipe(resumed)["unet"]["steps"] == 2 and json.loads(resumed.metadata["lineage"]) == [recipe(b), recipe(a)]


def test_grow_adds_temporal_conv_to_an_init_model(config_file, tmp_path):
    """unet.grow: a MagicVideo file gains identity-initialised temporal convs and trains on;
    its other weights start as they were (learning rate 0 keeps them)."""
    first = tmp_path / "first.safetensors"
    cli.main(["--config", str(config_file), "--stage", "all", "--run-dir", str(tmp_path / "a"), "--threads", "1",
              "--out", str(first)])
    grown = tmp_path / "grown.safetensors"
    cli.main(["--config", str(config_file), "--stage", "unet", "--run-dir", str(tmp_path / "b"), "--threads", "1",
              "--init", str(first), "--set", 'unet.grow={"temporal_conv": true}', "--set", "unet.lr=0",
              "--set", "unet.steps=2", "--out", str(grown)])
    a, b = checkpoint.load_model(first).unet, checkpoint.load_model(grown).unet
    assert b.config.temporal_conv and not a.config.temporal_conv
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any("temporal_conv" in k for k in set(sb) - set(sa))
    with pytest.raises(SystemExit, match="unet.grow adds layers to an --init MagicVideo model"):
        cli.main(["--config", str(config_file), "--stage", "unet", "--run-dir", str(tmp_path / "c"), "--threads", "1",
                  "--set", 'unet.grow={"temporal_conv": true}'])


def test_attribute_labels_follow_the_caption_order():
    spec = world.sample_spec(np.random.default_rng(5), "train")
    while len(spec.objects) != 2:
        spec = world.sample_spec(np.random.default_rng(len(spec.objects) + 11), "train")
    labels = world.attribute_labels(spec)
    assert len(labels) == 8
    for i, obj in enumerate(spec.objects):
        colour, shape, motion, speed = labels[4 * i: 4 * i + 4]
        assert world.COLOURS[colour] == obj.colour and world.SHAPES[shape] == obj.shape
        assert world.MOTIONS[motion] == obj.motion
        assert speed == world.IGNORE_LABEL if obj.speed is None else world.SPEEDS[speed] == obj.speed
    one = world.ClipSpec(objects=spec.objects[:1])
    assert world.attribute_labels(one)[4:] == [world.IGNORE_LABEL] * 4


def test_text_attribute_probe_reads_only_what_the_conditioning_holds():
    """The probe learns to read labels the conditioning carries; absent labels are ignored
    (a batch with none gives a finite loss, not NaN)."""
    torch.manual_seed(0)
    probe = unet_stage.TextAttributeProbe(16)
    labels = torch.stack([torch.randint(0, n, (256,)) for n in probe.sizes], 1)
    labels[:128, 4:] = -100  # one-object clips
    informative = torch.zeros(256, 3, 16)
    informative[:, 0, :8] = torch.nn.functional.one_hot(labels[:, 2], 13)[:, :8].float() * 3  # motion, partly
    informative[:, 0, 8:] = torch.nn.functional.one_hot(labels[:, 0], 9)[:, :8].float() * 3  # colour, partly
    opt = torch.optim.Adam(probe.parameters(), 1e-2)
    for _ in range(150):
        loss = probe.loss(informative, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        motion = probe.logits(informative)[2].argmax(-1)
        assert (motion == labels[:, 2]).float().mean() > 0.55  # 8 of 13 motions one-hot, 1/13 chance
        assert torch.isfinite(probe.loss(informative, torch.full_like(labels, -100)))


def _refuses_user_clips(config_file, tmp_path, run, setting: str):
    """A training aid that needs the world's specs is refused on a folder of the user's clips
    (``run``: a trained run folder, whose VAE the UNet stage reads first)."""
    clips = tmp_path / "clips"
    clips.mkdir(exist_ok=True)
    with pytest.raises(SystemExit, match=f"{setting} needs the world's clips"):
        cli.main(["--config", str(config_file), "--stage", "unet", "--run-dir", str(run),
                  "--threads", "1", "--data-dir", str(clips), "--set", f"unet.{setting}=0.5"])


def test_text_aux_weight_trains_the_probe_on_world_clips_only(config_file, tmp_path):
    run = tmp_path / "aux"
    cli.main(["--config", str(config_file), "--stage", "all", "--run-dir", str(run), "--threads", "1",
              "--set", "unet.text_aux_weight=0.5", "--set", "unet.cond_drop=0"])  # every step has labels
    rows = [json.loads(line) for line in (run / "unet.log").read_text().splitlines()]
    assert all(r["text_aux"] > 0 for r in rows)
    assert "probe" in torch.load(run / "unet_state.pt", weights_only=True)
    assert not any("probe" in k for k in checkpoint.load_model(run / "model.safetensors").unet.state_dict())
    _refuses_user_clips(config_file, tmp_path, run, "text_aux_weight")


def test_binding_loss_scores_where_each_objects_words_look_and_can_be_learned():
    """1 - (share of a word's attention on its object): 0 when each word looks only at its own
    object, 1 - coverage share when it looks everywhere, and words at -1 do not count; with
    ``contrast`` only the objects' cells count. A cross-attention trained on either alone learns to bind: two objects, each cell's features say
    which one it is on, and each object's words come to look at that object."""
    b, f, cells, tokens = 1, 2, 4, 6
    coverage = torch.zeros(b, f, 2, 2, 2)
    coverage[:, :, 0, 0, 0] = 1.0  # object 0 fills cell 0, object 1 fills cell 3
    coverage[:, :, 1, 1, 1] = 1.0
    words = torch.tensor([[[1, 2], [3, 4]]])
    bound = torch.zeros(b * f, 1, cells, tokens)
    bound[:, :, 0, [1, 2]] = 1.0  # words 1, 2 only from cell 0; 3, 4 only from cell 3
    bound[:, :, 3, [3, 4]] = 1.0
    bound[:, :, 1:3, 0] = 1.0
    assert unet_stage.binding_loss([bound], coverage, words).item() == 0.0
    uniform = torch.full((b * f, 1, cells, tokens), 1.0 / tokens)
    assert abs(unet_stage.binding_loss([uniform], coverage, words).item() - 0.75) < 1e-6
    swapped = bound[:, :, [3, 1, 2, 0]]  # each object's words look at the other object
    assert unet_stage.binding_loss([swapped], coverage, words).item() == 1.0
    one = torch.tensor([[[1, 2], [-1, -1]]])  # a second object absent: only object 0 counts
    assert unet_stage.binding_loss([swapped], coverage, one).item() == 1.0
    assert unet_stage.binding_loss([bound, swapped], coverage, words).item() == 0.5
    padded = torch.tensor([[[1, 2, -1], [3, 4, -1]]])  # more word slots (binding_words "object"), unused
    assert unet_stage.binding_loss([swapped], coverage, padded).item() == 1.0
    mixed = torch.tensor([[[1, 2, 4], [3, -1, -1]]])  # object 0's third word looks at object 1
    assert abs(unet_stage.binding_loss([bound], coverage, mixed).item() - 0.25) < 1e-6
    # contrast: the share among the objects' cells only, so looking at the background costs nothing
    objects = torch.zeros(b * f, 1, cells, tokens)
    objects[:, :, [0, 3], 1:5] = 0.25  # every object's words from both objects' cells alike
    objects[:, :, 1:3, 0] = 1.0
    assert abs(unet_stage.binding_loss([objects], coverage, words).item() - 0.5) < 1e-6
    assert abs(unet_stage.binding_loss([objects], coverage, words, contrast=True).item() - 0.5) < 1e-6
    assert abs(unet_stage.binding_loss([uniform], coverage, words, contrast=True).item() - 0.5) < 1e-6
    assert unet_stage.binding_loss([bound], coverage, words, contrast=True).item() == 0.0
    assert unet_stage.binding_loss([swapped], coverage, words, contrast=True).item() == 1.0
    alone = coverage.clone()
    alone[:, :, 1] = 0  # one object in the clip: nothing to tell apart, no loss
    assert unet_stage.binding_loss([swapped], alone, one, contrast=True).item() == 0.0

    for contrast in (False, True):
        torch.manual_seed(0)
        attn = CrossAttention(8, 2, context_dim=8)
        attn.record_probs = True
        x = torch.randn(b * f, cells, 8) * 0.1
        x[:, 0, 0] += 2.0  # "I am on object 0"
        x[:, 3, 1] += 2.0  # "I am on object 1"
        context = torch.randn(b * f, tokens, 8)
        opt = torch.optim.Adam(attn.parameters(), 1e-2)
        losses = []
        for _ in range(150):
            attn(x, context)
            loss = unet_stage.binding_loss([attn.probs], coverage, words, contrast)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] > 0.4 and losses[-1] < 0.3, (contrast, losses[0], losses[-1])


def test_binding_weight_trains_on_world_clips_only(config_file, tmp_path):
    """The UNet stage with ``unet.binding_weight``: the pool keeps each clip's object coverage
    and word indices, the log has the binding loss (a share, so in 0..1); user clips have no
    specs and are refused."""
    run = tmp_path / "bind"
    cli.main(["--config", str(config_file), "--stage", "all", "--run-dir", str(run), "--threads", "1",
              "--set", "unet.binding_weight=0.5", "--set", "unet.cond_drop=0.0"])
    rows = [json.loads(line) for line in (run / "unet.log").read_text().splitlines()]
    assert rows and all(0.0 < r["binding"] <= 1.0 for r in rows)
    _refuses_user_clips(config_file, tmp_path, run, "binding_weight")
    objects = tmp_path / "bind-object"  # all of each object's words, its motion's too; between objects only
    cli.main(["--config", str(config_file), "--stage", "unet", "--run-dir", str(objects), "--threads", "1",
              "--init", str(run / "model.safetensors"), "--set", "unet.binding_weight=0.5",
              "--set", "unet.binding_words=object", "--set", "unet.binding_contrast=true",
              "--set", "unet.cond_drop=0.0"])
    rows = [json.loads(line) for line in (objects / "unet.log").read_text().splitlines()]
    assert rows and all(0.0 <= r["binding"] <= 1.0 for r in rows)  # 0 in a batch of single objects
    for setting, error in (("binding_words=verbs", "unet.binding_words: expected one of"),
                           ('binding_contrast="yes"', "unet.binding_contrast: expected true or false"),
                           ("binding_contrast=True", "booleans are true / false")):  # not the string "True"
        with pytest.raises(SystemExit, match=error):
            cli.main(["--config", str(config_file), "--stage", "unet", "--run-dir", str(objects), "--threads", "1",
                      "--set", "unet.binding_weight=0.5", "--set", f"unet.{setting}"])


def test_binding_targets_index_the_text_encoders_tokens():
    """Word i of a caption is token i + 1 of the built-in text encoder (<bos> first)."""
    spec = world.ClipSpec((world.ObjectSpec("red", "circle", "left", "slow", .3, .5, .1),))
    text = TextEncoder(TextConfig(**world.text_fields()))
    caption = "a red ball moving left slowly"
    ids, _, _ = text.tokenize(caption)
    targets = data.binding_targets(spec, caption)
    assert targets == [[2, 3], [-1, -1]]
    assert ids[0, 2].item() == text.word_to_id["red"] and ids[0, 3].item() == text.word_to_id["ball"]
    assert data.binding_targets(spec, caption, "object") == [[2, 3, 4, 5, 6, -1, -1, -1], [-1] * 8]
    with pytest.raises(ValueError, match="unet.binding_words: expected one of"):
        data.binding_targets(spec, caption, "verbs")


def test_task_mix_draws_each_task_mask(config_file, tmp_path):
    """unet.tasks: per clip a task, as a mask of given frames: nothing, frame 0, the first k
    (k in 1..frames/2), or the first and last; first_frame_prob p is the older {image: p}."""
    g = torch.Generator().manual_seed(0)
    mix = {"text": 0.25, "image": 0.25, "continue": 0.25, "ends": 0.25}
    mask = unet_stage.given_frames_mask(4000, 8, mix, g).view(4000, 8)
    kinds = {"text": ~mask.any(1), "ends": mask[:, 0] & mask[:, -1] & ~mask[:, 1:-1].any(1)}
    kinds["prefix"] = mask.any(1) & ~kinds["ends"]
    assert all(0.2 < v.float().mean() < 0.3 for k, v in kinds.items() if k != "prefix")
    assert 0.45 < kinds["prefix"].float().mean() < 0.55  # image (k = 1) and continue
    prefix = mask[kinds["prefix"]]
    counts = prefix.sum(1)
    assert torch.equal(prefix, torch.arange(8)[None] < counts[:, None])  # always the first k
    assert counts.max() == 4 and 0.5 < (counts == 1).float().mean() < 0.7  # image + continue's k = 1
    assert not unet_stage.given_frames_mask(50, 8, {"text": 1.0}, g).any()
    assert unet_stage.task_mix({"first_frame_prob": 0.3}) == {"text": 0.7, "image": 0.3}
    with pytest.raises(SystemExit, match="unet.tasks: expected probabilities"):
        unet_stage.task_mix({"tasks": {"text": 0.5, "video": 0.5}})


def test_the_seam_frame_is_the_first_new_frame_after_given_ones():
    given = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert unet_stage.first_new_frames(given).int().tolist() == [[0, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]]


def test_a_model_grows_image_prior_channels_and_learns_given_frames(config_file, tmp_path):
    """Magic 1-For-1's image prior on a trained file: unet.grow adds zero-initialised conditioning
    channels (the function is kept: lr 0 leaves the model as it was), then the task mix trains
    them; the file samples image-to-video with the given frame kept."""
    first = tmp_path / "first.safetensors"
    cli.main(["--config", str(config_file), "--stage", "all", "--run-dir", str(tmp_path / "a"), "--threads", "1",
              "--out", str(first)])
    tasks = '{"text": 0.25, "image": 0.25, "continue": 0.25, "ends": 0.25}'
    same = tmp_path / "same.safetensors"
    cli.main(["--config", str(config_file), "--stage", "unet", "--run-dir", str(tmp_path / "b"), "--threads", "1",
              "--init", str(first), "--set", 'unet.grow={"cond_channels": 5}', "--set", f"unet.tasks={tasks}",
              "--set", "unet.lr=0", "--set", "unet.steps=2", "--out", str(same)])
    a, b = checkpoint.load_model(first), checkpoint.load_model(same)
    assert b.unet.config.cond_channels == 5 and not b.unet.config.image_first
    assert not b.unet.cond_in.weight.any()  # starts at zero: the image model unchanged
    options = PRESETS["plain"].replace(steps=2, motion_guidance=0.0)
    frames = dict(frames=4, width=32, height=32, options=options)
    from magicvideo.models import pipeline

    assert torch.allclose(pipeline.text_to_video(a, "a red ball", **frames),
                          pipeline.text_to_video(b, "a red ball", **frames), atol=1e-5)
    trained = tmp_path / "trained.safetensors"
    cli.main(["--config", str(config_file), "--stage", "unet", "--run-dir", str(tmp_path / "c"), "--threads", "1",
              "--init", str(same), "--set", f"unet.tasks={tasks}", "--set", "unet.steps=3", "--out", str(trained)])
    c = checkpoint.load_model(trained)
    assert c.unet.cond_in.weight.any()  # the channels learned something
    image = torch.rand(1, 32, 32, 3)
    video = pipeline.text_to_video(c, "a red ball", given_images=image, given_indices=(3,), **frames)
    kept = pipeline.decode_frames(c.vae, pipeline.encode_frames(c.vae, image), 1)
    assert video.shape == (4, 32, 32, 3)
    assert torch.allclose(video[3], kept[0], atol=0.05)  # the given frame decodes as the image's own round trip


def test_low_t_fraction_draws_that_share_of_timesteps_from_the_low_noise_end(config_file, tmp_path):
    """unet.low_t_fraction / low_t_max: that share of clips trains on timesteps below low_t_max,
    the rest stay uniform over the schedule; out-of-range values are refused before training."""
    torch.manual_seed(0)
    uniform = unet_stage.sample_timesteps(20000, 1000)
    assert uniform.min() >= 0 and uniform.max() == 999 and 0.27 < (uniform < 300).float().mean() < 0.33
    tilted = unet_stage.sample_timesteps(20000, 1000, 0.5, 300)
    # half below 300 for sure, plus 30% of the uniform half: 0.65
    assert tilted.max() > 900 and 0.62 < (tilted < 300).float().mean() < 0.68
    assert unet_stage.sample_timesteps(500, 1000, 1.0, 50).max() < 50
    cli.main(["--config", str(config_file), "--stage", "all", "--run-dir", str(tmp_path / "r"), "--threads", "1",
              "--set", "unet.low_t_fraction=0.5", "--set", "unet.low_t_max=100"])
    assert (tmp_path / "r" / "model.safetensors").exists()
    for bad, found in (("unet.low_t_fraction=1.5", "1.5 and 300"), ("unet.low_t_max=0", "0.0 and 0")):
        with pytest.raises(SystemExit, match=f"low_t_fraction must be in \\[0, 1\\].*got {found}"):
            cli.main(["--config", str(config_file), "--stage", "unet", "--run-dir", str(tmp_path / "r"),
                      "--threads", "1", "--set", bad])


def test_separation_loss_pushes_shape_twins_apart_in_latent_stds(config_file, tmp_path):
    """vae.separation_weight: pairs of frames that differ (an object and its shape twin) cost
    relu(1 - d^2 / margin^2), d in units of the latent std; identical pairs cost nothing,
    scaling every latent does not change it; the stage trains with it and logs it."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    x[3] = x[1]  # the second pair: pixels alike, so no pair
    z = torch.randn(4, 4, 2, 2)
    loss = vae_stage.separation_loss(z, x, margin=100.0)
    d2 = (z[0] - z[2]).pow(2).sum() / z.var()
    assert torch.isclose(loss, 1 - d2 / 100.0**2)
    assert torch.isclose(vae_stage.separation_loss(z * 7, x, 100.0), loss)
    assert vae_stage.separation_loss(z, x, margin=1e-3) == 0  # far enough apart already
    far = z.clone()
    far[2] = z[0] + 0.01  # twins almost alike: the whole unit cost
    assert vae_stage.separation_loss(far, x, 3.0) > 0.99

    run = tmp_path / "r"
    cli.main(["--config", str(config_file), "--stage", "vae", "--run-dir", str(run), "--threads", "1",
              "--set", "vae.separation_weight=0.5"])
    logged = [json.loads(line) for line in (run / "vae.log").read_text().splitlines()]
    assert all(0 <= entry["sep"] <= 1 for entry in logged)
    clips = tmp_path / "clips"
    clips.mkdir()
    with pytest.raises(SystemExit, match="separation_weight trains the encoder on the world's shape twins"):
        cli.main(["--config", str(config_file), "--stage", "vae", "--run-dir", str(tmp_path / "f"), "--threads", "1",
                  "--data-dir", str(clips), "--set", "vae.separation_weight=0.5"])


def test_a_retrained_vae_under_a_trained_unet(config_file, tmp_path):
    """The recipe's last step: the vae stage fine-tunes a MagicVideo file's VAE in a run folder,
    then the unet stage from the same file in the same folder keeps that new VAE (not the
    file's) and exports the UNet trained on its latents with it."""
    first = tmp_path / "first.safetensors"
    cli.main(["--config", str(config_file), "--stage", "all", "--run-dir", str(tmp_path / "a"), "--threads", "1",
              "--out", str(first)])
    run = tmp_path / "sep"
    common = ["--config", str(config_file), "--run-dir", str(run), "--threads", "1", "--init", str(first)]
    cli.main(common + ["--stage", "vae", "--set", "vae.separation_weight=0.5"])
    cli.main(common + ["--stage", "unet"])
    old, new = checkpoint.load_model(first), checkpoint.load_model(run / "model.safetensors")
    retrained = checkpoint.load_model(run / "vae.safetensors").vae.state_dict()
    assert all(torch.equal(v, retrained[k]) for k, v in new.vae.state_dict().items())
    assert any(not torch.equal(v, retrained[k]) for k, v in old.vae.state_dict().items())
    assert new.vae.config.scaling_factor != old.vae.config.scaling_factor


def test_decoder_on_unet_outputs(config_file, tmp_path):
    """vae.decoder_unet_max_t: the decoder stage decodes the frozen UNet's one-step x0 predictions
    of noised clips (half of them left clean), starting from a MagicVideo file in a fresh folder."""
    first = tmp_path / "first.safetensors"
    cli.main(["--config", str(config_file), "--stage", "all", "--run-dir", str(tmp_path / "a"), "--threads", "1",
              "--out", str(first)])
    run = tmp_path / "dec"
    run.mkdir()
    export.adopt_model(export.magicvideo_init(str(first)), run)
    denoise = vae_stage._decoder_denoiser(run, torch.device("cpu"))
    torch.manual_seed(0)
    z = torch.randn(8 * 4, 4, 4, 4)
    out = denoise(z, ["a red circle moving to the left"] * 8, 4, 300).view(8, 4, 4, 4, 4)
    kept = [torch.equal(out[i], z.view(8, 4, 4, 4, 4)[i]) for i in range(8)]
    assert any(kept) and not all(kept)  # some clips clean, the others the UNet's x0

    cli.main(["--config", str(config_file), "--stage", "decoder", "--run-dir", str(run), "--threads", "1",
              "--init", str(first), "--set", "vae.decoder_unet_max_t=300", "--set", "vae.decoder_steps=2"])
    before, after = checkpoint.load_model(first).vae.state_dict(), checkpoint.load_model(run / "vae.safetensors").vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))

    with pytest.raises(SystemExit, match="needs a UNet with its text encoder"):
        cli.main(["--config", str(config_file), "--stage", "decoder", "--run-dir", str(tmp_path / "empty"),
                  "--threads", "1", "--set", "vae.decoder_unet_max_t=300", "--set", "vae.decoder_steps=2"])


def test_decoder_trains_on_sampled_pairs(config_file, tmp_path):
    """vae.decoder_pairs: the sampler's latents of world clips noised part-way (make_decoder_pairs,
    experiments/decoder_pairs.py), decoded against those clips; the file says what it is."""
    first = tmp_path / "first.safetensors"
    cli.main(["--config", str(config_file), "--stage", "all", "--run-dir", str(tmp_path / "a"), "--threads", "1",
              "--out", str(first)])
    bundle = checkpoint.load_model(first)
    settings = {"frames": 4, "size": 32, "options": PRESETS["plain"].replace(steps=4, cfg=2.0)}
    pairs = data.make_decoder_pairs(bundle, 3, 5, (0.3, 0.5), **settings)
    assert pairs["latents"].shape == (3, 4, 4, 4, 4)
    assert all(0.3 <= s <= 0.5 for s in pairs["strengths"].tolist())
    assert not any(s.heldout for s in pairs["specs"])  # training clips only
    again = data.make_decoder_pairs(bundle, 3, 5, (0.3, 0.5), **settings)
    assert torch.equal(again["latents"], pairs["latents"]) and again["captions"] == pairs["captions"]
    with torch.no_grad():  # the sampler's latents, not the encoder's
        clip = world.render(pairs["specs"][0], 4, 32).permute(0, 3, 1, 2) * 2 - 1
        encoded = bundle.vae.encode_dist(clip)[0] * bundle.vae.config.scaling_factor
    assert not torch.allclose(encoded, pairs["latents"][0], atol=1e-3)
    with pytest.raises(ValueError, match="0 < low <= high <= 1"):
        data.make_decoder_pairs(bundle, 1, 5, (0.0, 0.5), **settings)

    path = tmp_path / "pairs.safetensors"
    data.save_decoder_pairs(path, pairs)
    loaded = data.load_decoder_pairs(str(path))
    assert (len(loaded), loaded.frames, loaded.size) == (3, 4, 32)
    z, clips = loaded.batch(np.random.default_rng(0), 2)
    assert z.shape == (2, 4, 4, 4, 4) and clips.shape == (2, 4, 3, 32, 32)
    i = next(k for k in range(3) if torch.equal(pairs["latents"][k], z[0]))
    assert torch.allclose(clips[0], world.render(pairs["specs"][i], 4, 32).permute(0, 3, 1, 2) * 2 - 1)

    run = tmp_path / "dec"
    cli.main(["--config", str(config_file), "--stage", "decoder", "--run-dir", str(run), "--threads", "1",
              "--init", str(first), "--set", f"vae.decoder_pairs={json.dumps([str(path)])}",
              "--set", "vae.decoder_steps=2", "--set", "vae.batch_size=2"])
    logged = [json.loads(line) for line in (run / "decoder.log").read_text().splitlines()]
    assert all(r["rec_pairs"] > 0 for r in logged)
    before, after = bundle.vae.state_dict(), checkpoint.load_model(run / "vae.safetensors").vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    cli.main(["--config", str(config_file), "--stage", "export", "--run-dir", str(run)])
    exported = checkpoint.load_model(run / "model.safetensors")  # the init's UNet with the new decoder
    assert all(torch.equal(v, bundle.unet.state_dict()[k]) for k, v in exported.unet.state_dict().items())
    assert all(torch.equal(v, after[k]) for k, v in exported.vae.state_dict().items())

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SystemExit, match="cannot read"):
        data.load_decoder_pairs([truncated])
    with pytest.raises(SystemExit, match="not a decoder-pairs file"):
        data.load_decoder_pairs([first])
    with pytest.raises(SystemExit, match="4-frame clips; data.frames is 8"):
        cli.main(["--config", str(config_file), "--stage", "decoder", "--run-dir", str(run), "--threads", "1",
                  "--set", f"vae.decoder_pairs={json.dumps([str(path)])}", "--set", "data.frames=8",
                  "--set", "vae.decoder_steps=1"])
    with pytest.raises(SystemExit, match="leaves at least one round trip"):
        cli.main(["--config", str(config_file), "--stage", "decoder", "--run-dir", str(run), "--threads", "1",
                  "--set", f"vae.decoder_pairs={json.dumps([str(path)])}", "--set", "vae.decoder_pairs_share=1",
                  "--set", "vae.batch_size=2", "--set", "vae.decoder_steps=1"])
    with pytest.raises(SystemExit, match="goes on from"):
        cli.main(["--config", str(config_file), "--stage", "decoder", "--run-dir", str(tmp_path / "none"),
                  "--threads", "1", "--set", "vae.decoder_steps=1"])


def test_data_two_object_prob_reaches_the_world_source():
    args = argparse.Namespace(data_dir=None)
    cfg = {"frames": 4, "size": 32, "fps": 8}
    counts = {}
    for p in (0.0, 1.0):
        source = data.make_source({"data": {**cfg, "two_object_prob": p}}, args, seed=3)
        _, _, specs = source.batch_with_specs(12)
        counts[p] = sum(len(s.objects) for s in specs)
    assert counts[0.0] == 12 and counts[1.0] > 20
    assert data.make_source({"data": cfg}, args, seed=3).two_object_prob == 0.3


def test_data_motion_weights_reach_the_world_source_and_bad_ones_fail_at_start():
    args = argparse.Namespace(data_dir=None)
    cfg = {"frames": 4, "size": 32, "fps": 8, "two_object_prob": 0.0}
    source = data.make_source({"data": {**cfg, "motion_weights": {"rotate": 1000.0}}}, args, seed=3)
    _, _, specs = source.batch_with_specs(8)
    assert sum(s.objects[0].motion == "rotate" for s in specs) >= 7
    with pytest.raises(ValueError, match=r"unknown motion\(s\) \['sideways'\]"):
        data.make_source({"data": {**cfg, "motion_weights": {"sideways": 2}}}, args, seed=3)


def test_time_budget_fits_the_schedule_to_the_minutes_measured_after_warm_up(monkeypatch):
    clock = {"now": 100.0}
    monkeypatch.setattr(loop.time, "time", lambda: clock["now"])
    budget = loop.TimeBudget(1.0, start=0)  # 60 s from now
    fitted, total = [], 5000
    for step in range(100):
        clock["now"] += 5.0 if step < 10 else 0.1  # slow warm-up steps, then 10 steps/s
        fitted.append(budget.fit(step, total))
        total = fitted[-1] or total  # as the training loop does
    done = [(step, f) for step, f in enumerate(fitted) if f is not None]
    assert len(done) == 1  # fitted once, at the end of the measuring window; a steady rate is not re-cut
    step, steps = done[0]
    assert step == 30 and budget.rate == pytest.approx(10.0, rel=0.06)
    left = 60.0 - (50.0 + 20 * 0.1 + 0.1)  # the warm-up and measuring steps already spent
    assert steps == pytest.approx(30 + 10 * left, abs=3)
    # the rate is measured again every RECHECK steps: a run that slows down is cut further
    clock["now"] = 0.0
    slowing = loop.TimeBudget(1.0, start=0)
    cuts = []
    for step in range(400):
        clock["now"] += 0.1 if step <= 30 else 0.2  # 10 steps/s while measured, then 5
        total = cuts[-1][1] if cuts else 5000
        if step >= total:
            break
        f = slowing.fit(step, total)
        if f is not None:
            cuts.append((step, f))
    assert cuts[0] == (30, pytest.approx(30 + 10 * (60 - 3.1), abs=3))  # first fit: ~599 steps
    assert len(cuts) > 1 and cuts[-1][1] < 0.7 * cuts[0][1]
    assert cuts[-1][1] * 0.2 == pytest.approx(60.0 + 30 * 0.1, rel=0.1)  # ends near 60 s
    # a budget longer than the configured steps need leaves the schedule alone
    clock["now"] = 0.0
    roomy = loop.TimeBudget(60.0, start=0)
    assert all(roomy.fit(s, 200) is None for s in range(60))
    with pytest.raises(SystemExit, match="--minutes must be more than 0"):
        loop.TimeBudget(0.0, start=0)


def test_minutes_and_bf16_autocast_run_the_unet_stage_and_record_the_fitted_schedule(config_file, tmp_path):
    run = tmp_path / "run"
    base = ["--config", str(config_file), "--run-dir", str(run), "--threads", "1"]
    cli.main(base + ["--stage", "vae"])
    cli.main(base + ["--stage", "unet", "--minutes", "0.001", "--set", "unet.steps=5000",
                     "--set", "unet.autocast=bf16"])
    recorded = json.loads((run / "config.json").read_text())["unet"]
    assert recorded["steps"] == 31 and recorded["autocast"] == "bf16"  # no time left after measuring
    logged = [json.loads(line) for line in (run / "unet.log").read_text().splitlines()]
    assert logged[-1]["step"] == 30 and np.isfinite(logged[-1]["loss"])
    assert logged[-1]["lr"] == pytest.approx(loop.cosine_lr(30, 31, TINY["unet"]["lr"]))
    assert json.loads(checkpoint.load_model(run / "model.safetensors").metadata["training_recipe"])["unet"]["steps"] == 31
    with pytest.raises(SystemExit, match="unet.autocast: expected none or bf16, found 'fp8'"):
        cli.main(base + ["--stage", "unet", "--set", "unet.autocast=fp8"])


def test_profile_writes_where_the_steps_time_goes(config_file, tmp_path):
    run = tmp_path / "run"
    base = ["--config", str(config_file), "--run-dir", str(run), "--threads", "1"]
    cli.main(base + ["--stage", "vae"])
    cli.main(base + ["--stage", "unet", "--set", "unet.steps=38", "--profile", "2"])
    text = (run / "profile.txt").read_text()
    first = text.splitlines()[0]
    assert first.startswith("2 steps profiled from step 35 on cpu:") and float(first.split(", ")[1].split()[0]) > 0
    assert "Self CPU" in text and "aten::convolution" in text  # the UNet's own ops, by their own time
    with pytest.raises(SystemExit, match="--profile must be at least 1 step, got 0"):
        cli.main(base + ["--stage", "unet", "--profile", "0"])



def test_a_sparsity_aware_leg_keeps_two_of_every_four_weights(config_file, tmp_path):
    """unet.sparsity 2:4: the pruned weights stay zero through training and in the exported EMA
    weights, so quantising the file with 2:4 loses nothing more."""
    from magicvideo.models import quant

    run = tmp_path / "run"
    base = ["--config", str(config_file), "--run-dir", str(run), "--threads", "1"]
    cli.main(base + ["--stage", "vae"])
    cli.main(base + ["--stage", "unet", "--set", "unet.steps=3", "--set", 'unet.sparsity="2:4"'])
    unet = checkpoint.load_model(run / "model.safetensors").unet
    masks = quant.sparsity_masks(unet)
    assert masks
    for name, mask in masks.items():
        weight = unet.get_submodule(name).weight
        assert not weight[~mask].any(), name
        assert ((weight.flatten(1) != 0).view(weight.shape[0], -1, 4).sum(-1) <= 2).all()
    with pytest.raises(SystemExit, match="unet.sparsity: expected none or 2:4"):
        cli.main(base + ["--stage", "unet", "--set", 'unet.sparsity="1:4"'])


def test_the_init_model_teaches_its_pruned_copy(config_file, tmp_path):
    """unet.teacher_weight: the --init model, frozen, predicts on the same inputs; its prediction is
    a second target. Dense and unpruned the student starts equal to it (term 0 at step 0); pruned
    2:4 it does not, and the term is logged."""
    import json

    run, leg = tmp_path / "run", tmp_path / "leg"
    base = ["--config", str(config_file), "--threads", "1"]
    cli.main(base + ["--run-dir", str(run), "--stage", "vae"])
    cli.main(base + ["--run-dir", str(run), "--stage", "unet", "--set", "unet.steps=2"])
    init = ["--init", str(run / "model.safetensors"), "--set", "unet.teacher_weight=1.0"]
    cli.main(base + ["--run-dir", str(tmp_path / "dense"), "--stage", "unet", "--set", "unet.steps=1"] + init)
    [first] = [json.loads(x) for x in (tmp_path / "dense" / "unet.log").read_text().splitlines()][:1]
    assert first["teacher"] == pytest.approx(0.0, abs=1e-12)
    cli.main(base + ["--run-dir", str(leg), "--stage", "unet", "--set", "unet.steps=2",
                     "--set", 'unet.sparsity="2:4"'] + init)
    logged = [json.loads(x) for x in (leg / "unet.log").read_text().splitlines()]
    assert logged[0]["teacher"] > 0
    with pytest.raises(SystemExit, match="unet.teacher_weight: expected a weight >= 0 with a MagicVideo --init"):
        cli.main(base + ["--run-dir", str(tmp_path / "none"), "--stage", "unet", "--set", "unet.teacher_weight=1.0"])


def test_a_world_source_at_k_times_the_rate_gives_true_in_betweens():
    """rate k: windows of (frames - 1) // k * k + 1 frames cut from the clip rendered at k times
    the rate; every k-th frame is a keyframe one usual frame interval from the next."""
    source = data.WorldSource(5, frames=7, size=32, rate=3)
    videos, captions, specs = source.batch_with_specs(3)
    assert videos.shape == (3, 7, 3, 32, 32) and len(captions) == 3
    for video, spec in zip(videos, specs):
        full = world.render(spec, frames=19, size=32).permute(0, 3, 1, 2) * 2 - 1
        starts = [s for s in range(13) if torch.allclose(full[s: s + 7], video, atol=1e-6)]
        assert starts  # a run of consecutive frames of the clip at 3x the rate
    assert data.WorldSource(5, frames=7, size=32, rate=2).batch(1)[0].shape[1] == 7
    assert data.WorldSource(5, frames=7, size=32, rate=4).batch(1)[0].shape[1] == 5
    with pytest.raises(ValueError, match="rate must be"):
        data.WorldSource(5, frames=7, size=32, rate=0)


def test_interp_rate_trains_on_clips_at_k_times_the_rate(config_file, tmp_path, monkeypatch):
    """unet.interp_rate: interpolation batches come from clips at 2-3x the rate (frames 4 holds
    a gap for k <= 3), every k-th frame given, at fps 8k; other batches keep the usual tasks."""
    from magicvideo.models.unet import VideoUNet

    seen = []  # what each training forward was given: the real UNet runs, its inputs are recorded
    forward = VideoUNet.forward

    def recording(self, x, timesteps, context, num_frames, fps=None, cond=None):
        if torch.is_grad_enabled():
            seen.append((sorted(set(fps.tolist())), timesteps.view(-1, num_frames).eq(0).tolist()))
        return forward(self, x, timesteps, context, num_frames, fps=fps, cond=cond)

    monkeypatch.setattr(VideoUNet, "forward", recording)
    g = torch.Generator().manual_seed(0)
    drawn = [unet_stage.draw_rate({"text": 0.5, "interp": 0.5}, (2, 3), g) for _ in range(2000)]
    assert 0.45 < drawn.count(0) / 2000 < 0.55 and set(drawn) == {0, 2, 3}
    out = tmp_path / "interp.safetensors"
    cli.main(["--config", str(config_file), "--stage", "all", "--run-dir", str(tmp_path / "run"), "--threads", "1",
              "--set", 'unet.tasks={"text": 0.2, "interp": 0.8}', "--set", "unet.interp_rate=true",
              "--set", "unet.steps=4", "--out", str(out)])
    logged = [json.loads(line) for line in (tmp_path / "run" / "unet.log").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in logged)
    assert checkpoint.load_model(out).unet.config.image_first  # it learned from given frames
    config = json.loads(config_file.read_text())
    base_fps = config["data"].get("fps", 8)
    rated = [(fps, given) for fps, given in seen if fps != [base_fps]]
    assert len(seen) == 4 and rated, f"no batch at 2-3x the rate reached the UNet: {seen}"
    for fps, given in rated:  # a whole batch at one rate k, every k-th frame given
        [f] = fps
        k = round(f / base_fps)
        assert k in (2, 3) and all(row == [i % k == 0 for i in range(len(row))] for row in given), (fps, given)
    seen.clear()
    # the interpolator's view: its temporal attention sees both sides of a gap, and its file says so
    both = tmp_path / "both.safetensors"
    cli.main(["--config", str(config_file), "--stage", "unet", "--run-dir", str(tmp_path / "run"), "--threads", "1",
              "--init", str(out), "--set", 'unet.tasks={"interp": 1.0}', "--set", "unet.interp_rate=true",
              "--set", "unet.temporal_bidirectional=true", "--set", "unet.steps=2", "--out", str(both)])
    assert len(seen) == 2 and all(fps != [base_fps] for fps, _ in seen)  # interp only: every batch at a higher rate
    unet = checkpoint.load_model(both).unet
    assert unet.config.temporal_bidirectional and all(
        m.bidirectional for m in unet.modules() if hasattr(m, "bidirectional"))
    with pytest.raises(SystemExit, match="interp_rate"):
        cli.main(["--config", str(config_file), "--stage", "unet", "--run-dir", str(tmp_path / "run2"),
                  "--set", 'unet.tasks={"text": 1.0}', "--set", "unet.interp_rate=true"])
