"""VideoVAE: SD key layout, parity with the host's own AutoencoderKL, chunking, errors."""

import pytest
import torch

from magicvideo.models.vae import VAEConfig, VideoVAE, latent_to_rgb

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, temporal_layers=2, temporal_head_dim=16)


def _tiny(**kw) -> VideoVAE:
    torch.manual_seed(0)
    return VideoVAE(VAEConfig(**{**TINY, **kw})).eval()


def _randomise_temporal(vae: VideoVAE):
    """Give the zero-initialised temporal output projections weights, so they act."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in vae.decoder.temporal:
            layer.proj_out.weight.copy_(torch.randn(layer.proj_out.weight.shape, generator=g) * 0.2)
            layer.proj_out.bias.copy_(torch.randn(layer.proj_out.bias.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def host_autoencoder(host_modules):
    """The host's comfy.ldm.models.autoencoder.AutoencoderKL class (in-process, CPU)."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
    from comfy.ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL


def _host_vae(cls, config: VAEConfig, state: dict):
    ddconfig = {
        "double_z": True, "z_channels": config.z_channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
        "ch": config.ch, "ch_mult": list(config.ch_mult), "num_res_blocks": config.num_res_blocks,
        "attn_resolutions": [], "dropout": 0.0,
    }
    host = cls(ddconfig=ddconfig, embed_dim=config.embed_dim).eval()
    missing, unexpected = host.load_state_dict(state, strict=False)
    assert not missing, missing
    assert all("temporal" in k for k in unexpected), unexpected
    return host


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("config", [TINY, {}], ids=["tiny", "sd"])
def test_matches_host_autoencoder(host_autoencoder, config):
    """Same random weights: our encode/decode equal the host's SD VAE (fp32)."""
    torch.manual_seed(0)
    cfg = VAEConfig(**config)
    vae = VideoVAE(cfg).eval()
    host = _host_vae(host_autoencoder, cfg, vae.state_dict())
    images = torch.rand(3, 3, 32, 48) * 2 - 1
    with torch.inference_mode():
        mean, logvar = vae.encode_dist(images)
        host_moments = host.quant_conv(host.encoder(images))
        assert _rel(mean, host_moments[:, : cfg.embed_dim]) < 1e-4
        assert _rel(vae.encode(images), host_moments[:, : cfg.embed_dim] * cfg.scaling_factor) < 1e-4
        z = torch.randn(3, cfg.embed_dim, 4, 6)
        assert _rel(vae.decode(z * cfg.scaling_factor, num_frames=3), host.decode(z)) < 1e-4


def test_sd_key_layout():
    keys = set(VideoVAE(VAEConfig(**TINY)).state_dict())
    for k in ("encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
              "encoder.mid.attn_1.q.weight", "decoder.up.1.upsample.conv.weight", "decoder.mid.block_2.conv2.bias",
              "quant_conv.weight", "post_quant_conv.weight", "decoder.temporal.0.proj_out.weight"):
        assert k in keys, k
    extra = [k for k in keys if "temporal" in k]
    assert extra and all(k.startswith("decoder.temporal.") for k in extra)


def test_linear_attention_weights_load():
    """Some SD VAE files store the mid attention 1x1 convs as [c, c] linear weights."""
    vae = _tiny()
    sd = {k: (v[:, :, 0, 0] if ".attn_1." in k and v.ndim == 4 else v) for k, v in vae.state_dict().items()}
    other = _tiny(temporal_layers=0)
    other.load_state_dict({k: v for k, v in sd.items() if "temporal" not in k})
    assert torch.equal(other.encoder.mid.attn_1.q.weight, vae.encoder.mid.attn_1.q.weight)


def test_temporal_layers_start_as_identity():
    vae, plain = _tiny(), _tiny(temporal_layers=0)
    plain.load_state_dict({k: v for k, v in vae.state_dict().items() if "temporal" not in k})
    z = torch.randn(4, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(vae.decode(z, num_frames=4), plain.decode(z, num_frames=4))


def test_temporal_attention_is_causal():
    """Changing a later frame never changes earlier decoded frames; it does change later ones."""
    vae = _tiny()
    _randomise_temporal(vae)
    z = torch.randn(5, 4, 4, 4)
    z2 = z.clone()
    z2[3] += 1.0
    with torch.no_grad():
        a, b = vae.decode(z, num_frames=5, chunk_size=None), vae.decode(z2, num_frames=5, chunk_size=None)
        frame4_alone = vae.decode(z[4:], num_frames=1)
    assert torch.equal(a[:3], b[:3])
    assert not torch.allclose(a[4], b[4])
    assert not torch.allclose(a[4], frame4_alone[0])  # frame 4 did see earlier frames


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5])
def test_chunked_decode_equals_unchunked(chunk_size):
    vae = _tiny()
    _randomise_temporal(vae)
    z = torch.randn(10, 4, 4, 4)  # two videos of five frames
    with torch.no_grad():
        full = vae.decode(z, num_frames=5, chunk_size=None)
        chunked = vae.decode(z, num_frames=5, chunk_size=chunk_size)
    assert torch.allclose(full, chunked, atol=1e-5, rtol=1e-4)


def test_videos_in_a_batch_do_not_mix():
    vae = _tiny()
    _randomise_temporal(vae)
    z = torch.randn(6, 4, 4, 4)
    with torch.no_grad():
        both = vae.decode(z, num_frames=3)
        second = vae.decode(z[3:], num_frames=3)
    assert torch.allclose(both[3:], second, atol=1e-6)


def test_chunked_encode_and_sampling():
    vae = _tiny()
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(vae.encode(images, chunk_size=2), vae.encode(images, chunk_size=None), atol=1e-6)
        s1 = vae.encode(images, sample=True, generator=torch.Generator().manual_seed(3))
        s2 = vae.encode(images, sample=True, generator=torch.Generator().manual_seed(3))
        mean = vae.encode(images)
    assert torch.equal(s1, s2) and not torch.equal(s1, mean)
    assert s1.shape == (5, 4, 8, 8)


def test_encode_dist_and_decode_raw_train():
    """The trainer's path: gradients reach the temporal layers through decode_raw."""
    vae = _tiny().train()
    _randomise_temporal(vae)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    mean, logvar = vae.encode_dist(x)
    recon = vae.decode_raw(mean + torch.randn_like(mean) * (0.5 * logvar).exp(), num_frames=2)
    assert recon.shape == x.shape
    recon.square().mean().backward()
    assert vae.decoder.temporal[0].to_q.weight.grad is not None


def test_size_errors():
    vae = _tiny()  # downscale 2 for the tiny config; SD's is 8
    with pytest.raises(ValueError, match="not divisible by 2"):
        vae.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="not divisible by 8"):
        VideoVAE(VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)).encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"images \[frames, 3, H, W\]"):
        vae.encode(torch.zeros(1, 16, 16, 3))
    with pytest.raises(ValueError, match="4, h, w"):
        vae.decode(torch.zeros(2, 16, 4, 4))
    with pytest.raises(ValueError, match="num_frames=3"):
        vae.decode(torch.zeros(4, 4, 4, 4), num_frames=3)


def test_config_round_trip_and_checks():
    cfg = VAEConfig(**TINY, scaling_factor=0.5)
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    assert VAEConfig().to_dict()["ch_mult"] == [1, 2, 4, 4] and VAEConfig().scaling_factor == 0.18215
    with pytest.raises(ValueError, match="unknown VAEConfig fields"):
        VAEConfig.from_dict({"channels": 3})
    with pytest.raises(ValueError, match="temporal_layers"):
        VAEConfig(ch_mult=(1, 2), temporal_layers=3)


def test_latent_rgb_preview():
    vae = _tiny()
    factors = vae.latent_rgb()
    assert factors.shape == (5, 3)
    with torch.no_grad():
        z = vae.encode(torch.full((1, 3, 16, 16), -1.0))
    rgb = latent_to_rgb(z, factors)
    assert rgb.shape == (1, 8, 8, 3) and 0 <= rgb.min() and rgb.max() <= 1
