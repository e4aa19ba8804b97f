"""Motion guidance (models/guidance.py): prompts read into paths and tokens, the guidance
pieces as denoisers the sampler runs, and the bundled default's attention blobs moving towards
their paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from magicvideo.models import evaluate as ev, guidance, lexicon, pipeline, world
from magicvideo.models.conditioning import no_frames_given
from magicvideo.models.sampling import PRESETS, SamplingOptions, sample
from magicvideo.models.text import TextConfig, TextEncoder
from magicvideo.models.unet import UNetConfig, VideoUNet
from magicvideo.training import binding_targets

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "magicvideo_default.safetensors"


def test_parse_caption_recovers_every_prompt_of_the_sets():
    for seed in (0, 1):
        for q in ev.prompt_set(seed):
            objs = world.parse_caption(q.caption)
            assert [(o.colour, o.shape, o.motion, o.speed) for o in objs] == \
                [(o.colour, o.shape, o.motion, o.speed) for o in q.spec.objects], q.caption
            assert [o.words for o in objs] == world.object_word_positions(q.caption, q.spec, motion=True)


def test_parse_caption_on_free_text():
    [ball] = world.parse_caption("A violet ball, bouncing up and down quickly!")
    assert (ball.colour, ball.shape, ball.motion, ball.speed) == ("purple", "circle", "bounce", "fast")
    [box] = world.parse_caption("red box")
    assert (box.motion, box.speed, box.words) == (None, None, (0, 1))
    [left, up] = world.parse_caption("two objects: a red dot going up and left and a blue box drifting up slowly")
    assert (left.motion, left.speed, up.motion, up.speed) == ("up_left", None, "up", "slow")
    assert world.parse_caption("a cat running") == [] and world.parse_caption("") == []


def _path(motion, speed, frames=16):
    params = world.lexicon().motion_params(motion, speed)
    return None if params is None else lexicon.path(params, frames)


def test_motion_paths():
    still = _path("still", None)
    assert still.shape == (16, 3) and not still.any()
    left = _path("left", "fast")
    assert left[0, 0] - left[-1, 0] == pytest.approx(world.LINEAR_TRAVEL["fast"]) and not left[:, 1:].any()
    grow = _path("grow", "slow")
    assert not grow[:, :2].any() and grow[-1, 2] - grow[0, 2] == pytest.approx(np.log(world.SCALE_FACTOR["slow"]))
    assert left.mean(0).abs().max() < 1e-6  # no start place is asked for
    bounce = _path("bounce", "slow")
    assert not bounce[:, 0].any() and bounce[:, 1].std() > 0.05
    assert _path(None, None) is None
    assert torch.equal(_path("left", None), _path("left", "slow"))  # no speed word: the default speed
    assert _path("left", "slow", frames=1).shape == (1, 3)


def _encoder(**changes):
    torch.manual_seed(0)
    return TextEncoder(TextConfig(**{**world.text_fields(), **changes}, width=16, layers=1, heads=2))


def test_targets_use_the_encoders_tokens_and_skip_unknown_words():
    enc = _encoder()
    q = next(q for q in ev.prompt_set(0) if len(q.spec.objects) == 2)
    request = enc.motion_request(q.caption)
    assert request["unit_travel"] == world.LINEAR_TRAVEL["slow"]
    targets = guidance.targets(request, 16)
    rows = binding_targets(q.spec, q.caption, "object")
    assert [t.tokens for t in targets] == [tuple(i for i in r if i >= 0) for r in rows[:2]]
    for target, obj in zip(targets, q.spec.objects):
        assert torch.equal(target.path, _path(obj.motion, obj.speed))
    # an unknown word is left out of the context, so the tokens after it shift back
    noisy = guidance.targets(enc.motion_request("zzz a red ball moving left slowly"), 16)
    clean = guidance.targets(enc.motion_request("a red ball moving left slowly"), 16)
    assert [t.tokens for t in noisy] == [t.tokens for t in clean] == [(2, 3, 4, 5, 6)]
    assert guidance.targets(enc.motion_request("a red ball"), 16) == []  # no motion: nothing to steer
    assert guidance.targets(None, 16) == []
    # an encoder without a lexicon cannot read prompts: nothing is steered
    assert _encoder(lexicon=None).motion_request(q.caption) is None


class Recorder(torch.nn.Module):
    """A tiny real VideoUNet (attention at 8x8 cells) that records the inputs it sees."""

    def __init__(self, **config):
        super().__init__()
        torch.manual_seed(0)
        self.inner = VideoUNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                          attention_resolutions=(1,), num_heads=2, context_dim=16, max_frames=8,
                                          **config)).eval()
        with torch.no_grad():
            for p in self.inner.parameters():
                if not p.any():
                    p.normal_(0, 0.02)
        self.config, self.seen = self.inner.config, []

    def forward(self, x, t, context, **kw):
        self.seen.append(x.detach().clone())
        return self.inner(x, t, context, **kw)


class Shift:
    """A guidance piece that moves the sample by ``shift`` on the steps up to ``until``."""

    def __init__(self, inner, until=1.0, shift=0.0):
        self.inner, self.until, self.shift, self.calls = inner, until, shift, []

    def check(self, batch):
        self.inner.check(batch)

    def __call__(self, x_in, t, progress):
        if progress <= self.until:
            self.calls.append(float(t[0]))
            x_in = x_in + self.shift
        out, _ = self.inner(x_in, t, progress)
        return out, x_in


OPTIONS = SamplingOptions(steps=6, cfg=3.0, cfg_end=1.0, seed=2, motion_guidance=0.0)
CONTEXT = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1))


def _cfg(unet, frames=4):
    base = guidance.VideoDenoiser(unet, CONTEXT, num_frames=frames, fps=8.0)
    return base, guidance.ClassifierFreeGuidance(base, torch.zeros(1, 6, 16), OPTIONS.cfg, OPTIONS.guided)


def _sample(unet, wrap=None, frames=4):
    _, denoiser = _cfg(unet, frames)
    if wrap is not None:
        denoiser = wrap(denoiser)
    return sample(denoiser, torch.zeros(frames, 4, 8, 8), num_frames=frames, options=OPTIONS,
                  prediction_type=unet.config.prediction_type)


def test_the_sampler_follows_a_guidance_piece_that_moves_the_sample():
    unet = Recorder()
    plain = _sample(unet)
    same = []
    assert torch.equal(plain, _sample(unet, lambda d: same.append(Shift(d)) or same[0]))  # moves nothing
    assert len(same[0].calls) == 6
    early = []
    _sample(unet, lambda d: early.append(Shift(d, until=0.5)) or early[0])
    assert 0 < len(early[0].calls) < 6 and all(t >= 999 * 0.5 for t in early[0].calls)
    unet.seen.clear()
    shifted = []
    moved = _sample(unet, lambda d: shifted.append(Shift(d, until=0.0, shift=0.5)) or shifted[0])  # the first step only
    assert len(shifted[0].calls) == 1 and not torch.allclose(moved, plain)
    # the model sees the moved input on that step (both halves of the guided batch)
    first = unet.seen[0]
    unet.seen.clear()
    _sample(unet)
    assert first.shape[0] == 8 and torch.allclose(first, unet.seen[0] + 0.5)


def _request(motion="left", speed="slow", tokens=(1, 2)):
    return {"objects": [{"tokens": list(tokens), "path": world.lexicon().motion_params(motion, speed)}],
            "unit_travel": world.LINEAR_TRAVEL["slow"]}


def test_motion_guidance_steers_only_its_part_of_the_schedule():
    unet = Recorder()
    base, cfg = _cfg(unet)
    targets = guidance.targets(_request(), 4)
    steer = guidance.MotionGuidance(cfg, base, targets, strength=0.2, until=0.3, unit_travel=0.26)
    steer.check(4)
    x, t = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.full((4,), 900.0)
    late_out, late_x = steer(x, t, 0.5)  # past `until`: the inner denoiser alone, the sample unmoved
    assert late_x is x and torch.equal(late_out, cfg(x, t, 0.5)[0]) and steer.losses == []
    out, moved = steer(x, t, 0.1)
    assert len(steer.losses) == 1 and steer.losses[0] > 0
    assert (moved - x).pow(2).mean().sqrt() == pytest.approx(0.2, rel=1e-3)  # one step of RMS `strength`
    assert torch.allclose(out, cfg(moved, t, 0.1)[0], atol=1e-5)  # the inner denoiser runs on the moved sample
    # strength 0 moves nothing
    off = guidance.MotionGuidance(cfg, base, targets, strength=0.0, until=1.0, unit_travel=0.26)
    assert off(x, t, 0.1)[1] is x
    # frozen (given) frames stay where they are
    frozen = torch.tensor([True, False, False, False])
    held = guidance.MotionGuidance(cfg, base, targets, strength=0.2, until=1.0, unit_travel=0.26, frozen=frozen)
    _, moved = held(x, t, 0.1)
    assert torch.equal(moved[0], x[0]) and not torch.allclose(moved[1:], x[1:])


def test_image_first_models_steer_only_the_video_pass(monkeypatch):
    unet = Recorder(image_first=True)
    steered = []
    steer = guidance.MotionGuidance.steer

    def counting(self, x_in, t):
        steered.append(x_in.shape[0])
        return steer(self, x_in, t)

    monkeypatch.setattr(guidance.MotionGuidance, "steer", counting)
    options = OPTIONS.replace(motion_guidance=0.2, motion_guidance_until=1.0)
    out = pipeline.sample_video(unet, torch.zeros(4, 4, 8, 8), CONTEXT, torch.zeros(1, 6, 16), num_frames=4,
                                options=options, motion=_request())
    assert out.shape == (4, 4, 8, 8) and torch.isfinite(out).all()
    assert any(x.shape[0] == 2 for x in unet.seen)  # the frame-0 pass ran (one frame, both guidance halves) ...
    assert steered == [4] * 6  # ... but only the video pass was steered (a path needs the video's frames)


def test_guidance_errors():
    unet = Recorder()
    with pytest.raises(ValueError, match="motion_guidance must be at least 0"):
        OPTIONS.replace(motion_guidance=-1.0).check()
    with pytest.raises(pipeline.RequestError, match="motion_guidance must be at least 0"):
        pipeline.sample_video(unet, torch.zeros(4, 4, 8, 8), CONTEXT, None, num_frames=4,
                              options=OPTIONS.replace(cfg=1.0, motion_guidance=-1.0), motion=_request())
    base = guidance.VideoDenoiser(unet, CONTEXT, num_frames=4, fps=8.0)
    x, t = torch.randn(4, 4, 8, 8), torch.full((4,), 900.0)
    target = guidance.ObjectTarget((1, 2), _path("left", "slow", 16))
    steer = guidance.MotionGuidance(base, base, [target], strength=0.2, until=0.3, unit_travel=0.26)
    with pytest.raises(ValueError, match="a path of 16 frames for a video of 4"):
        steer(x, t, 0.0)
    far = guidance.MotionGuidance(base, base, [guidance.ObjectTarget((1, 9), target.path[:4])], strength=0.2,
                                  until=0.3, unit_travel=0.26)
    with pytest.raises(ValueError, match="token 9.*6 tokens"):
        far.check(4)
    with pytest.raises(pipeline.RequestError, match="token 9.*6 tokens"):  # before any sampling
        pipeline.sample_video(unet, torch.zeros(4, 4, 8, 8), CONTEXT, None, num_frames=4,
                              options=OPTIONS.replace(cfg=1.0, motion_guidance=0.2),
                              motion=_request(tokens=(1, 9)))
    with torch.inference_mode():
        made_there = Recorder().inner
    there = guidance.VideoDenoiser(made_there, CONTEXT, num_frames=4, fps=8.0)
    with pytest.raises(ValueError, match="made under torch.inference_mode"):
        guidance.MotionGuidance(there, there, [guidance.ObjectTarget((1, 2), target.path[:4])], strength=0.2,
                                until=0.3, unit_travel=0.26).check(4)
    # too coarse a grid to find blobs on: said before sampling
    with pytest.raises(pipeline.RequestError, match="at least 8x8"):
        pipeline.sample_video(unet, torch.zeros(4, 4, 4, 4), CONTEXT, None, num_frames=4,
                              options=OPTIONS.replace(cfg=1.0, motion_guidance=0.2), motion=_request())


@pytest.fixture(scope="module")
def default():
    from magicvideo.models.checkpoint import load_model

    assert WEIGHTS.is_file(), "the bundled default model is part of the repository"
    return load_model(str(WEIGHTS))


def test_default_blobs_move_towards_their_paths(default):
    caption = "a white square moving up and left quickly and an orange ball slowly gliding down and left"
    request = default.text_encoder.motion_request(caption)
    targets = guidance.targets(request, 16)
    assert len(targets) == 2
    nothing_given = no_frames_given(1, 16, default.unet.config.cond_channels, (16, 16))
    base = guidance.VideoDenoiser(default.unet, default.text_encoder.encode([caption])[0], num_frames=16, fps=8.0,
                                  cond=nothing_given)
    steer = guidance.MotionGuidance(base, base, targets, strength=0.2, until=0.3, unit_travel=request["unit_travel"])
    x = torch.randn(16, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((16,), 900.0)
    with torch.inference_mode():  # as the host runs the sampler (inputs made there too)
        x = x.clone()
        moved = steer.steer(steer.steer(x, t), t)
        after = float(steer.loss(moved, t))
    before = steer.losses[0]
    assert len(steer.losses) == 2 and after < 0.9 * before, (steer.losses, after)
    step = (moved - x).pow(2).mean().sqrt()
    assert 0.2 < step < 0.4  # two steps of RMS 0.2
    assert not any(p.grad is not None for p in default.unet.parameters())  # the weights are not touched


def test_text_to_video_motion_guidance(default):
    from magicvideo.models.pipeline import RequestError, text_to_video

    kw = dict(frames=16, width=64, height=64)
    options = PRESETS["main"].replace(steps=4, seed=3, motion_guidance=0.0)
    caption = "a red ball moving left quickly"
    plain = text_to_video(default, caption, options=options, **kw)
    steered = text_to_video(default, caption, options=options.replace(motion_guidance=0.2), **kw)
    assert steered.shape == plain.shape and not torch.allclose(plain, steered, atol=1e-3)
    # a prompt with no motion to follow samples exactly as without guidance
    still_life = "a red ball"
    assert torch.equal(text_to_video(default, still_life, options=options, **kw),
                       text_to_video(default, still_life, options=options.replace(motion_guidance=0.2), **kw))
    with pytest.raises(RequestError, match="motion_guidance must be at least 0"):
        text_to_video(default, caption, options=options.replace(motion_guidance=-0.1), **kw)
    assert np.isfinite(steered.numpy()).all()


def _blob_probs(centres: list[tuple[int, int]], frames: int = 4, side: int = 8, tokens: int = 5) -> torch.Tensor:
    """Cross-attention probs [frames, 1 head, cells, tokens]: object k's token (k + 1) is looked at
    only by the cells of a 2x2 blob at ``centres[k]``, the rest of each cell's attention on <bos>."""
    probs = torch.zeros(frames, 1, side * side, tokens)
    probs[..., 0] = 1.0
    for k, (cy, cx) in enumerate(centres):
        for y in (cy, cy + 1):
            for x in (cx, cx + 1):
                probs[:, 0, y * side + x, 0] -= 0.5
                probs[:, 0, y * side + x, k + 1] += 0.5
    return probs


def test_track_loss_measures_the_blobs_travel_against_their_paths():
    still = _path("still", None, 4)
    targets = [guidance.ObjectTarget((1,), still), guidance.ObjectTarget((2,), still)]
    apart, same = _blob_probs([(1, 1), (5, 5)]), _blob_probs([(3, 3), (3, 3)])
    # blobs that stay put match a still path wherever they are
    assert float(guidance.track_loss([apart], targets, 4, 0.26)) == pytest.approx(0.0, abs=1e-9)
    assert float(guidance.track_loss([same], targets, 4, 0.26)) == pytest.approx(0.0, abs=1e-9)
    # a blob that stays put against a path to the left: the path's mean squared offset, in units of unit_travel
    left = _path("left", "slow", 4)
    expected = float((left[:, :2] ** 2).sum(-1).mean())
    one = [guidance.ObjectTarget((1,), left)]
    assert float(guidance.track_loss([apart], one, 4, 1.0)) == pytest.approx(expected, rel=1e-5)
    assert float(guidance.track_loss([apart], one, 4, 0.26)) == pytest.approx(expected / 0.26**2, rel=1e-5)
    # grids coarser than MIN_SIDE are skipped; none left is an error
    with pytest.raises(ValueError, match="at least 8x8"):
        guidance.track_loss([_blob_probs([(1, 1)], side=4)], one, 4, 1.0)
