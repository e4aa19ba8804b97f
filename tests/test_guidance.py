"""Motion guidance (models/guidance.py): caption parsing into paths and tokens, the sampler's
steer hook, and the bundled default's attention blobs moving towards their paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from einops import repeat

from magicvideo.models import evaluate as ev, guidance, world
from magicvideo.models.sampling import sample
from magicvideo.training import binding_targets
from magicvideo.models.unet import UNetConfig, VideoUNet

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


def test_caption_paths():
    still = guidance.caption_path("still", None, 16)
    assert still.shape == (16, 3) and not still.any()
    left = guidance.caption_path("left", "fast", 16)
    assert left[0, 0] - left[-1, 0] == pytest.approx(world.LINEAR_TRAVEL["fast"]) and not left[:, 1:].any()
    grow = guidance.caption_path("grow", "slow", 16)
    assert not grow[:, :2].any() and grow[-1, 2] - grow[0, 2] == pytest.approx(np.log(world.SCALE_FACTOR["slow"]))
    assert left.mean(0).abs().max() < 1e-6  # no start place is asked for
    bounce = guidance.caption_path("bounce", "slow", 16)
    assert not bounce[:, 0].any() and bounce[:, 1].std() > 0.05
    assert guidance.caption_path(None, None, 16) is None
    assert torch.equal(guidance.caption_path("left", None, 16), guidance.caption_path("left", "slow", 16))


def test_targets_use_the_encoders_tokens_and_skip_unknown_words():
    q = next(q for q in ev.prompt_set(0) if len(q.spec.objects) == 2)
    known = set(world.vocabulary())
    targets = guidance.targets_from_caption(q.caption, known, 16)
    rows = binding_targets(q.spec, q.caption, "object")
    assert [t.tokens for t in targets] == [tuple(i for i in r if i >= 0) for r in rows[:2]]
    # an unknown word is left out of the context, so the tokens after it shift back
    noisy = guidance.targets_from_caption("zzz a red ball moving left slowly", known, 16)
    assert [t.tokens for t in noisy] == [t.tokens for t in guidance.targets_from_caption(
        "a red ball moving left slowly", known, 16)]
    assert guidance.targets_from_caption("a red ball", known, 16) == []  # no motion: nothing to steer


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


class CountingSteer:
    def __init__(self, until=1.0, shift=0.0):
        self.until, self.shift, self.calls = until, shift, []

    def applies(self, progress):
        return progress <= self.until

    def __call__(self, x_in, t, context, **kw):
        self.calls.append(float(t[0]))
        return x_in + self.shift


def _sample(unet, steer=None, frames=4, **kw):
    ctx = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1))
    return sample(unet, torch.zeros(frames, 4, 8, 8), ctx, torch.zeros(1, 6, 16), num_frames=frames, steps=6,
                  cfg=3.0, seed=2, steer=steer, **kw)


def test_sampler_steer_hook():
    unet = Recorder()
    plain = _sample(unet)
    same = CountingSteer()
    assert torch.equal(plain, _sample(unet, same)) and len(same.calls) == 6  # a steer that moves nothing
    early = CountingSteer(until=0.5)
    _sample(unet, early)
    assert 0 < len(early.calls) < 6 and all(t >= 999 * 0.5 for t in early.calls)
    unet.seen.clear()
    shifted = CountingSteer(until=0.0, shift=0.5)  # the first step only
    moved = _sample(unet, shifted)
    assert len(shifted.calls) == 1 and not torch.allclose(moved, plain)
    # the model sees the moved input on that step (both halves of the guided batch)
    first = unet.seen[0]
    unet.seen.clear()
    _sample(unet)
    assert torch.allclose(first, unet.seen[0] + 0.5)


def test_image_first_models_steer_only_the_video_pass():
    unet = Recorder(image_first=True)
    steer = CountingSteer()
    _sample(unet, steer)
    assert len(steer.calls) == 6  # the frame-0 pass (a path needs the video's frames) is not steered


def test_guidance_errors():
    unet = Recorder()
    with pytest.raises(ValueError, match="strength must be >= 0"):
        guidance.MotionGuidance(unet, [], strength=-1)
    target = guidance.ObjectTarget((1, 2), guidance.caption_path("left", "slow", 16))
    steer = guidance.MotionGuidance(unet.inner, [target], strength=0.2)
    x, t, ctx = torch.randn(4, 4, 8, 8), torch.full((4,), 900.0), torch.randn(4, 6, 16)
    with pytest.raises(ValueError, match="a path of 16 frames for a video of 4"):
        steer(x, t, ctx, num_frames=4)
    far = guidance.MotionGuidance(unet.inner, [guidance.ObjectTarget((1, 9), target.path[:4])], strength=0.2)
    with pytest.raises(ValueError, match="token 9.*6 tokens"):
        far(x, t, ctx, num_frames=4)
    with torch.inference_mode():
        made_there = Recorder().inner
    with pytest.raises(ValueError, match="made under torch.inference_mode"):
        guidance.MotionGuidance(made_there, [target], strength=0.2)(x, t, ctx, num_frames=16)


@pytest.fixture(scope="module")
def default():
    from magicvideo.models.checkpoint import load_model

    assert WEIGHTS.is_file(), "the bundled default model is part of the repository"
    return load_model(str(WEIGHTS))


def test_default_blobs_move_towards_their_paths(default):
    caption = "a white square moving up and left quickly and an orange ball slowly gliding down and left"
    targets = guidance.targets_from_caption(caption, set(default.text_encoder.word_to_id), 16)
    assert len(targets) == 2
    context = repeat(default.text_encoder.encode([caption])[0], "b s d -> (b f) s d", f=16)
    x = torch.randn(16, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    steer = guidance.MotionGuidance(default.unet, targets, strength=0.2, iters=2, record=True)
    with torch.inference_mode():  # as the host runs the sampler (inputs made there too)
        x, context = x.clone(), context.clone()
        moved = steer(x, torch.full((16,), 900.0), context, num_frames=16, fps=8.0)
    before, after = steer.losses[0]
    assert after < 0.9 * before, steer.losses
    step = (moved - x).pow(2).mean().sqrt()
    assert 0.2 < step < 0.4  # two steps of RMS 0.2
    assert not any(p.grad is not None for p in default.unet.parameters())  # the weights are not touched


def test_text_to_video_motion_guidance(default):
    from magicvideo.models.pipeline import RequestError, text_to_video

    kw = dict(frames=16, width=64, height=64, steps=4, cfg=6.0, seed=3)
    caption = "a red ball moving left quickly"
    plain = text_to_video(default, caption, **kw)
    steered = text_to_video(default, caption, motion_guidance=0.2, **kw)
    assert steered.shape == plain.shape and not torch.allclose(plain, steered, atol=1e-3)
    # a prompt with no motion to follow samples exactly as without guidance
    still_life = "a red ball"
    assert torch.equal(text_to_video(default, still_life, **kw),
                       text_to_video(default, still_life, motion_guidance=0.2, **kw))
    with pytest.raises(RequestError, match="strength must be >= 0"):
        text_to_video(default, caption, motion_guidance=-0.1, **kw)
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


def test_separation_term_scores_overlapping_blobs():
    still = guidance.caption_path("still", None, 4)
    targets = [guidance.ObjectTarget((1,), still), guidance.ObjectTarget((2,), still)]
    apart, same = _blob_probs([(1, 1), (5, 5)]), _blob_probs([(3, 3), (3, 3)])
    # without the term the paths alone cannot tell the two layouts apart (both blobs stay put)
    assert guidance.track_loss([apart], targets, 4) == pytest.approx(0.0, abs=1e-9)
    assert guidance.track_loss([same], targets, 4) == pytest.approx(0.0, abs=1e-9)
    # with it, blobs on the same cells cost (Bhattacharyya overlap 1), blobs apart nothing
    assert float(guidance.track_loss([apart], targets, 4, separation_weight=2.0)) == pytest.approx(0.0, abs=1e-4)
    assert float(guidance.track_loss([same], targets, 4, separation_weight=2.0)) == pytest.approx(2.0 / 3, rel=1e-3)
    one = [targets[0]]  # a single object has nothing to be apart from
    assert float(guidance.track_loss([same], one, 4, separation_weight=2.0)) == pytest.approx(0.0, abs=1e-9)
