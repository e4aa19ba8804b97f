"""The built-in text encoder and the Text Encode node."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from magicvideo.models import world
from magicvideo.models.text import BOS, EOS, PAD, TextConfig, TextEncoder, normalise

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TextEncoder(TextConfig(width=32, layers=2, heads=4)).eval()


def load_node_module():
    """nodes/text.py imports nothing from the host, so load it without nodes/__init__.py
    (which pulls in the host-bound node modules)."""
    spec = importlib.util.spec_from_file_location("magicvideo.nodes.text", REPO / "nodes" / "text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_normalise():
    assert normalise("A Red ball, drifting LEFT!") == ["a", "red", "ball", "drifting", "left"]
    assert normalise("two objects: up-left") == ["two", "objects", "up", "left"]
    assert normalise("  ") == []


def test_tokenize_layout(encoder):
    ids, keep, unknown = encoder.tokenize(["red ball", ""])
    assert ids.shape == keep.shape == (2, 77)
    red, ball = encoder.word_to_id["red"], encoder.word_to_id["ball"]
    assert ids[0, :5].tolist() == [BOS, red, ball, EOS, PAD]
    assert ids[1, :3].tolist() == [BOS, EOS, PAD]
    assert keep.sum(1).tolist() == [4, 2]
    assert unknown == []


def test_unknown_words_are_reported_not_silently_dropped(encoder):
    ids, _, unknown = encoder.tokenize(["a red unicorn", "unicorn dancing"])
    assert unknown == ["unicorn", "dancing"]
    _, unknown = encoder.encode("a blue square moving left")
    assert unknown == []


def test_every_world_caption_is_in_the_vocabulary(encoder):
    rng = np.random.default_rng(0)
    captions = [world.caption(world.sample_spec(rng, "all"), rng) for _ in range(1000)]
    _, _, unknown = encoder.tokenize(captions)
    assert unknown == []


def test_encode_shapes_and_empty_prompt(encoder):
    context, unknown = encoder.encode(["a red ball drifting to the left", ""])
    assert context.shape == (2, 77, 32)
    assert torch.isfinite(context).all() and unknown == []
    assert not torch.allclose(context[0], context[1])


def test_batch_neighbours_and_padding_do_not_change_a_prompt(encoder):
    with torch.no_grad():
        alone, _ = encoder.encode(["green triangle spins quickly"])
        together, _ = encoder.encode(["green triangle spins quickly", "two objects: a red ball moving up and a blue box moving down"])
    assert torch.allclose(alone[0], together[0], atol=1e-5)


def test_too_long_prompt_is_an_error(encoder):
    with pytest.raises(ValueError, match="at most 75"):
        encoder.tokenize(" ".join(["red"] * 76))


def test_config_round_trip_and_partial_dicts():
    config = TextConfig(width=64, layers=3)
    again = TextConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.vocab == config.vocab
    partial = TextConfig.from_dict({"width": 128, "layers": 2, "heads": 4, "max_length": 77})
    assert partial.vocab == TextConfig().vocab
    with pytest.raises(ValueError, match="unknown TextConfig fields"):
        TextConfig.from_dict({"widht": 128})
    with pytest.raises(ValueError, match="divisible"):
        TextConfig(width=30, heads=4)


def test_state_dict_rebuilds_the_same_encoder(encoder):
    clone = TextEncoder(TextConfig.from_dict(encoder.config.to_dict())).eval()
    clone.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        assert torch.equal(clone.encode("a pink dot")[0], encoder.encode("a pink dot")[0])


def test_trains_as_a_normal_module():
    enc = TextEncoder(TextConfig(width=32, layers=1, heads=2)).train()
    context, _ = enc.encode(["red ball", ""])
    context.pow(2).mean().backward()
    assert enc.token_embedding.weight.grad is not None
    assert enc.blocks[0].qkv.weight.grad.abs().sum() > 0


def test_node_outputs_core_conditioning_layout(encoder):
    node_module = load_node_module()
    node = node_module.NODE_CLASS_MAPPINGS["MagicVideoTextEncode"]()
    assert "MagicVideoTextEncode" in node_module.NODE_DISPLAY_NAME_MAPPINGS
    spec = node_module.MagicVideoTextEncode.INPUT_TYPES()
    for group in spec.values():
        for name, (_, options) in group.items():
            assert options.get("tooltip"), name
    (cond,) = node.encode(encoder, "a red ball drifting to the left")
    assert isinstance(cond, list) and len(cond) == 1
    tensor, extras = cond[0]
    # the words the context holds ride along for the keyframe sampler's motion guidance
    assert tensor.shape == (1, 77, 32) and extras == {"magicvideo_words": "a red ball drifting to the left"}
    (empty,) = node.encode(encoder, "")
    assert empty[0][0].shape == (1, 77, 32)


def test_node_unknown_words(encoder, capsys):
    node = load_node_module().MagicVideoTextEncode()
    with pytest.raises(ValueError) as info:
        node.encode(encoder, "a red balll moving lefft")
    message = str(info.value)
    assert "'balll'" in message and "'lefft'" in message and "ball" in message
    assert f"{encoder.vocab_size} words" in message
    (cond,) = node.encode(encoder, "a red balll", ignore_unknown_words=True)
    assert "balll" in capsys.readouterr().out
    assert torch.allclose(cond[0][0], node.encode(encoder, "a red")[0][0][0])
    assert cond[0][1]["magicvideo_words"] == "a red"  # as the context: one token per known word
