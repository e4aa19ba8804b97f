"""VideoUNet: parity with the host's SD1.5 UNet, causality, adaptor locality, conditioning.

Tiny configs run in milliseconds; the SD1.5-size parity uses the real configuration
(model_channels 320) on an 8x8 latent. Host tests take ``host_comfy`` (tests/sd15_fixture.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from magicvideo.models.unet import (
    CrossAttention,
    FrameAdaptor,
    UNetConfig,
    VideoUNet,
    is_motion_key,
    motion_state_dict,
)
from sd15_fixture import host_comfy, host_unet_kwargs, randomize_  # noqa: F401  (fixture)

TINY = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
            num_heads=2, context_dim=16, max_frames=8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def tiny(seed: int = 0, **overrides) -> VideoUNet:
    """A tiny VideoUNet with random 2D weights (non-zero output conv) and fresh motion layers."""
    unet = VideoUNet(UNetConfig(**{**TINY, **overrides})).eval()
    return randomize_(unet, seed, include=lambda n: not is_motion_key(n))


def randomize_motion_(unet: VideoUNet, seed: int = 7) -> VideoUNet:
    """Non-zero weights for every motion layer (adaptors off identity, temporal out on)."""
    randomize_(unet, seed, include=is_motion_key)
    with torch.no_grad():  # adaptors: scale around 1, shift around 0, both clearly off identity
        for m in unet.modules():
            if isinstance(m, FrameAdaptor):
                m.scale.mul_(0).add_(1 + 0.3 * torch.randn_like(m.scale))
                m.shift.copy_(0.3 * torch.randn_like(m.shift))
    return unet


def inputs(frames: int, videos: int = 1, size: int = 8, context_dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(videos * frames, 4, size, size, generator=g)
    t = torch.full((videos * frames,), 500.0)
    ctx = torch.randn(videos, 7, context_dim, generator=g)
    return x, t, ctx


# ----------------------------------------------------------------------------- config and keys


def test_config_round_trips_through_json():
    cfg = UNetConfig(**TINY, cond_channels=5, prediction_type="v_prediction", temporal_bidirectional=True)
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert UNetConfig() == UNetConfig.from_dict(UNetConfig().to_dict())


def test_config_rejects_unknown_fields_and_bad_values():
    with pytest.raises(ValueError, match="unknown UNetConfig fields.*frobnicate"):
        UNetConfig.from_dict({"frobnicate": 1})
    with pytest.raises(ValueError, match="prediction_type"):
        UNetConfig(prediction_type="x0")


def test_new_parameters_are_motion_keys_and_image_keys_are_untouched():
    unet = VideoUNet(UNetConfig(**TINY, cond_channels=5))
    keys = set(unet.state_dict())
    motion = set(motion_state_dict(unet))
    assert motion == {k for k in keys if is_motion_key(k)}
    assert any("adaptor" in k for k in motion) and any("temporal" in k for k in motion)
    assert any("fps_embed" in k for k in motion) and "cond_in.weight" in motion
    # the conv keeps its own key; its adaptor sits beside it
    assert "input_blocks.1.0.in_layers.2.weight" in keys
    assert "input_blocks.1.0.in_layers.2.adaptor.scale" in motion
    assert unet.input_blocks[1][0].in_layers[2].adaptor.scale.shape == (TINY["max_frames"], 32)


def test_sd15_layout_matches_the_host_unet(host_comfy):
    """Our image keys and shapes are the host's SD1.5 UNetModel's, and the host's own model
    detection recognises them as SD1.5."""
    import comfy.model_detection
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = UNetConfig()
    with torch.device("meta"):
        ours = {k: v for k, v in VideoUNet(cfg).state_dict().items() if not is_motion_key(k)}
        host = UNetModel(**host_unet_kwargs(cfg)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in host.items()}
    detected = comfy.model_detection.model_config_from_unet(ours, "")
    assert type(detected) is comfy.supported_models.SD15


# ----------------------------------------------------------------------------- parity with the host


def _host_twin(ours: VideoUNet):
    """The host's UNetModel sharing our 2D tensors (built on meta, assigned: no copy)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        host = UNetModel(**host_unet_kwargs(ours.config))
    image = {k: v for k, v in ours.state_dict().items() if not is_motion_key(k)}
    host.load_state_dict(image, strict=True, assign=True)
    return host.eval()


@pytest.fixture(scope="module")
def sd15_pair(host_comfy):
    """SD1.5-size VideoUNet with random 2D weights and fresh motion layers, and its host twin."""
    ours = VideoUNet.for_loading(UNetConfig()).eval()
    randomize_(ours, 0, include=lambda n: not is_motion_key(n))
    return ours, _host_twin(ours)


def test_sd15_parity_with_host_unet(sd15_pair):
    """One host call serves both checks (SD1.5-size forwards take seconds on a small CPU):
    three frames sharing one prompt are three one-frame videos to the host."""
    ours, host = sd15_pair
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([20.0, 500.0, 980.0])
    ctx = torch.randn(1, 77, 768, generator=g)
    with torch.inference_mode():
        ref = host(x, t, ctx.expand(3, -1, -1))
        assert rel_err(ours(x, t, ctx.expand(3, -1, -1), num_frames=1), ref) < 1e-4  # 3 one-frame videos
        assert rel_err(ours(x, t, ctx, num_frames=3), ref) < 1e-4  # one 3-frame video, context per video


def test_tiny_parity_with_host_unet(host_comfy):
    ours = tiny()
    host = _host_twin(ours)
    x, t, ctx = inputs(frames=3, videos=2)
    t = torch.linspace(10, 990, 6)
    ctx_frames = ctx.repeat_interleave(3, dim=0)
    with torch.inference_mode():
        ref = host(x, t, ctx_frames)
        assert rel_err(ours(x, t, ctx_frames, num_frames=1), ref) < 1e-5
        assert rel_err(ours(x, t, ctx, num_frames=3), ref) < 1e-5  # context per video
        assert rel_err(ours(x, t, ctx_frames, num_frames=3), ref) < 1e-5  # context per frame


def test_fresh_model_treats_frames_independently():
    """Without the host: a fresh video model on a 4-frame video equals itself frame by frame."""
    unet = tiny()
    x, t, ctx = inputs(frames=4)
    with torch.no_grad():
        video = unet(x, t, ctx, num_frames=4)
        frames = torch.cat([unet(x[i:i + 1], t[i:i + 1], ctx, num_frames=1) for i in range(4)])
    # batch size changes the CPU kernels' summation order: float noise is ~1e-6, any leak between frames ~1e-1
    torch.testing.assert_close(video, frames, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- directed temporal attention


def _change_frame(x: torch.Tensor, index: int) -> torch.Tensor:
    y = x.clone()
    y[index] += torch.randn_like(y[index])
    return y


@pytest.mark.parametrize("k", [0, 2, 3])
def test_directed_attention_is_causal(k):
    """Changing frame k changes no output of frames before k, exactly; k and later change."""
    unet = randomize_motion_(tiny())
    frames = 4
    x, t, ctx = inputs(frames=frames, videos=2)
    with torch.no_grad():
        before = unet(x, t, ctx, num_frames=frames)
        after = unet(_change_frame(x, k), t, ctx, num_frames=frames)  # frame k of video 0
    assert torch.equal(before[:k], after[:k])
    for i in range(k, frames):
        assert not torch.allclose(before[i], after[i]), f"frame {i} did not see frame {k}"
    assert torch.equal(before[frames:], after[frames:])  # the other video


def test_bidirectional_option_breaks_causality():
    unet = randomize_motion_(tiny(temporal_bidirectional=True))
    x, t, ctx = inputs(frames=4)
    with torch.no_grad():
        before = unet(x, t, ctx, num_frames=4)
        after = unet(_change_frame(x, 3), t, ctx, num_frames=4)
    for i in range(3):
        assert not torch.allclose(before[i], after[i]), f"frame {i} did not see the last frame"


def _with_frame_changed(unet: VideoUNet, frames: int, *changed: int):
    """Outputs for two videos as they are, then with frame k of video 0 changed, per k."""
    x, t, ctx = inputs(frames=frames, videos=2)
    with torch.no_grad():
        return [unet(x, t, ctx, num_frames=frames)] + [unet(_change_frame(x, k), t, ctx, num_frames=frames) for k in changed]


def test_temporal_conv_sees_only_neighbouring_frames_and_both_ways():
    """With the temporal conv on and temporal attention off (zero), frame k reaches frames
    within the conv layers' window on both sides, and never a frame of another video."""
    unet = tiny(temporal_conv=True, max_frames=16)
    randomize_(unet, 5, include=lambda n: "temporal_conv" in n)
    frames = 16
    before, after, after_last = _with_frame_changed(unet, frames, 0, frames - 1)
    assert not torch.allclose(before[1], after[1])  # frame 0 reaches its next frame
    assert not torch.allclose(before[frames - 2], after_last[frames - 2])  # and the last its previous one
    # tiny() has 8 ResBlocks in a row (2 down, 2 middle, 4 up): frame 0 reaches frame 8 at most
    assert torch.equal(before[frames - 1], after[frames - 1])
    assert torch.equal(before[frames:], after[frames:])


@pytest.mark.parametrize("change, key", [({"temporal_conv": True}, "temporal_conv"),
                                         ({"spatiotemporal_resolutions": [2, 1]}, "spatiotemporal_attn")])
def test_grown_adds_layers_without_changing_the_model(change, key):
    unet = randomize_motion_(tiny())
    grown = unet.grown(**change).eval()
    assert UNetConfig.from_dict(json.loads(json.dumps(grown.config.to_dict()))) == grown.config != unet.config
    new = set(grown.state_dict()) - set(unet.state_dict())
    assert new and all(key in k and is_motion_key(k) for k in new)
    x, t, ctx = inputs(frames=4)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, ctx, num_frames=4), unet(x, t, ctx, num_frames=4), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"cannot change \['model_channels'\]"):
        unet.grown(model_channels=64)


def test_spatiotemporal_attention_is_block_causal_and_reaches_later_frames():
    """Only the spatio-temporal branch on (temporal attention stays zero): frame 0 reaches
    every later frame through it, and no frame sees a later one."""
    unet = tiny(spatiotemporal_resolutions=(2,))
    assert unet.input_blocks[3][1].transformer_blocks[0].spatiotemporal_attn is not None
    assert unet.input_blocks[1][1].transformer_blocks[0].spatiotemporal_attn is None  # level 1: not asked for
    randomize_(unet, 9, include=lambda n: "spatiotemporal_attn" in n)
    frames = 4
    before, first, third = _with_frame_changed(unet, frames, 0, 2)
    for i in range(1, frames):
        assert not torch.allclose(before[i], first[i]), f"frame {i} did not see frame 0"
    assert torch.equal(before[:2], third[:2]) and not torch.allclose(before[3], third[3])
    assert torch.equal(before[frames:], first[frames:])  # the other video


def test_motion_steering_grows_onto_a_trained_branch_without_changing_it():
    unet = randomize_motion_(tiny(spatiotemporal_resolutions=(2,)))
    grown = unet.grown(motion_steering=True).eval()
    new = set(grown.state_dict()) - set(unet.state_dict())
    assert new and all(".steer." in k and is_motion_key(k) for k in new)
    x, t, ctx = inputs(frames=4)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, ctx, num_frames=4), unet(x, t, ctx, num_frames=4), rtol=0, atol=0)
    with pytest.raises(ValueError, match="set spatiotemporal_resolutions too"):
        tiny().grown(motion_steering=True)


def _position_only_attention(dim: int, heads: int, **kwargs):
    """A spatio-temporal branch whose queries and keys see nothing (zero projections) and
    whose values pass straight through: only the steering bias decides where a frame looks."""
    from models.unet import DirectedSpatioTemporalAttention

    attn = DirectedSpatioTemporalAttention(dim, heads, **kwargs).eval()
    with torch.no_grad():
        attn.to_q.weight.zero_()
        attn.to_k.weight.zero_()
        attn.to_v.weight.copy_(torch.eye(dim))
        attn.to_out.weight.copy_(torch.eye(dim))
    return attn


def test_motion_steering_makes_the_caption_say_which_way_a_frame_looks_back():
    """Queries and keys that see nothing (zero projections) leave only the steering bias:
    frame 1 then reads frame 0's cells on the side the caption's velocity points away from,
    and a caption with the opposite velocity makes it read the other side."""
    dim, heads, size, frames = 8, 2, (3, 3), 2
    attn = _position_only_attention(dim, heads, steering_dim=4)
    with torch.no_grad():
        attn.steer.weight[1::2, 0] = 10.0  # every head: column velocity = 10 x the caption's feature 0
    # value = the key's column (after the LayerNorm: +-, so use its sign), frame 1 all zero
    cols = torch.arange(3.0).repeat(3) - 1.0  # -1, 0, 1 per row
    x = torch.zeros(frames, 9, dim)
    x[0, :, 0], x[0, :, 1] = cols, -cols
    right, left = torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)
    right[..., 0], left[..., 0] = 1.0, -1.0
    with torch.no_grad():
        towards_right = attn(x, frames, size, right.expand(frames, 1, 4))
        towards_left = attn(x, frames, size, left.expand(frames, 1, 4))
        unsteered = attn(x, frames, size, torch.zeros(frames, 1, 4))
    centre = 4  # frame 1, middle cell: it reads frame 0's left column when things move right
    assert towards_right[1, centre, 0] < -0.5 < 0.5 < towards_left[1, centre, 0]
    assert abs(unsteered[1, centre, 0]) < 1e-5  # no velocity: every earlier cell alike
    torch.testing.assert_close(towards_right[0], unsteered[0])  # frame 0 has no earlier frame to steer to


def _grows_onto_steering_at_zero(flag: str, marker: str):
    """Grown onto a steered model, ``flag`` adds only motion keys containing ``marker`` and
    changes nothing bit for bit; without steering it is refused."""
    steered = randomize_motion_(tiny(spatiotemporal_resolutions=(2,), motion_steering=True))
    grown = steered.grown(**{flag: True}).eval()
    new = set(grown.state_dict()) - set(steered.state_dict())
    assert new and all(marker in k and is_motion_key(k) for k in new)
    x, t, ctx = inputs(frames=4)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, ctx, num_frames=4), steered(x, t, ctx, num_frames=4), rtol=0, atol=0)
    with pytest.raises(ValueError, match="set motion_steering too"):
        tiny(spatiotemporal_resolutions=(2,)).grown(**{flag: True})


def test_motion_field_grows_at_zero_and_lets_two_places_look_back_different_ways():
    """Grown onto a steered model it changes nothing. Then, with no caption velocity, a
    query's own features set its direction: two cells with opposite features read frame 0
    from opposite sides (one video-wide velocity could only move them alike)."""
    _grows_onto_steering_at_zero("motion_field", ".field.")

    dim, heads, size, frames = 8, 2, (1, 5), 2
    attn = _position_only_attention(dim, heads, steering_dim=4, field=True)
    with torch.no_grad():
        attn.field.weight[1::2, 2] = 10.0  # column velocity = 10 x the query's (normed) feature 2
    cols = torch.arange(5.0) - 2.0
    x = torch.zeros(frames, 5, dim)
    x[0, :, 0], x[0, :, 1] = cols, -cols  # frame 0: value = the sign of the key's column
    x[1, 1, 2], x[1, 1, 3] = 1.0, -1.0  # frame 1, column 1: "moving right"
    x[1, 3, 2], x[1, 3, 3] = -1.0, 1.0  # frame 1, column 3: "moving left"
    with torch.no_grad():
        out = attn(x, frames, size, torch.zeros(frames, 1, 4))
    assert out[1, 1, 0] < -1.0 and out[1, 3, 0] > 1.0  # each reads the side its own velocity points from


def test_motion_tokens_grow_at_zero_and_let_each_place_read_the_velocity_of_its_own_words():
    """Grown onto a steered model they change nothing. Then, with no caption velocity, two
    cells whose features pick different caption words read frame 0 from opposite sides,
    each from the velocity of the word it attends to; with that velocity at zero they read
    nothing in particular."""
    _grows_onto_steering_at_zero("motion_tokens", ".token_")

    dim, heads, size, frames = 8, 2, (1, 5), 2
    attn = _position_only_attention(dim, heads, steering_dim=4, tokens=True)
    d = attn.TOKEN_KEY_DIM
    with torch.no_grad():
        attn.token_q.weight.zero_()
        attn.token_k.weight.zero_()
        attn.token_q.weight[0::d, 2] = 10.0  # every head: query = the cell's (normed) feature 2 ...
        attn.token_k.weight[0::d, 0] = 10.0  # ... key = word feature 0 minus word feature 1
        attn.token_k.weight[0::d, 1] = -10.0
    words = torch.eye(4)[:2].expand(frames, 2, 4)  # word 0 ("moving right"), word 1 ("moving left")
    cols = torch.arange(5.0) - 2.0
    x = torch.zeros(frames, 5, dim)
    x[0, :, 0], x[0, :, 1] = cols, -cols  # frame 0: value = the sign of the key's column
    x[1, 1, 2], x[1, 1, 3] = 1.0, -1.0  # frame 1, column 1: attends to word 0
    x[1, 3, 2], x[1, 3, 3] = -1.0, 1.0  # frame 1, column 3: attends to word 1
    with torch.no_grad():
        silent = attn(x, frames, size, words)
        attn.token_v.weight[1::2, 0] = 10.0  # column velocity +10 for word 0 ...
        attn.token_v.weight[1::2, 1] = -10.0  # ... and -10 for word 1
        out = attn(x, frames, size, words)
    assert out[1, 1, 0] < -1.0 and out[1, 3, 0] > 1.0  # each reads the side its own word's velocity points from
    assert silent[1, 1:4:2, 0].abs().max() < 1e-5


def test_cross_attention_recording_its_probabilities_gives_the_fused_output():
    """``record_probs`` computes the same attention explicitly and keeps rows that sum to 1."""
    torch.manual_seed(0)
    attn = CrossAttention(16, 2, context_dim=8)
    x, context = torch.randn(3, 10, 16), torch.randn(3, 5, 8)
    with torch.no_grad():
        fused = attn(x, context)
        attn.record_probs = True
        explicit = attn(x, context)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-6)
    assert attn.probs.shape == (3, 2, 10, 5)
    torch.testing.assert_close(attn.probs.sum(-1), torch.ones(3, 2, 10))


def test_spatiotemporal_levels_must_have_a_transformer():
    with pytest.raises(ValueError, match="spatiotemporal_resolutions \\[8\\] must be levels with a transformer"):
        UNetConfig(**TINY, spatiotemporal_resolutions=(8,))


# ----------------------------------------------------------------------------- frame adaptors


def _bump_adaptor(unet: VideoUNet, frame: int):
    adaptor = unet.input_blocks[1][0].in_layers[2].adaptor
    with torch.no_grad():
        adaptor.scale[frame] += 0.5
        adaptor.shift[frame] -= 0.3


def test_adaptor_frame_parameters_change_only_their_frame_without_temporal_mixing():
    """With the temporal layers fresh (zero output), frames do not mix: adaptor parameters
    of frame i change frame i's output and no other frame's, exactly."""
    unet = tiny()
    x, t, ctx = inputs(frames=4)
    with torch.no_grad():
        before = unet(x, t, ctx, num_frames=4)
        _bump_adaptor(unet, 2)
        after = unet(x, t, ctx, num_frames=4)
    changed = [not torch.equal(before[i], after[i]) for i in range(4)]
    assert changed == [False, False, True, False]


def test_adaptor_frame_parameters_with_temporal_mixing_reach_only_later_frames():
    """With trained (random) temporal layers, frame i's adaptor parameters also reach later
    frames through directed attention, never earlier ones."""
    unet = randomize_motion_(tiny())
    x, t, ctx = inputs(frames=4)
    with torch.no_grad():
        before = unet(x, t, ctx, num_frames=4)
        _bump_adaptor(unet, 2)
        after = unet(x, t, ctx, num_frames=4)
    assert torch.equal(before[:2], after[:2])
    assert not torch.allclose(before[2], after[2])


def test_more_frames_than_max_frames_is_a_clear_error():
    unet = tiny()
    x, t, ctx = inputs(frames=9)
    with pytest.raises(ValueError, match=r"9 frames.*max_frames=8"):
        unet(x, t, ctx, num_frames=9)
    with pytest.raises(ValueError, match=r"9 frames.*max_frames=8"):
        FrameAdaptor(4, max_frames=8)(torch.zeros(9, 4, 2, 2), num_frames=9)
    with pytest.raises(ValueError, match="not a whole number"):
        unet(x[:5], t[:5], ctx, num_frames=2)


# ----------------------------------------------------------------------------- conditioning


def test_cond_channels_start_at_zero_and_equal_a_channel_concat_conv():
    plain = tiny()
    cond_model = VideoUNet(UNetConfig(**TINY, cond_channels=5)).eval()
    cond_model.load_state_dict(plain.state_dict(), strict=False)
    x, t, ctx = inputs(frames=3)
    cond = torch.randn(3, 5, 8, 8)
    with torch.no_grad():
        assert torch.equal(cond_model(x, t, ctx, num_frames=3, cond=cond), plain(x, t, ctx, num_frames=3))
        # trained: the separate conv is the cond half of one conv over concat(x, cond)
        torch.nn.init.normal_(cond_model.cond_in.weight)
        conv_in = cond_model.input_blocks[0][0]
        wide = torch.nn.functional.conv2d(
            torch.cat([x, cond], 1), torch.cat([conv_in.weight, cond_model.cond_in.weight], 1), conv_in.bias, padding=1
        )
        torch.testing.assert_close(torch.nn.Conv2d.forward(conv_in, x) + cond_model.cond_in(cond), wide)
        assert not torch.allclose(cond_model(x, t, ctx, num_frames=3, cond=cond), plain(x, t, ctx, num_frames=3))
    with pytest.raises(ValueError, match="conditioning channels"):
        cond_model(x, t, ctx, num_frames=3)
    with pytest.raises(ValueError, match="cond_channels=0"):
        plain(x, t, ctx, num_frames=3, cond=cond)


def test_fps_changes_the_output_only_once_trained():
    unet = tiny()
    x, t, ctx = inputs(frames=2)
    with torch.no_grad():
        fresh = [unet(x, t, ctx, num_frames=2, fps=f) for f in (4, 24, None)]
        assert torch.equal(fresh[0], fresh[1]) and torch.equal(fresh[0], fresh[2])
        torch.nn.init.normal_(unet.fps_embed[2].weight, std=0.05)
        slow, fast = unet(x, t, ctx, num_frames=2, fps=4), unet(x, t, ctx, num_frames=2, fps=24)
        default = unet(x, t, ctx, num_frames=2, fps=None)
        per_frame = unet(x, t, ctx, num_frames=2, fps=torch.tensor([4.0, 4.0]))
    assert not torch.allclose(slow, fast)
    assert torch.equal(default, unet(x, t, ctx, num_frames=2, fps=unet.config.default_fps))
    assert torch.equal(slow, per_frame)


def test_gradient_checkpointing_gives_the_same_gradients():
    unet = randomize_motion_(tiny())
    x, t, ctx = inputs(frames=2)
    grads = []
    for checkpointing in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = checkpointing
        unet(x, t, ctx, num_frames=2).square().mean().backward()
        grads.append(unet.input_blocks[1][1].transformer_blocks[0].temporal_attn.to_q.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_caption_time_embed_grows_without_changing_the_model_and_then_times_the_caption():
    """Grown at zero it changes nothing; once trained, each frame's output depends on the
    caption and on where the frame is in the clip (what growing or turning needs)."""
    unet = randomize_motion_(tiny())
    grown = unet.grown(caption_time_embed=True).eval()
    new = set(grown.state_dict()) - set(unet.state_dict())
    assert new and all(k.startswith("temporal_caption_embed.") and is_motion_key(k) for k in new)
    frames = 4
    x, t, ctx = inputs(frames=frames)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, ctx, num_frames=frames), unet(x, t, ctx, num_frames=frames), rtol=0, atol=0)

    # fresh motion layers (every frame alike) and the same latent in every frame
    plain = tiny()
    timed = plain.grown(caption_time_embed=True).eval()
    with torch.no_grad():
        torch.nn.init.normal_(timed.temporal_caption_embed[2].weight, std=0.5)
        same = x[:1].repeat(frames, 1, 1, 1)
        base = plain(same, t, ctx, num_frames=frames)
        out = timed(same, t, ctx, num_frames=frames)
        other = timed(same, t, ctx + 1.0, num_frames=frames)
    torch.testing.assert_close(base[0], base[-1])  # without it nothing tells the frames apart
    assert not torch.allclose(out[0], out[-1], atol=1e-3)  # with it, clip time does
    # and the caption: cross-attention changes every frame alike, so compare how frames differ
    assert not torch.allclose(out[0] - out[-1], other[0] - other[-1], atol=1e-3)
