"""The built-in text encoder and the Text Encode node."""

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from magicvideo.models import world
from magicvideo.models.guidance import MOTION_KEY
from magicvideo.models.lexicon import Lexicon
from magicvideo.models.text import BOS, EOS, PAD, TextConfig, TextEncoder, normalise, unknown_words_message

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TextEncoder(TextConfig(**world.text_fields(), width=32, layers=2, heads=4)).eval()


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
    config = TextConfig(**world.text_fields(), width=64, layers=3)
    again = TextConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.vocab == config.vocab and again.lexicon == world.lexicon().to_dict()
    assert Lexicon.from_dict(again.lexicon) == world.lexicon()
    partial = TextConfig.from_dict({"vocab": world.text_vocab(), "width": 128, "layers": 2, "heads": 4, "max_length": 77})
    assert partial.vocab == world.text_vocab() and partial.lexicon is None
    with pytest.raises(ValueError, match="unknown TextConfig fields"):
        TextConfig.from_dict({"vocab": ["red"], "widht": 128})
    with pytest.raises(ValueError, match="divisible"):
        TextConfig(vocab=["red"], width=30, heads=4)


def test_config_needs_a_vocabulary_and_a_well_formed_lexicon():
    with pytest.raises(ValueError, match="needs a vocabulary"):
        TextConfig()
    with pytest.raises(ValueError, match="needs a vocabulary"):
        TextConfig.from_dict({"width": 128, "layers": 2, "heads": 4})
    with pytest.raises(ValueError, match="duplicate"):
        TextConfig(vocab=["red", "red"])
    with pytest.raises(ValueError, match="lowercase"):
        TextConfig(vocab=["Red"])
    lexicon = world.lexicon().to_dict()
    broken = {**lexicon, "paths": {**lexicon["paths"], "left": {"slow": {"dx": -0.26}}}}
    with pytest.raises(ValueError, match="lexicon path left/slow must have the fields"):
        TextConfig(vocab=world.text_vocab(), lexicon=broken)
    orphan = {**lexicon, "motions": {**lexicon["motions"], "sliding": "slide"}}
    with pytest.raises(ValueError, match="motions without a path.*slide"):
        TextConfig(vocab=world.text_vocab(), lexicon=orphan)
    with pytest.raises(TypeError):
        TextConfig(vocab=world.text_vocab(), lexicon={**lexicon, "colour": {}})


def test_unknown_words_message_names_close_words_and_the_lexicons_kinds():
    with_lexicon = TextConfig(**world.text_fields())
    message = unknown_words_message(["balll", "zzz"], with_lexicon)
    assert "2 word(s)" in message and "'balll' (did you mean ball" in message and "'zzz'." in message
    assert f"knows {len(with_lexicon.vocab)} words" in message
    assert "colours (" in message and "red" in message and "circle" in message and "bounce" in message
    plain = unknown_words_message(["balll"], TextConfig(vocab=world.text_vocab()))
    assert "did you mean ball" in plain and "colours" not in plain and plain.endswith("words.")


def test_state_dict_rebuilds_the_same_encoder(encoder):
    clone = TextEncoder(TextConfig.from_dict(encoder.config.to_dict())).eval()
    clone.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        assert torch.equal(clone.encode("a pink dot")[0], encoder.encode("a pink dot")[0])


def test_trains_as_a_normal_module():
    enc = TextEncoder(TextConfig(vocab=world.text_vocab(), width=32, layers=1, heads=2)).train()
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
    # what the prompt asks of each object rides along for the keyframe sampler's motion guidance
    assert tensor.shape == (1, 77, 32) and MOTION_KEY == "magicvideo_motion"
    assert extras == {MOTION_KEY: encoder.motion_request("a red ball drifting to the left")}
    [obj] = extras[MOTION_KEY]["objects"]
    assert obj["tokens"] == [2, 3, 4, 5, 7] and obj["path"] == world.lexicon().motion_params("left", "slow")
    (empty,) = node.encode(encoder, "")
    assert empty[0][0].shape == (1, 77, 32) and empty[0][1] == {MOTION_KEY: {"objects": [], "unit_travel": 0.26}}
    # an encoder without a lexicon: the plain core layout, nothing for motion guidance
    plain = TextEncoder(TextConfig(vocab=world.text_vocab(), width=32, layers=1, heads=4)).eval()
    (cond,) = node.encode(plain, "a red ball drifting to the left")
    assert cond[0][1] == {} and cond[0][0].shape == (1, 77, 32)


def test_node_unknown_words(encoder, caplog):
    node = load_node_module().MagicVideoTextEncode()
    with pytest.raises(ValueError) as info:
        node.encode(encoder, "a red balll moving lefft")
    message = str(info.value)
    assert "'balll'" in message and "'lefft'" in message and "ball" in message
    assert f"{encoder.vocab_size} words" in message
    assert "colours (" in message  # the encoder's lexicon says what kinds of words it knows
    with caplog.at_level(logging.WARNING):
        (cond,) = node.encode(encoder, "a red balll moving left", ignore_unknown_words=True)
    assert "balll" in caplog.text
    assert torch.allclose(cond[0][0], node.encode(encoder, "a red moving left")[0][0][0])
    # the motion request as the context: one token per known word
    assert cond[0][1] == node.encode(encoder, "a red moving left")[0][0][1]


def test_motion_request_tokens_point_at_each_objects_words(encoder):
    prompt = "zzz two objects: a red ball qqq moving left quickly and a blue box bouncing up and down slowly"
    ids, _, unknown = encoder.tokenize(prompt)
    assert unknown == ["zzz", "qqq"]
    request = encoder.motion_request(prompt)
    assert request["unit_travel"] == world.LINEAR_TRAVEL["slow"]
    ball, box = request["objects"]
    words = {encoder.word_to_id[w]: w for w in encoder.config.vocab}
    # the tokens index the encoder's context: <bos> first, the unknown words left out
    assert [words[int(ids[0, i])] for i in ball["tokens"]] == ["red", "ball", "moving", "left", "quickly"]
    assert [words[int(ids[0, i])] for i in box["tokens"]] == ["blue", "box", "bouncing", "up", "down", "slowly"]  # less the stop words
    assert ball["path"] == world.lexicon().motion_params("left", "fast")
    assert box["path"] == world.lexicon().motion_params("bounce", "slow")
    # objects without a motion are not asked anything; the request is plain data (it rides in a CONDITIONING)
    assert encoder.motion_request("a red ball and a blue box")["objects"] == []
    assert json.loads(json.dumps(request)) == request


def test_inference_modules_do_not_import_the_world():
    code = ("import sys, magicvideo.models.pipeline, magicvideo.models.guidance, magicvideo.models.text, "
            "magicvideo.models.sampling; assert 'magicvideo.models.world' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    # nor does loading a current (version 2) model file and reading a prompt with its lexicon
    code = ("import sys; from magicvideo.models import checkpoint; "
            f"b = checkpoint.load_model({str(REPO / 'weights' / 'magicvideo_default.safetensors')!r}); "
            "assert b.text_encoder.motion_request('a red ball moving left')['objects']; "
            "assert 'magicvideo.models.world' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
