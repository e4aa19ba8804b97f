"""models/quant.py: int8 weights with per-channel scales, 2:4 sparsity packed two groups a byte,
layers that dequantise in their forward, on a tiny VideoUNet."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from magicvideo.models import quant
from magicvideo.models.unet import UNetConfig, VideoUNet, is_motion_key


def test_2_4_keeps_the_two_largest_of_every_four_and_packs_them():
    torch.manual_seed(0)
    w = torch.randn(6, 32)
    mask = quant.prune_2_4(w)
    assert (mask.view(6, 8, 4).sum(-1) == 2).all()
    kept = w.abs().view(6, 8, 4)[mask.view(6, 8, 4)].view(6, 8, 2)
    dropped = w.abs().view(6, 8, 4)[~mask.view(6, 8, 4)].view(6, 8, 2)
    assert (kept.min(-1).values >= dropped.max(-1).values).all()
    q = torch.randint(-127, 128, (6, 32), dtype=torch.int8) * mask
    values, positions = quant.pack_2_4(q, mask)
    assert values.shape == (6, 16) and positions.shape == (6, 4) and positions.dtype == torch.uint8
    assert torch.equal(quant.unpack_2_4(values, positions, 32), q)


@pytest.mark.parametrize("sparsity", quant.SPARSITIES)
def test_a_layer_computes_with_its_dequantised_weight(sparsity):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    layer = quant.QuantConv2d(conv, sparsity)
    w = layer.weight_q.dense()
    x = torch.randn(2, 16, 5, 5)
    assert torch.allclose(layer(x), nn.functional.conv2d(x, w, conv.bias, padding=1), atol=1e-5)
    err = (w - conv.weight).abs().max() / conv.weight.abs().max()
    assert err < (0.01 if sparsity == "none" else 1.0)
    if sparsity == "2:4":
        assert ((w.flatten(1) != 0).view(8, -1, 4).sum(-1) <= 2).all()


def _unet():
    torch.manual_seed(0)
    unet = VideoUNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                                num_heads=2, context_dim=16, max_frames=8))
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return unet.eval()


def test_a_quantised_unet_stays_close_and_small():
    dense = _unet()
    x, t, c = torch.randn(4, 4, 8, 8), torch.full((4,), 500.0), torch.randn(1, 5, 16).expand(4, -1, -1)
    with torch.no_grad():
        ref = dense(x, t, c, num_frames=4)
    before = quant.stored_bytes(dense)
    int8 = _unet()
    names = quant.quantize(int8)
    assert names and "input_blocks.0.0" not in names and "out.2" not in names
    sparse = _unet()
    quant.quantize(sparse, sparsity="2:4")
    with torch.no_grad():
        a, b = int8(x, t, c, num_frames=4), sparse(x, t, c, num_frames=4)
    rel = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
    assert rel(a) < 0.02  # int8 alone: close (2:4 on random weights is far; trained ones: the measurements)
    # exactly the computation of the dense model with the dequantised weights
    plain = _unet()
    with torch.no_grad():
        for name in quant.quantize(_unet(), sparsity="2:4"):
            plain.get_submodule(name).weight.copy_(sparse.get_submodule(name).weight_q.dense())
        assert torch.allclose(plain(x, t, c, num_frames=4), b, atol=1e-5)
    assert quant.stored_bytes(int8) < 0.45 * before and quant.stored_bytes(sparse) < quant.stored_bytes(int8)


def test_unknown_schemes():
    with pytest.raises(ValueError, match="scheme must be one of"):
        quant.quantize(_unet(), scheme="int4")
    with pytest.raises(ValueError, match="sparsity must be one of"):
        quant.quantize(_unet(), sparsity="1:4")


def test_a_quantised_file_round_trips_and_says_what_it_is(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from magicvideo.models import checkpoint

    unet = _unet()
    quant.quantize(unet, sparsity="2:4")
    path = checkpoint.save_model(tmp_path / "q.safetensors", unet=unet)
    loaded = checkpoint.load_model(path).unet
    x, t, c = torch.randn(4, 4, 8, 8), torch.full((4,), 300.0), torch.randn(1, 5, 16).expand(4, -1, -1)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, c, num_frames=4), unet(x, t, c, num_frames=4))
    meta = checkpoint.read_header(path).metadata
    assert json.loads(meta["quantization"])["sparsity"] == "2:4"
    assert quant.describe(loaded) == quant.describe(unet)

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for change, message in (({"scheme": "int4"}, "scheme 'int4'"), ({"version": 9}, "version 9")):
        bad = {**json.loads(meta["quantization"]), **change}
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "quantization": json.dumps(bad)})
        with pytest.raises(checkpoint.CheckpointError, match=message):
            checkpoint.load_model(tmp_path / "bad.safetensors")
    layers = json.loads(meta["quantization"])["layers"]
    first = next(iter(layers))
    for change, message in (({"layers": {**layers, "no.such.layer": "none"}}, "does not fit"),
                            ({"layers": {**layers, first: "1:4"}}, "does not fit"),
                            ({"layers": {**layers, first: "none" if layers[first] == "2:4" else "2:4"}}, "shape mismatch")):
        bad = {**json.loads(meta["quantization"]), **change}
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "quantization": json.dumps(bad)})
        with pytest.raises(checkpoint.CheckpointError, match=message):
            checkpoint.load_model(tmp_path / "bad.safetensors")
    name = next(k for k in tensors if k.endswith("weight_q.values"))
    for value, message in ((tensors[name][:, :-1].contiguous(), "shape mismatch"), (tensors[name].half(), "wrong type")):
        save_file({**tensors, name: value}, str(tmp_path / "tampered.safetensors"), metadata=meta)
        with pytest.raises(checkpoint.CheckpointError, match=message):
            checkpoint.load_model(tmp_path / "tampered.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load_model(tmp_path / "truncated.safetensors")


def _dequantised_twin(quantised: nn.Module, plain: nn.Module) -> nn.Module:
    """``plain`` (the same architecture in full precision) given every value ``quantised`` holds:
    its int8 layers' weights dequantised, the rest as loaded (what the file stores in fp16)."""
    state = quantised.state_dict()
    with torch.no_grad():
        for k, v in plain.state_dict().items():
            if k in state:
                v.copy_(state[k])
        for name in quant.describe(quantised)["layers"]:
            plain.get_submodule(name).weight.copy_(quantised.get_submodule(name).weight_q.dense())
    return plain


@pytest.mark.parametrize("sparsity", quant.SPARSITIES)
def test_the_converter_round_trips_to_the_dequantised_weights(tmp_path, sparsity):
    """magicvideo quantize -> file -> load: the outputs of the full-precision UNet given the
    dequantised weights."""
    from magicvideo import cli
    from magicvideo.models import checkpoint

    plain = checkpoint.save_model(tmp_path / "plain.safetensors", unet=_unet())
    out = tmp_path / "q.safetensors"
    assert cli.main(["quantize", str(plain), str(out), "--sparsity", sparsity]) == 0
    loaded = checkpoint.load_model(out).unet
    assert json.loads(checkpoint.read_header(out).metadata["quantization"])["sparsity"] == sparsity
    twin = _dequantised_twin(loaded, _unet())
    x, t, c = torch.randn(4, 4, 8, 8), torch.full((4,), 300.0), torch.randn(1, 5, 16).expand(4, -1, -1)
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, c, num_frames=4), twin(x, t, c, num_frames=4), atol=1e-5)


def _sd_and_motion(tmp_path, vae=None):
    """A tiny SD-layout checkpoint and a full-precision motion file for it."""
    from magicvideo.models import checkpoint
    from test_unet import randomize_motion_, tiny

    sd = checkpoint.save_sd15(tmp_path / "sd.safetensors", unet=tiny(), vae=vae, dtype=None)
    video = randomize_motion_(checkpoint.load_sd15(sd, unet_overrides={"max_frames": 8}).unet)
    return sd, checkpoint.save_motion(tmp_path / "motion.safetensors", video)


@pytest.mark.parametrize("sparsity", quant.SPARSITIES)
def test_a_quantised_motion_file_applies_onto_an_sd_checkpoint(tmp_path, sparsity):
    """A motion-only file quantised by the converter, applied onto an SD1.x checkpoint: its
    temporal and fps layers int8, the image layers and frame adaptors as they were; the same
    outputs as the dequantised weights, by either way in (load_sd15, apply_motion)."""
    from magicvideo import cli
    from magicvideo.models import checkpoint
    from test_unet import inputs

    sd, motion = _sd_and_motion(tmp_path)
    out = tmp_path / "motion_q.safetensors"
    assert cli.main(["quantize", str(motion), str(out), "--sparsity", sparsity]) == 0
    header = checkpoint.read_header(out)
    description = json.loads(header.metadata["quantization"])
    assert header.metadata["kind"] == "motion" and description["sparsity"] == sparsity
    assert description["layers"] and all(is_motion_key(k) for k in header.shapes)
    assert all(is_motion_key(name + ".weight") for name in description["layers"])
    assert any(".temporal" in name for name in description["layers"]) and any(k.endswith("adaptor.scale") for k in header.shapes)
    assert out.stat().st_size < 0.5 * motion.stat().st_size

    loaded = checkpoint.load_sd15(sd, motion=out).unet
    assert quant.describe(loaded)["layers"] == description["layers"]  # the image layers stay full precision
    twin = _dequantised_twin(loaded, checkpoint.load_sd15(sd, motion=motion).unet)
    reference = checkpoint.load_sd15(sd, motion=motion).unet
    x, t, c = inputs(4)
    with torch.no_grad():
        y = loaded(x, t, c, num_frames=4)
        assert torch.allclose(y, twin(x, t, c, num_frames=4), atol=1e-5)
        if sparsity == "none":
            assert float((y - reference(x, t, c, num_frames=4)).norm() / y.norm()) < 0.02
        applied = checkpoint.apply_motion(checkpoint.load_sd15(sd, unet_overrides={"max_frames": 8}).unet, out)
        assert torch.equal(applied(x, t, c, num_frames=4), y)
        assert torch.equal(checkpoint.apply_motion(applied, out)(x, t, c, num_frames=4), y)  # a second time
        quant.quantize(loaded)  # the loader's int8 option after an int8 motion file: the rest of the UNet
        assert len(quant.describe(loaded)["layers"]) > len(description["layers"])


def test_a_quantised_motion_file_where_it_cannot_run(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from magicvideo.models import checkpoint
    from test_unet import tiny

    sd, motion = _sd_and_motion(tmp_path)
    q = checkpoint.quantize_file(motion, tmp_path / "motion_q.safetensors", sparsity="2:4")
    CheckpointError = checkpoint.CheckpointError
    with pytest.raises(CheckpointError, match="motion file.*apply"):
        checkpoint.load(q)
    with pytest.raises(CheckpointError, match="expected a full MagicVideo model"):
        checkpoint.load_model(q)
    with pytest.raises(CheckpointError, match="quantised already"):
        checkpoint.quantize_file(q, tmp_path / "twice.safetensors")
    other = checkpoint.save_sd15(tmp_path / "other.safetensors", unet=tiny(model_channels=64), dtype=None)
    with pytest.raises(CheckpointError, match="different UNet"):
        checkpoint.load_sd15(other, motion=q)
    with pytest.raises(CheckpointError, match="int8 motion file for this UNet"):  # int8 layers, float file
        checkpoint.apply_motion(checkpoint.load_sd15(sd, motion=q).unet, motion)
    whole = checkpoint.load_sd15(sd, motion=q).unet
    quant.quantize(whole)
    with pytest.raises(CheckpointError, match="int8 image layers"):  # an SD1.x file is full precision
        checkpoint.save_sd15(tmp_path / "int8_sd.safetensors", unet=whole)

    meta = checkpoint.read_header(q).metadata
    with safe_open(str(q), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(meta["quantization"])["layers"]
    for change, message in (({"layers": {**layers, "input_blocks.1.0.in_layers.2": "none"}}, "motion layers only"),
                            ({"scheme": "int4"}, "scheme 'int4'")):
        bad = {**json.loads(meta["quantization"]), **change}
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "quantization": json.dumps(bad)})
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load_sd15(sd, motion=tmp_path / "bad.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes(q.read_bytes()[: q.stat().st_size * 3 // 4])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load_sd15(sd, motion=tmp_path / "truncated.safetensors")


@pytest.mark.host
@pytest.mark.parametrize("model, weights", [("magicvideo_default.safetensors", "int8"),
                                            ("magicvideo_default.safetensors", "int8 + 2:4"),
                                            ("magicvideo_default_int8_24.safetensors", "as stored")])
def test_the_main_workflow_with_converted_weights_in_the_host(comfy, model, weights):
    """The loader's weights option converts the bundled default on load, and the shipped int8 + 2:4
    file loads as stored; the main workflow renders either way."""
    from pathlib import Path

    from magicvideo.models import video_io

    workflow = json.loads((Path(__file__).resolve().parents[1] / "workflows" / "text_to_video.json").read_text())
    prompt = comfy.workflow_to_prompt(workflow)
    [loader] = [n for n in prompt.values() if n["class_type"] == "MagicVideoModelLoader"
                and n["inputs"]["model_name"] == "magicvideo_default.safetensors"]  # not the interpolator's
    loader["inputs"].update(model_name=model, weights=weights)
    [info] = comfy.output_files(comfy.run(prompt, timeout=600))
    video = video_io.read_video(comfy.output_path(info))
    assert video.frames.shape == (46, 256, 256, 3) and video.frames.std() > 2  # 24 fps, 64x64 super-resolved


def test_the_loader_converts_on_load_and_refuses_a_second_conversion(host_modules, tmp_path):
    import importlib

    import comfy.cli_args
    import folder_paths

    from magicvideo.models import checkpoint

    comfy.cli_args.args.cpu = True
    nodes = importlib.import_module("magicvideo.nodes.model")
    folder_paths.add_model_folder_path("magicvideo", str(tmp_path))
    unet = _unet()
    checkpoint.save_model(tmp_path / "plain_test.safetensors", unet=unet)
    quantised = checkpoint.quantize_file(tmp_path / "plain_test.safetensors", tmp_path / "quantised_test.safetensors",
                                         sparsity="2:4")
    assert quantised.stat().st_size < 0.5 * (tmp_path / "plain_test.safetensors").stat().st_size
    loader = nodes.ModelLoader()
    with pytest.raises(ValueError, match="quantised already"):
        loader._load("quantised_test.safetensors", "none", "none", "auto", "int8")
    with pytest.raises(ValueError, match="weights must be one of"):
        loader._load("plain_test.safetensors", "none", "none", "auto", "int4")
    with pytest.raises(checkpoint.CheckpointError, match="quantised already"):
        checkpoint.quantize_file(quantised, tmp_path / "twice.safetensors")

    # an SD1.5 checkpoint with an int8 motion file; the int8 option converts the rest of the UNet
    from magicvideo.models.vae import VAEConfig, VideoVAE

    folder_paths.add_model_folder_path("checkpoints", str(tmp_path))
    _, motion = _sd_and_motion(tmp_path, vae=VideoVAE(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)))
    checkpoint.quantize_file(motion, tmp_path / "motion_int8_24_test.safetensors", sparsity="2:4")
    motion_layers = json.loads(checkpoint.read_header(tmp_path / "motion_int8_24_test.safetensors").metadata["quantization"])["layers"]
    for weights, more in (("as stored", False), ("int8", True)):
        model, _, _ = loader._load("none", "sd.safetensors", "motion_int8_24_test.safetensors", "auto", weights)
        layers = quant.describe(model.unet)["layers"]
        assert {k: layers[k] for k in motion_layers} == motion_layers and (len(layers) > len(motion_layers)) == more
