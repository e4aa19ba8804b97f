"""Checkpoints: SD1.5 inflation checked against the host's own loader, round trips for full
and motion-only files, and a named CheckpointError for every kind of wrong file."""

from __future__ import annotations

import gc
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from magicvideo.models import checkpoint as ck, world
from magicvideo.models.checkpoint import CheckpointError
from magicvideo.models.text import TextConfig, TextEncoder
from magicvideo.models.unet import UNetConfig, VideoUNet, is_motion_key
from magicvideo.models.vae import VAEConfig, VideoVAE
from sd15_fixture import host_comfy, randomize_, sd15_checkpoint  # noqa: F401  (fixtures)
from test_unet import TINY, inputs, randomize_motion_, rel_err, tiny

TINY_VAE = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, temporal_layers=1, temporal_head_dim=16)


def tiny_vae(seed: int = 3, temporal: bool = False) -> VideoVAE:
    vae = VideoVAE(VAEConfig(**TINY_VAE)).eval()
    return randomize_(vae, seed, include=lambda n: temporal or "temporal" not in n)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


@pytest.fixture
def tiny_sd(tmp_path):
    """A tiny SD-layout checkpoint (image keys only) and the video model it came from."""
    unet, vae = tiny(), tiny_vae()
    path = ck.save_sd15(tmp_path / "tiny_sd.safetensors", unet=unet, vae=vae, dtype=None)
    return path, unet, vae


# ----------------------------------------------------------------------------- the real layout


def test_sd15_checkpoint_loads_in_the_host_and_inflates_with_parity(host_comfy, sd15_checkpoint):
    """The host's own loader reads the file as SD1.5; our inflation gives the same UNet and VAE."""
    import comfy.sd
    import comfy.supported_models

    header = ck.read_header(sd15_checkpoint)
    assert ck.identify(header) == "an SD1.x checkpoint"
    assert ck.infer_unet_config(header.under(ck.UNET_PREFIX)) == {
        k: v for k, v in UNetConfig().image_fields.items() if k not in ("num_heads", "norm_groups")
    }

    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([30.0, 700.0]), torch.randn(2, 77, 768, generator=g)
    z = torch.randn(1, 4, 4, 4, generator=g)
    with torch.inference_mode():
        patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint))
        assert type(patcher.model.model_config) is comfy.supported_models.SD15
        assert clip is not None and vae is not None
        ref = patcher.model.diffusion_model.float()(x, t, ctx)
        ref_image = vae.first_stage_model.float().decode(z)
        del patcher, clip, vae
        gc.collect()

        bundle = ck.load_sd15(sd15_checkpoint)
        assert bundle.text_encoder is None and bundle.source.startswith("SD1.x")
        assert bundle.unet.config == UNetConfig()
        assert rel_err(bundle.unet(x, t, ctx, num_frames=2), ref) < 1e-4  # one 2-frame video, fresh layers
        assert rel_err(bundle.vae.decode_raw(z, num_frames=1), ref_image) < 1e-4
    del bundle
    gc.collect()


# ----------------------------------------------------------------------------- round trips


def test_inflated_sd_checkpoint_starts_as_the_image_model(tiny_sd):
    path, unet, vae = tiny_sd
    # num_heads and max_frames do not show in SD weights' shapes (SD1.x's are the defaults)
    bundle = ck.load_sd15(path, unet_overrides={"num_heads": 2, "max_frames": 8}, vae_overrides={"temporal_layers": 1, "temporal_head_dim": 16})
    assert bundle.unet.config == unet.config
    ours, theirs = bundle.unet.state_dict(), unet.state_dict()
    for k, v in ours.items():
        if not is_motion_key(k):
            assert torch.equal(v, theirs[k]), k
        elif "adaptor.scale" in k:
            assert torch.equal(v, torch.ones_like(v)), k
        elif "adaptor.shift" in k or "temporal_attn.to_out" in k or k.startswith("fps_embed.2."):
            assert torch.equal(v, torch.zeros_like(v)), k
    x, t, ctx = inputs(frames=3)
    with torch.no_grad():
        assert torch.equal(bundle.unet(x, t, ctx, num_frames=3), unet(x, t, ctx, num_frames=3))
    assert bundle.vae.config == vae.config
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in bundle.vae.state_dict().items() if "temporal" not in k)
    assert ck.load(path).unet.config.num_heads == 8  # load() dispatches here; SD1.x defaults


def test_full_file_round_trip(tmp_path):
    unet, vae = randomize_motion_(tiny()), tiny_vae(temporal=True)
    unet.config.prediction_type = "v_prediction"
    path = ck.save_model(tmp_path / "full.safetensors", unet=unet, vae=vae, extra_metadata={"note": "hi", "n": 3})
    header = ck.read_header(path)
    assert header.metadata["format"] == "magicvideo" and header.metadata["format_version"] == "2"
    assert header.metadata["kind"] == "full" and header.metadata["note"] == "hi" and header.metadata["n"] == "3"
    assert json.loads(header.metadata["unet_config"]) == unet.config.to_dict()
    assert all(k.startswith((ck.UNET_PREFIX, ck.VAE_PREFIX)) for k in header.shapes)

    bundle = ck.load_model(path)
    assert bundle.unet.config == unet.config and bundle.vae.config == vae.config
    assert same_state(bundle.unet, unet) and same_state(bundle.vae, vae)
    assert not bundle.unet.training and bundle.text_encoder is None

    with torch.inference_mode():  # as nodes call it
        half = ck.load(path, dtype=torch.float16)
    assert next(half.unet.parameters()).dtype == torch.float16
    assert same_state(half.unet, unet.half())


def test_average_of_two_files_is_their_mean_and_loads(tmp_path):
    vae = tiny_vae()
    a, b = randomize_motion_(tiny(seed=1), seed=1), randomize_motion_(tiny(seed=2), seed=2)
    recipe = {"seed": 1}
    pa = ck.save_model(tmp_path / "a" / "model.safetensors", unet=a, vae=vae, extra_metadata={"training_recipe": recipe})
    pb = ck.save_model(tmp_path / "b" / "model.safetensors", unet=b, vae=vae)
    out = ck.average_models([pa, pb], tmp_path / "soup.safetensors")

    soup = ck.load_model(out)
    sa, sb, ss = a.state_dict(), b.state_dict(), soup.unet.state_dict()
    assert ss.keys() == sa.keys()
    for k in sa:
        assert torch.allclose(ss[k], (sa[k] + sb[k]) / 2, atol=1e-7), k
    assert not torch.equal(ss["input_blocks.0.0.weight"], sa["input_blocks.0.0.weight"])
    assert same_state(soup.vae, vae) and soup.unet.config == a.config
    meta = ck.read_header(out).metadata
    assert json.loads(meta["training_recipe"]) == {"average_of": [recipe, None]}
    assert json.loads(meta["averaged_from"]) == ["a/model.safetensors", "b/model.safetensors"]


def test_average_refuses_files_of_other_architectures(tmp_path):
    a = ck.save_model(tmp_path / "a.safetensors", unet=tiny())
    wide = tiny()
    wide.config.prediction_type = "v_prediction"
    b = ck.save_model(tmp_path / "b.safetensors", unet=wide)
    with pytest.raises(CheckpointError, match="b.safetensors: its unet_config differs from a.safetensors"):
        ck.average_models([a, b], tmp_path / "soup.safetensors")
    c = ck.save_model(tmp_path / "c.safetensors", unet=tiny(), vae=tiny_vae())
    with pytest.raises(CheckpointError, match="vae_config differs"):
        ck.average_models([a, c], tmp_path / "soup.safetensors")
    sd = ck.save_sd15(tmp_path / "sd.safetensors", unet=tiny(), dtype=None)
    with pytest.raises(CheckpointError, match="sd.safetensors: expected a MagicVideo file to average"):
        ck.average_models([a, sd], tmp_path / "soup.safetensors")
    with pytest.raises(ValueError, match="two or more files, found 1"):
        ck.average_models([a], tmp_path / "soup.safetensors")
    assert not (tmp_path / "soup.safetensors").exists()


def test_parts_may_be_absent(tmp_path):
    vae = tiny_vae()
    bundle = ck.load_model(ck.save_model(tmp_path / "vae.safetensors", vae=vae))
    assert bundle.unet is None and bundle.text_encoder is None and same_state(bundle.vae, vae)


def test_text_encoder_round_trip(tmp_path):
    torch.manual_seed(0)
    encoder = TextEncoder(TextConfig(**world.text_fields(), width=16, layers=1, heads=2)).eval()
    path = ck.save_model(tmp_path / "t.safetensors", unet=tiny(), text_encoder=encoder)
    text_config = json.loads(ck.read_header(path).metadata["text_config"])
    assert text_config == encoder.config.to_dict() and text_config["lexicon"] == world.lexicon().to_dict()
    loaded = ck.load_model(path).text_encoder
    assert same_state(loaded, encoder) and loaded.config == encoder.config
    assert loaded.motion_request("a red ball moving left") == encoder.motion_request("a red ball moving left")


# ----------------------------------------------------------------------------- format versions


def _text_encoder(vocab=None) -> TextEncoder:
    """A tiny text encoder without a lexicon, as every version-1 file holds."""
    torch.manual_seed(1)
    return TextEncoder(TextConfig(vocab=vocab or world.text_vocab(), width=16, layers=1, heads=2)).eval()


def _as_version(path, version: str):
    """Rewrite a file's metadata format_version (the tensors unchanged), as an older or newer pack wrote it.
    Version 1's TextConfig had no ``lexicon`` field, so its text_config has no such key."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if version == "1" and "text_config" in meta:
        config = json.loads(meta["text_config"])
        assert config.pop("lexicon") is None, "version-1 files never carried a lexicon"
        meta["text_config"] = json.dumps(config, sort_keys=True)
    save_file(tensors, str(path), metadata={**meta, "format_version": version})
    return path


def _tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_version_1_files_load_and_their_world_text_encoder_gets_the_lexicon(tmp_path):
    unet, encoder = tiny(), _text_encoder()
    path = _as_version(ck.save_model(tmp_path / "v1.safetensors", unet=unet, text_encoder=encoder), "1")
    header = ck.read_header(path)
    assert header.metadata["format_version"] == "1" and "lexicon" not in json.loads(header.metadata["text_config"])
    assert ck.identify(header) == "a MagicVideo full file (format_version 1)"

    bundle = ck.load_model(path)
    assert bundle.text_encoder.lexicon == world.lexicon()  # migrated on load
    assert bundle.text_encoder.config.lexicon == world.lexicon().to_dict()
    assert same_state(bundle.text_encoder, encoder) and same_state(bundle.unet, unet)
    assert bundle.text_encoder.motion_request("a red ball moving left")["objects"]
    assert ck.load(path).text_encoder.lexicon == world.lexicon()
    # the migration itself: only version 1, only world vocabularies, never over a lexicon the file has
    config = {k: v for k, v in encoder.config.to_dict().items() if k != "lexicon"}  # as version 1 wrote it
    assert ck.migrate_text_config(config, "1")["lexicon"] == world.lexicon().to_dict()
    assert ck.migrate_text_config(config, "2") == config
    own = {**config, "lexicon": {**world.lexicon().to_dict(), "unit_travel": 1.0}}
    assert ck.migrate_text_config(own, "1") == own


def test_upgrade_rewrites_a_version_1_file_as_version_2(tmp_path):
    unet, encoder = tiny(), _text_encoder()
    old = _as_version(ck.save_model(tmp_path / "v1.safetensors", unet=unet, text_encoder=encoder,
                                    extra_metadata={"note": "kept"}), "1")
    before = _tensors(old)
    out = ck.upgrade(old, tmp_path / "v2.safetensors")
    assert out == tmp_path / "v2.safetensors" and ck.read_header(old).metadata["format_version"] == "1"
    meta = ck.read_header(out).metadata
    assert meta["format_version"] == "2" and meta["note"] == "kept" and meta["unet_config"] == ck.read_header(old).metadata["unet_config"]
    text_config = json.loads(meta["text_config"])
    assert text_config == {**encoder.config.to_dict(), "lexicon": world.lexicon().to_dict()}
    assert TextConfig.from_dict(text_config).lexicon == world.lexicon().to_dict()
    after = _tensors(out)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert ck.load_model(out).text_encoder.lexicon == world.lexicon()
    # in place by default
    assert ck.upgrade(old) == old and ck.read_header(old).metadata == meta
    assert all(torch.equal(v, before[k]) for k, v in _tensors(old).items())
    with pytest.raises(CheckpointError, match="expected a MagicVideo file"):
        ck.upgrade(ck.save_sd15(tmp_path / "sd.safetensors", unet=tiny(), dtype=None))


def test_a_version_1_text_encoder_of_other_words_gets_no_lexicon(tmp_path):
    encoder = _text_encoder(vocab=["a", "zebra", "galloping"])
    path = _as_version(ck.save_model(tmp_path / "v1.safetensors", text_encoder=encoder), "1")
    loaded = ck.load_model(path).text_encoder
    assert loaded.lexicon is None and loaded.config.lexicon is None and same_state(loaded, encoder)
    assert loaded.motion_request("a zebra galloping") is None  # nothing to steer by
    upgraded = ck.read_header(ck.upgrade(path)).metadata
    assert upgraded["format_version"] == "2" and json.loads(upgraded["text_config"]).get("lexicon") is None
    assert ck.load_model(path).text_encoder.lexicon is None
    # a version-2 file says what it has: no lexicon stays none, even with the world's words
    plain = ck.save_model(tmp_path / "v2.safetensors", text_encoder=_text_encoder())
    assert ck.load_model(plain).text_encoder.lexicon is None


def test_average_of_version_1_files_is_written_as_version_2(tmp_path):
    vae = tiny_vae()
    paths = [_as_version(ck.save_model(tmp_path / f"{name}.safetensors", vae=vae, text_encoder=_text_encoder()), "1")
             for name in ("a", "b")]
    meta = ck.read_header(ck.average_models(paths, tmp_path / "soup.safetensors")).metadata
    assert meta["format_version"] == "2"
    assert json.loads(meta["text_config"])["lexicon"] == world.lexicon().to_dict()
    assert ck.load_model(tmp_path / "soup.safetensors").text_encoder.lexicon == world.lexicon()


def test_motion_file_round_trip(tmp_path, tiny_sd):
    sd_path, _, _ = tiny_sd
    video = ck.load_sd15(sd_path, unet_overrides={"max_frames": 6, "cond_channels": 5}).unet
    randomize_motion_(video)
    motion = ck.save_motion(tmp_path / "motion.safetensors", video)
    header = ck.read_header(motion)
    assert header.metadata["kind"] == "motion"
    assert header.shapes and all(is_motion_key(k) and k.startswith(ck.UNET_PREFIX) for k in header.shapes)

    rebuilt = ck.load_sd15(sd_path, motion=motion)
    assert rebuilt.unet.config == video.config and same_state(rebuilt.unet, video)
    assert rebuilt.source == "SD1.x checkpoint + motion file"
    applied = ck.apply_motion(ck.load_sd15(sd_path, unet_overrides={"max_frames": 6, "cond_channels": 5}).unet, motion)
    assert same_state(applied, video)

    with pytest.raises(CheckpointError, match="motion file.*apply"):
        ck.load(motion)
    with pytest.raises(CheckpointError, match=r"differences.*max_frames"):
        ck.apply_motion(ck.load_sd15(sd_path).unet, motion)


def test_motion_file_for_another_unet_is_refused(tmp_path, tiny_sd):
    sd_path, _, _ = tiny_sd
    other = VideoUNet(UNetConfig(**{**TINY, "model_channels": 64}))
    motion = ck.save_motion(tmp_path / "other_motion.safetensors", other)
    with pytest.raises(CheckpointError, match=r"different UNet.*model_channels: motion file 64, checkpoint 32"):
        ck.load_sd15(sd_path, motion=motion)


# ----------------------------------------------------------------------------- wrong files


def fake_file(path, shapes: dict, metadata: dict | None = None):
    """A safetensors file with the given keys and shapes (zeros): detection reads headers only."""
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path), metadata=metadata)
    return path


def test_sdxl_is_named(tmp_path):
    path = fake_file(tmp_path / "sdxl.safetensors", {
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.ln_final.weight": (1280,),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
    })
    for load in (ck.load, ck.load_sd15):
        with pytest.raises(CheckpointError, match=r"expected .*SD1\.x.*found an SDXL checkpoint.*2048"):
            load(path)


def test_sd2_is_named(tmp_path):
    path = fake_file(tmp_path / "sd21.safetensors", {
        "cond_stage_model.model.ln_final.weight": (1024,),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    })
    with pytest.raises(CheckpointError, match=r"expected an SD1\.x checkpoint.*found an SD2\.x checkpoint.*1024.*linear proj_in"):
        ck.load_sd15(path)


def test_vae_given_as_model_is_named(tmp_path):
    path = tmp_path / "vae_only.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vae().state_dict().items() if "temporal" not in k}, str(path))
    with pytest.raises(CheckpointError, match=r"expected an SD1\.x checkpoint.*found a VAE"):
        ck.load_sd15(path)
    with pytest.raises(CheckpointError, match=r"expected a MagicVideo model.*found a VAE"):
        ck.load_model(path)


def test_truncated_file_is_explained(tmp_path, tiny_sd):
    data = tiny_sd[0].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated.*describes \d+ bytes.*the file has \d+"):
        ck.load(cut)
    cut.write_bytes(data[:200])  # inside the header
    with pytest.raises(CheckpointError, match=r"truncated.*header alone needs"):
        ck.load(cut)
    cut.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty or truncated"):
        ck.load(cut)


def test_unknown_format_version_is_refused(tmp_path):
    path = fake_file(tmp_path / "future.safetensors", {"model.diffusion_model.x": (1,)},
                     {"format": "magicvideo", "format_version": "4", "kind": "full"})
    with pytest.raises(CheckpointError, match=r"expected MagicVideo format_version 1, 2 or 3, found '4'.*update the pack"):
        ck.load(path)
    with pytest.raises(CheckpointError, match=r"format_version 1, 2 or 3, found '4'"):
        ck.load_model(path)
    with pytest.raises(CheckpointError, match=r"format_version 1, 2 or 3, found '4'"):
        ck.upgrade(path)
    assert ck.read_header(path).metadata["format_version"] == "4"  # left as it was
    unversioned = fake_file(tmp_path / "none.safetensors", {"model.diffusion_model.x": (1,)},
                            {"format": "magicvideo", "kind": "full"})
    with pytest.raises(CheckpointError, match=r"found None"):
        ck.load_model(unversioned)


class _Boom:
    """Unpickling this writes a marker file: the loader must never get that far."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "disguised.safetensors", "zip.safetensors"])
def test_pickles_are_refused_unread(tmp_path, name):
    marker = tmp_path / "unpickled"
    _Boom.marker = marker
    path = tmp_path / name
    if name.startswith("zip"):
        torch.save({"w": torch.zeros(1)}, path)  # torch's zip container
    else:
        path.write_bytes(pickle.dumps({"state_dict": _Boom()}, protocol=4))
    with pytest.raises(CheckpointError, match="pickle"):
        ck.load(path)
    assert not marker.exists()


def test_overrides_that_contradict_the_weights_are_named(tiny_sd):
    with pytest.raises(CheckpointError, match=r"unet_overrides contradict.*context_dim=24 but the checkpoint has 16"):
        ck.load_sd15(tiny_sd[0], unet_overrides={"context_dim": 24})
    # what shapes do not fix is fine, lists or tuples alike
    ck.load_sd15(tiny_sd[0], unet_overrides={"num_heads": 4, "channel_mult": [1, 2], "cond_channels": 5})


def test_shape_mismatch_lists_keys_with_expected_and_found(tiny_sd):
    """A file whose layers disagree (one cross-attention 24 wide, the rest 16)."""
    from safetensors import safe_open

    path = tiny_sd[0]
    header = ck.read_header(path)
    lying = path.with_name("lying_sd.safetensors")
    tensors = {}
    with safe_open(path, framework="pt") as f:
        for k in header.shapes:
            t = f.get_tensor(k)
            if k.endswith("attn2.to_k.weight") and "input_blocks.1." in k:
                t = torch.zeros(t.shape[0], 24)
            tensors[k] = t
    save_file(tensors, str(lying))
    with pytest.raises(CheckpointError, match=r"shape mismatches \(input_blocks\.1\.1\.transformer_blocks\.0\.attn2\.to_k\.weight: "
                                              r"expected \(32, 16\), found \(32, 24\)"):
        ck.load_sd15(lying)


def test_full_file_whose_config_does_not_match_its_weights(tmp_path):
    unet = tiny()
    path = tmp_path / "lying.safetensors"
    meta = {"format": "magicvideo", "format_version": "1", "kind": "full",
            "unet_config": json.dumps({**unet.config.to_dict(), "max_frames": 4})}
    save_file({ck.UNET_PREFIX + k: v.contiguous() for k, v in unet.state_dict().items()}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"adaptor\.scale: expected \(4, 32\), found \(8, 32\)"):
        ck.load_model(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="found nothing"):
        ck.load(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b'{"a": 1}' * 4)
    with pytest.raises(CheckpointError, match="expected a safetensors file, found a JSON file"):
        ck.load(junk)
    bad_meta = fake_file(tmp_path / "badmeta.safetensors", {"model.diffusion_model.x": (1,)},
                         {"format": "magicvideo", "format_version": "1", "kind": "full", "unet_config": "{not json"})
    with pytest.raises(CheckpointError, match="valid unet_config"):
        ck.load_model(bad_meta)
    with pytest.raises(CheckpointError, match="ending in .safetensors"):
        ck.save_model(tmp_path / "x.ckpt", unet=tiny())
