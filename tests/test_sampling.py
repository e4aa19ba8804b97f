"""Generation's sampling call (``pipeline.sample_video``: the sampler loop with its guidance
pieces): every sampler/scheduler/prediction type against an exact denoiser, CFG and its
interval, seeds, img2img denoise, callbacks, given frames at any index, image-first,
validation; and a tiny real VideoUNet end to end."""

from types import SimpleNamespace

import pytest
import torch

from magicvideo.models.conditioning import GivenFrames
from magicvideo.models.pipeline import RequestError, VideoModel, sample_video
from magicvideo.models.sampling import (
    PRESETS,
    SAMPLERS,
    SamplingOptions,
    _alphas_at,
    make_scheduler,
    training_schedule,
    video_noise,
)

WIDTH = 8


class PointMass(torch.nn.Module):
    """The exact denoiser of data that is a single point x*, chosen by the context.

    x* = the context's first value everywhere, so positive and negative prompts pull to
    different points and CFG's extrapolation is predictable.
    """

    def __init__(self, prediction_type="epsilon", cond_channels=0):
        super().__init__()
        self.config = SimpleNamespace(in_channels=4, context_dim=WIDTH, prediction_type=prediction_type,
                                      cond_channels=cond_channels)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.alphas = training_schedule()
        self.calls = []

    def forward(self, x, timesteps, context, num_frames, fps=None, cond=None):
        self.calls.append(dict(batch=x.shape[0], t=timesteps, fps=fps, cond=cond, context=context))
        target = context[:, 0, 0].view(-1, 1, 1, 1).expand_as(x)
        a = _alphas_at(self.alphas, timesteps).view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * target) / (1 - a).sqrt()
        if self.config.prediction_type == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * target
        return eps


def sample(model, latents, positive, negative, *, num_frames, given=None, callback=None, **settings):
    """One sampling call with plain settings (cfg on every step, nothing steered) changed by ``settings``."""
    options = SamplingOptions(cfg_end=1.0, motion_guidance=0.0).replace(**settings)
    return sample_video(model, latents, positive, negative, num_frames=num_frames, options=options, given=given,
                        callback=callback)


def _ctx(value, batch=1, seq=4):
    return torch.full((batch, seq, WIDTH), float(value))


def _latents(frames=3, videos=1):
    return torch.zeros(videos * frames, 4, 4, 4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheduler", ["normal", "karras"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_reaches_the_data(sampler, scheduler, prediction):
    if scheduler == "karras" and sampler in ("ddim", "euler_ancestral", "lcm"):
        pytest.skip("no Karras sigmas for this diffusers scheduler")
    model = PointMass(prediction)
    x0s = []
    out = sample(model, _latents(), _ctx(0.5), None, num_frames=3, steps=6, cfg=1.0, sampler=sampler,
                 scheduler=scheduler, seed=1, callback=lambda i, n, x0: x0s.append(x0))
    assert len(x0s) == 6 and out.dtype == torch.float32
    # diffusers' DDIM ends at t=0 (alpha_bar 0.99915), not at t=-1: a trace of noise stays
    assert torch.allclose(out, torch.full_like(out, 0.5), atol=0.15 if sampler == "ddim" else 2e-3)
    assert torch.allclose(x0s[-1], torch.full_like(out, 0.5), atol=1e-3)
    assert torch.allclose(x0s[0], torch.full_like(out, 0.5), atol=1e-3)  # the preview's x0 is right at every t


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_cfg_batches_negative_then_positive(sampler):
    model = PointMass()
    out = sample(model, _latents(), _ctx(0.5), _ctx(0.1, seq=8), num_frames=3, steps=5, cfg=3.0,
                 sampler=sampler, seed=0)
    assert all(c["batch"] == 6 for c in model.calls)  # one forward for both halves
    assert model.calls[0]["context"].shape[1] == 8  # 4 and 8 tokens repeated to a common length
    assert torch.allclose(out, torch.full_like(out, 0.1 + 3.0 * (0.5 - 0.1)), atol=1e-3)


def test_cfg_one_skips_the_negative():
    model = PointMass()
    sample(model, _latents(), _ctx(0.5), None, num_frames=3, steps=2, cfg=1.0)
    assert all(c["batch"] == 3 for c in model.calls)


def test_guidance_interval_guides_only_the_asked_part_of_the_schedule():
    model = PointMass(cond_channels=5)
    # 5 trailing euler steps: t = 999, 799, 599, 399, 199, i.e. progress 0, 0.2, 0.4, 0.6, 0.8
    sample(model, _latents(), _ctx(0.5), _ctx(0.1), num_frames=3, steps=5, cfg=3.0, cfg_start=0.3, cfg_end=0.7)
    assert [c["batch"] for c in model.calls] == [3, 3, 6, 6, 3]  # unguided steps run the positive half alone
    assert all(c["context"][:, 0, 0].eq(0.5).all() for c in model.calls if c["batch"] == 3)
    assert all(c["cond"].shape[0] == c["batch"] for c in model.calls)
    # an exact denoiser's last step decides where a sample lands: guided there, on the
    # extrapolated point 0.1 + 3 (0.5 - 0.1); unguided there, on the positive point
    run = lambda **kw: sample(PointMass(), _latents(), _ctx(0.5), _ctx(0.1), num_frames=3, steps=5,  # noqa: E731
                              cfg=3.0, **kw)
    for kw, point in (({}, 1.3), ({"cfg_start": 0.7}, 1.3), ({"cfg_end": 0.7}, 0.5), ({"cfg_end": 0.0}, 0.5)):
        out = run(**kw)
        assert torch.allclose(out, torch.full_like(out, point), atol=1e-3), kw
    with pytest.raises(ValueError, match="cfg_start <= cfg_end"):
        sample(PointMass(), _latents(), _ctx(0.5), _ctx(0.1), num_frames=3, steps=5, cfg=3.0, cfg_start=0.8,
               cfg_end=0.2)


def test_per_video_conditioning():
    model = PointMass()
    pos = torch.cat([_ctx(0.2), _ctx(-0.4)])
    out = sample(model, _latents(frames=2, videos=2), pos, None, num_frames=2, steps=4, cfg=1.0, sampler="ddim")
    assert torch.allclose(out[:2], torch.full_like(out[:2], 0.2), atol=1e-3)
    assert torch.allclose(out[2:], torch.full_like(out[2:], -0.4), atol=1e-3)


def test_seeds_reproduce_and_differ():
    model = PointMass()
    run = lambda seed: sample(model, _latents(), _ctx(0.5), _ctx(0.0), num_frames=3, steps=3, cfg=2.0,  # noqa: E731
                              sampler="euler_ancestral", seed=seed)
    assert torch.equal(run(7), run(7))
    # the exact denoiser lands every seed on x*; a no-noise model shows the noise itself
    start = lambda seed: sample(ZeroEps(), _latents(), _ctx(0), None, num_frames=3, steps=2, cfg=1.0,  # noqa: E731
                                seed=seed, sampler="ddim", denoise=0.5)
    assert torch.equal(start(7), start(7)) and not torch.equal(start(7), start(8))


class ZeroEps(PointMass):
    """Predicts no noise at all: DDIM then returns its (noised) start divided by sqrt(alpha)."""

    def forward(self, x, timesteps, context, num_frames, fps=None, cond=None):
        self.calls.append(dict(batch=x.shape[0], t=timesteps, fps=fps, cond=cond, context=context))
        return torch.zeros_like(x)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "uni_pc"])
def test_denoise_is_img2img(sampler):
    """denoise d runs the last int(steps * d) steps from the latents noised to that level.

    With a model that predicts no noise, every deterministic sampler returns its start
    divided by sqrt(alpha_bar): latents + sigma(t_start) * noise."""
    model = ZeroEps()
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    steps, seed = 10, 3
    out = sample(model, latents, _ctx(0), None, num_frames=3, steps=steps, cfg=1.0, sampler=sampler, seed=seed,
                 denoise=0.3)
    assert len(model.calls) == 3
    sched = make_scheduler(sampler)
    sched.set_timesteps(steps)
    t0 = sched.timesteps[7]
    assert model.calls[0]["t"][0] == t0
    a = sched.alphas_cumprod[int(t0)]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    expected = latents + ((1 - a) / a).sqrt() * noise
    assert torch.allclose(out, expected, atol=1e-4)
    # denoise so small that no step is left: the latents come back unchanged
    assert torch.equal(sample(model, latents, _ctx(0), None, num_frames=3, steps=4, cfg=1.0, denoise=0.1), latents)


def test_callback_can_interrupt():
    class Cancelled(Exception):
        pass

    model = PointMass()
    seen = []

    def callback(step, total, x0):
        seen.append((step, total))
        if step == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        sample(model, _latents(), _ctx(0.5), None, num_frames=3, steps=5, cfg=1.0, callback=callback)
    assert seen == [(1, 5), (2, 5)] and len(model.calls) == 2


def test_fps_and_cond_reach_the_model():
    model = PointMass(cond_channels=5)
    sample(model, _latents(), _ctx(0.5), _ctx(0), num_frames=3, steps=1, cfg=2.0, fps=12)
    call = model.calls[0]
    assert call["fps"] == 12 and call["cond"].shape == (6, 5, 4, 4) and not call["cond"].any()  # nothing given
    given = GivenFrames(torch.ones(1, 4, 4, 4), (2,))  # the last frame given
    sample(model, _latents(), _ctx(0.5), None, num_frames=3, steps=1, cfg=1.0, given=given)
    cond = model.calls[-1]["cond"]
    assert cond.shape == (3, 5, 4, 4)
    assert cond[2].eq(1).all() and not cond[:2].any()  # latents + mask on the given frame only
    assert model.calls[-1]["t"][2] == 0 and model.calls[-1]["t"][:2].gt(0).all()  # and the frame itself clean
    with pytest.raises(RequestError, match="1 mask"):
        sample(PointMass(cond_channels=9), _latents(), _ctx(0), None, num_frames=3, steps=1, cfg=1.0, given=given)


def test_validation_errors():
    model = PointMass()
    kw = dict(num_frames=3, steps=2, cfg=1.0)
    with pytest.raises(RequestError, match="width 8 .*got 768"):
        sample(model, _latents(), torch.zeros(1, 77, 768), None, **kw)
    with pytest.raises(RequestError, match="not divisible by num_frames=4"):
        sample(model, _latents(), _ctx(0), None, **{**kw, "num_frames": 4})
    with pytest.raises(RequestError, match="needs a negative conditioning"):
        sample(model, _latents(), _ctx(0), None, **{**kw, "cfg": 7.0})
    with pytest.raises(RequestError, match="expected 1 or one per video"):
        sample(model, _latents(), _ctx(0, batch=2), None, **kw)
    with pytest.raises(RequestError, match=r"latents must be \[frames, 4"):
        sample(model, torch.zeros(3, 16, 4, 4), _ctx(0), None, **kw)
    with pytest.raises(RequestError, match="no image-prior channels .* cannot take them"):
        sample(model, _latents(), _ctx(0), None, given=GivenFrames.first(torch.zeros(1, 4, 4, 4)), **kw)
    for bad, message in (({"steps": 0}, "steps must be at least 1"), ({"cfg_start": 0.8, "cfg_end": 0.2}, "cfg_start <= cfg_end"),
                         ({"denoise": 1.5}, "denoise must be between 0 and 1"), ({"noise_sharing": 1.0}, "noise_sharing"),
                         ({"sampler": "heun"}, "unknown sampler"), ({"motion_guidance_until": 2.0}, "motion_guidance")):
        with pytest.raises(RequestError, match=message):
            sample(model, _latents(), _ctx(0), None, **{**kw, **bad})
    assert model.calls == []  # every check comes before the first step
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("heun")
    with pytest.raises(ValueError, match="karras scheduler works with"):
        make_scheduler("ddim", "karras")


def test_presets_are_valid_and_the_main_one_is_the_default():
    assert SamplingOptions() == PRESETS["main"]
    for options in PRESETS.values():
        assert options.check() is options
    main = PRESETS["main"]
    assert (main.steps, main.cfg, main.cfg_end, main.motion_guidance) == (20, 6.0, 0.7, 0.2)
    assert main.guided(0.0) and main.guided(0.7) and not main.guided(0.71)
    assert not main.replace(cfg=1.0).guided(0.0)  # cfg 1 is never guided


def test_training_schedule_is_sd():
    a = training_schedule()
    assert a.shape == (1000,) and a.dtype == torch.float32
    assert abs(a[0].item() - (1 - 0.00085)) < 1e-6 and abs(a[-1].item() - 0.0047) < 1e-4


def test_tiny_video_unet_end_to_end():
    """A real VideoUNet (random weights) through CFG; the seed reproduces across runs."""
    unet_mod = pytest.importorskip("magicvideo.models.unet")
    torch.manual_seed(0)
    config = unet_mod.UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                                 num_heads=2, context_dim=16, max_frames=4, prediction_type="v_prediction")
    unet = unet_mod.VideoUNet(config).eval()
    with torch.no_grad():
        for p in unet.parameters():  # wake the zero-initialised layers up
            if not p.any():
                p.normal_(0, 0.02)
    model = VideoModel(unet)
    pos, neg = torch.randn(1, 5, 16), torch.zeros(1, 5, 16)
    run = lambda seed: sample(model.unet, torch.zeros(8, 4, 8, 8), pos, neg, num_frames=4, steps=2, cfg=5.0,  # noqa: E731
                              sampler="dpmpp_2m", scheduler="karras", seed=seed, fps=8)
    a, b, c = run(1), run(1), run(2)
    assert a.shape == (8, 4, 8, 8) and torch.isfinite(a).all()
    assert not a.requires_grad  # sampling builds no autograd graph, even on a model that has gradients
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_video_noise_shares_the_asked_fraction_across_frames():
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    plain = video_noise((32, 4, 8, 8), 16, 0.0, gen())
    assert torch.equal(plain, torch.randn((32, 4, 8, 8), generator=gen()))  # sharing 0 = plain randn
    x = video_noise((2 * 16, 4, 32, 32), 16, 0.5, gen()).view(2, 16, -1)
    assert abs(x.std().item() - 1) < 0.02  # every frame stays unit variance
    corr = torch.corrcoef(x[0])  # frame x frame within the first video
    off_diagonal = corr[~torch.eye(16, dtype=torch.bool)]
    assert abs(off_diagonal.mean().item() - 0.5) < 0.05
    across_videos = torch.corrcoef(torch.stack([x[0, 0], x[1, 0]]))[0, 1]
    assert abs(across_videos.item()) < 0.05  # videos do not share
    a = video_noise((16, 4, 8, 8), 16, 0.5, gen())
    assert torch.equal(a, video_noise((16, 4, 8, 8), 16, 0.5, gen()))  # seeded


def test_noise_sharing_is_validated_and_reaches_the_start():
    model = PointMass()
    latents = torch.zeros(4, 4, 16, 16)
    positive = torch.ones(1, 1, WIDTH)
    starts = []
    record = lambda x, *a, **k: starts.append(x.clone()) or PointMass.forward(model, x, *a, **k)  # noqa: E731
    model.forward = record
    for ns in (0.0, 0.9):
        sample(model, latents, positive, None, num_frames=4, steps=2, cfg=1.0, noise_sharing=ns)
    model.config.noise_sharing = 0.9  # None (the default) = the prior the model was trained with
    sample(model, latents, positive, None, num_frames=4, steps=2, cfg=1.0)
    plain, shared, own_prior = starts[0], starts[2], starts[4]  # the first model input of each run
    assert abs(torch.corrcoef(plain.flatten(1))[0, 1].item()) < 0.1
    assert torch.corrcoef(shared.flatten(1))[0, 1].item() > 0.8
    assert torch.equal(own_prior, shared)


@pytest.mark.parametrize("indices", [(0,), (2,), (1,), (0, 2)])
def test_given_frames_enter_clean_at_timestep_zero_and_come_back_unchanged(indices):
    """Image-to-video, continuation, interpolation (models trained with clean given frames): the
    given frames, at any index, are the caller's, seen at t=0; the rest are denoised."""
    model = PointMass()
    model.config.image_first = True
    given = GivenFrames(torch.full((len(indices), 4, 4, 4), 7.0), indices)
    out = sample(model, _latents(frames=3, videos=2), _ctx(0.5), None, num_frames=3, steps=4, cfg=1.0, given=given)
    frames = out.view(2, 3, 4, 4, 4)
    rest = [i for i in range(3) if i not in indices]
    assert frames[:, list(indices)].eq(7.0).all()  # exactly what was given
    assert torch.allclose(frames[:, rest], torch.full_like(frames[:, rest], 0.5), atol=1e-3)  # the others denoised
    for call in model.calls:
        t = call["t"].view(2, 3)
        assert t[:, list(indices)].eq(0).all() and t[:, rest].gt(0).all()
    for bad, message in (((3,), r"indices \[3\] lie outside a 3-frame video"), ((0, 1, 2), "all 3 frames are given"),
                         ((1, 1), "repeat")):
        with pytest.raises(RequestError, match=message):
            sample(model, _latents(), _ctx(0.5), None, num_frames=3, steps=1, cfg=1.0,
                   given=GivenFrames(torch.zeros(len(bad), 4, 4, 4), bad))
    with pytest.raises(RequestError, match=r"given frames must be latents \[frames, 4, 4, 4\]"):
        sample(model, _latents(), _ctx(0.5), None, num_frames=3, steps=1, cfg=1.0,
               given=GivenFrames.first(torch.zeros(1, 4, 8, 8)))


def test_image_first_samples_frame_zero_alone_then_the_rest_from_it():
    """Magic 1-For-1's factorisation: a 1-frame pass, then the video given its first frame;
    the model's config picks it, the callback counts both passes."""
    model = PointMass()
    model.config.image_first = True
    seen = []
    out = sample(model, _latents(frames=3, videos=2), _ctx(0.5), _ctx(0), num_frames=3, steps=3, cfg=2.0, seed=5,
                 callback=lambda step, total, x0: seen.append((step, total, tuple(x0.shape))))
    assert seen == [(s, 6, (6, 4, 4, 4)) for s in range(1, 7)]
    assert [c["batch"] for c in model.calls] == [4, 4, 4, 12, 12, 12]  # (neg + pos) x videos x frames
    assert all(c["t"].view(4, 3)[:, 0].eq(0).all() for c in model.calls[3:])

    image = sample(PointMass(), _latents(frames=1, videos=2), _ctx(0.5), _ctx(0), num_frames=1, steps=3, cfg=2.0,
                   seed=5)
    second = PointMass()
    second.config.image_first = True
    rest = sample(second, _latents(frames=3, videos=2), _ctx(0.5), _ctx(0), num_frames=3, steps=3, cfg=2.0, seed=5,
                  given=GivenFrames(image, (0,)))  # one first frame per video
    assert torch.equal(out, rest)

    plain = PointMass()
    plain.config.image_first = True
    sample(plain, _latents(), _ctx(0.5), None, num_frames=3, steps=2, cfg=1.0, denoise=0.5)
    assert [c["batch"] for c in plain.calls] == [3]  # video-to-video stays one pass
