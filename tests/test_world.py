"""The procedural world: determinism, splits, captions, rendering."""

import itertools
import json

import numpy as np
import pytest
import torch

from magicvideo.models import world


def specs(n, seed=0, split="train"):
    rng = np.random.default_rng(seed)
    return [world.sample_spec(rng, split) for _ in range(n)]


def test_batch_layout_and_range():
    videos, captions, clip_specs = world.batch(0, 8, frames=12, size=48)
    assert videos.shape == (8, 12, 3, 48, 48)
    assert videos.dtype == torch.float32
    assert -1.0 <= videos.min() and videos.max() <= 1.0
    assert len(captions) == len(clip_specs) == 8
    assert all(isinstance(c, str) and c for c in captions)


def test_deterministic_by_seed_and_streaming_from_a_generator():
    a = world.batch(3, 6)
    b = world.batch(3, 6)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    rng = np.random.default_rng(3)
    first, second = world.batch(rng, 6), world.batch(rng, 6)
    assert torch.equal(first[0], a[0])
    assert second[1] != first[1]  # the generator moves on


def test_render_is_host_image_layout():
    spec = specs(1)[0]
    frames = world.render(spec, frames=16, size=64)
    assert frames.shape == (16, 64, 64, 3)
    assert 0.0 <= frames.min() and frames.max() <= 1.0


def test_render_a_trainer_batch():
    # speed is measured by benchmarks, not timed tests (~0.3 s for these 64 clips on 2 idle cores)
    clips = world.render_batch(specs(64, seed=1))
    assert clips.shape == (64, 16, 64, 64, 3) and torch.isfinite(clips).all()


def test_object_colour_at_its_centre():
    obj = world.ObjectSpec("green", "square", "still", None, 0.5, 0.5, 0.15)
    spec = world.ClipSpec((obj,), "navy", "checker")
    frames = world.render(spec, frames=4, size=64)
    centre = frames[:, 32, 32] * 255
    assert torch.allclose(centre, torch.tensor(world.PALETTE["green"], dtype=torch.float32).expand(4, 3), atol=1)
    assert torch.equal(frames[0], frames[-1])  # still means still
    corner = frames[0, 0, 0] * 255
    base = torch.tensor(world.BACKGROUNDS["navy"], dtype=torch.float32)
    assert (corner - base).abs().max() <= world.TEXTURE_CONTRAST + 1


def test_more_frames_sample_the_same_motion_more_densely():
    # a 16-frame clip's frames are every 4th frame of its 61-frame rendering (interpolation targets)
    spec = specs(1, seed=5)[0]
    short = world.render(spec, frames=16, size=32)
    long = world.render(spec, frames=61, size=32)
    assert torch.allclose(short, long[::4], atol=1e-5)


def test_palette_is_well_separated_from_itself_and_backgrounds():
    pal = np.array(list(world.PALETTE.values()), dtype=float)
    d = np.linalg.norm(pal[:, None] - pal[None], axis=-1)
    assert d[~np.eye(len(pal), dtype=bool)].min() > 90
    bgs = np.array(list(world.BACKGROUNDS.values()), dtype=float)
    shades = np.concatenate([bgs - world.TEXTURE_CONTRAST, bgs + world.TEXTURE_CONTRAST])
    assert np.linalg.norm(pal[:, None] - shades[None], axis=-1).min() > 100
    assert len(world.COLOURS) >= 8 and {"circle", "square", "triangle"} <= set(world.SHAPES)


def test_heldout_split():
    assert world._choose_heldout() == world.HELDOUT_TRIPLES  # the frozen list is reproducible
    n_all = len(world.ALL_TRIPLES)
    assert 0.08 * n_all <= len(world.HELDOUT_TRIPLES) <= 0.12 * n_all
    train = set(world.TRAIN_TRIPLES)
    assert train.isdisjoint(world.HELDOUT_TRIPLES)
    # every value and every pair of values still appears in training
    for i in range(3):
        assert {t[i] for t in train} == {t[i] for t in world.ALL_TRIPLES}
    for i, j in itertools.combinations(range(3), 2):
        assert {(t[i], t[j]) for t in train} == {(t[i], t[j]) for t in world.ALL_TRIPLES}
    for s in specs(300, split="train"):
        assert not s.heldout
    for s in specs(100, split="heldout"):
        assert s.heldout and all(o.triple in world.HELDOUT_TRIPLES for o in s.objects)
    with pytest.raises(ValueError, match="split"):
        world.sample_spec(np.random.default_rng(0), "test")


def test_every_attribute_is_sampled():
    seen = specs(1500, seed=2, split="all")
    objs = [o for s in seen for o in s.objects]
    assert {o.colour for o in objs} == set(world.COLOURS)
    assert {o.shape for o in objs} == set(world.SHAPES)
    assert {o.motion for o in objs} == set(world.MOTIONS)
    assert {o.speed for o in objs} == {"slow", "fast", None}
    assert {s.texture for s in seen} == set(world.TEXTURES)
    assert {len(s.objects) for s in seen} == {1, 2}


def test_objects_stay_inside_and_apart():
    for s in specs(400, seed=4, split="all"):
        for o in s.objects:
            x, y, r, _ = world.trajectory(o, 16)
            ext = world.EXTENT[o.shape] * r
            assert (x - ext >= -1e-9).all() and (x + ext <= 1 + 1e-9).all()
            assert (y - ext >= -1e-9).all() and (y + ext <= 1 + 1e-9).all()
            assert 8 / 64 * 0.6 <= r.min() and r.max() <= 0.25  # recognisable, not frame-filling
        if len(s.objects) == 2:
            a, b = s.objects
            assert a.colour != b.colour
            assert world._apart(a, b, gap=0.0)


def test_captions_name_the_attributes_and_use_only_the_vocabulary():
    vocab = set(world.vocabulary())
    rng = np.random.default_rng(7)
    for s in specs(500, seed=7, split="all"):
        text = world.caption(s, rng)
        words = text.replace(",", " ").replace(":", " ").split()
        assert set(words) <= vocab, text
        for o in s.objects:
            assert set(world.COLOUR_WORDS[o.colour]) & set(words), text
            assert set(world.SHAPE_WORDS[o.shape]) & set(words), text
            if o.speed is not None:
                assert set(world.SPEED_WORDS[o.speed]) & set(words), text
    assert "a red ball" in {world.caption(world.ClipSpec((world.ObjectSpec("red", "circle", "left", "slow", .5, .5, .15),)), np.random.default_rng(i))[:10] for i in range(40)}


def test_object_word_positions_point_at_each_objects_own_colour_and_shape_words():
    """Over 500 captions, also two objects of one colour or one shape and a background of an
    object's colour: each object's pair is its own colour word then its own shape word, in
    the order of the spec; a caption that does not name an object is an error."""
    from magicvideo.models.text import normalise

    rng = np.random.default_rng(3)
    two = 0
    for s in specs(500, seed=3, split="all"):
        text = world.caption(s, rng)
        words = normalise(text)
        pairs = world.object_word_positions(text, s)
        assert len(pairs) == len(s.objects)
        for (c, sh), o in zip(pairs, s.objects):
            assert words[c] in world.COLOUR_WORDS[o.colour] and words[sh] in world.SHAPE_WORDS[o.shape] and sh == c + 1
        assert [c for c, _ in pairs] == sorted(c for c, _ in pairs)
        two += len(pairs) == 2
    assert two > 100
    red_ball = world.ObjectSpec("red", "circle", "left", "slow", .3, .5, .1)
    blue_ball = world.ObjectSpec("blue", "circle", "right", "fast", .7, .5, .1)
    spec = world.ClipSpec((red_ball, blue_ball), background="red")
    assert world.object_word_positions("a red ball moving left and a blue ball moving right, on a red background",
                                       spec) == [(1, 2), (7, 8)]
    with pytest.raises(ValueError, match="no 'blue circle' in caption"):
        world.object_word_positions("a red ball moving left", spec)


def test_object_word_positions_with_motion_add_each_objects_motion_and_speed_words():
    """With ``motion``: after its colour and shape word, each object gets the words of its own
    motion phrase (not the joint, the articles, the other object's or the background's words,
    even where a motion phrase has an "and" of its own), and nothing but words from the
    world's motion and speed vocabulary."""
    from magicvideo.models.text import normalise

    bouncing = world.ObjectSpec("red", "circle", "bounce", "fast", .3, .5, .1)
    spinning = world.ObjectSpec("blue", "square", "rotate", None, .7, .5, .1)
    spec = world.ClipSpec((bouncing, spinning), background="blue")
    text = "two objects: a red ball bounces up and down quickly while a blue box spins, against a blue background"
    words = normalise(text)
    got = [[words[i] for i in pos] for pos in world.object_word_positions(text, spec, motion=True)]
    assert got == [["red", "ball", "bounces", "up", "down", "quickly"], ["blue", "box", "spins"]]
    motion_vocab = {w for group in (world.DIRECTION_WORDS, world.SPEED_WORDS) for options in group.values()
                    for phrase in options for w in phrase.split()}
    motion_vocab |= {w for verbs in world.MOVE_VERBS for v in verbs for w in v.split()}
    motion_vocab |= {w for options in world.MOTION_PHRASES.values() for pair in options for p in pair for w in p.split()}
    rng = np.random.default_rng(4)
    for s in specs(300, seed=4, split="all"):
        text = world.caption(s, rng)
        words = normalise(text)
        nouns = world.object_word_positions(text, s)
        full = world.object_word_positions(text, s, motion=True)
        assert [p[:2] for p in full] == nouns
        for pos in full:
            assert len(pos) > 2 and all(words[i] in motion_vocab for i in pos[2:]), (text, pos)
            assert all(w not in world.TEMPLATE_WORDS for w in (words[i] for i in pos[2:]))


def test_object_coverage_is_each_objects_rendered_area_per_cell():
    """Per object, per frame: the fraction of each cell it covers, summing to its rendered
    area; the cell under its centre mostly covered; an absent second object covers nothing;
    a size the grid does not divide is an error."""
    red = world.ObjectSpec("red", "circle", "right", "fast", .3, .4, .12)
    blue = world.ObjectSpec("blue", "square", "still", None, .75, .7, .1)
    clips = [world.ClipSpec((red, blue)), world.ClipSpec((red,))]
    cov = world.object_coverage(clips, 4, 64, 8)
    assert cov.shape == (2, 4, 2, 8, 8)
    frames = world.render_batch(clips, 4, 64)
    red_pixels = (frames[1] - torch.tensor(world.BACKGROUNDS["black"]) / 255).abs().sum(-1).gt(0.1)  # [F, H, W]
    area = cov[1, :, 0].sum((-1, -2)) * 64  # cells are 8 x 8 pixels
    assert torch.allclose(area, red_pixels.sum((-1, -2)).float(), rtol=0.1)
    x, y, _, _ = world.trajectory(red, 4)
    for f in range(4):
        assert cov[0, f, 0, int(y[f] * 8), int(x[f] * 8)] > 0.5
    assert cov[0, 0, 1, 5, 6] > 0.5  # the still square's centre cell
    assert cov[1, :, 1].sum() == 0 and torch.equal(cov[0, :, 0], cov[1, :, 0])
    with pytest.raises(ValueError, match="does not split into 7 x 7 cells"):
        world.object_coverage(clips, 4, 64, 7)


def test_spec_json_round_trip():
    for s in specs(20, seed=9, split="all"):
        assert world.ClipSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_shape_twin_changes_only_each_objects_shape():
    rng = np.random.default_rng(5)
    for _ in range(20):
        spec = world.sample_spec(rng)
        twin = world.shape_twin(spec, rng)
        assert len(twin.objects) == len(spec.objects) and twin.background == spec.background
        for a, b in zip(spec.objects, twin.objects):
            assert a.shape != b.shape and b.shape in world.SHAPES
            assert (a.colour, a.motion, a.x, a.y, a.radius, a.angle) == (b.colour, b.motion, b.x, b.y, b.radius, b.angle)
        # same place and colour: the frames differ only where the outlines differ
        diff = (world.render(spec, frames=2) - world.render(twin, frames=2)).abs().amax(-1)
        assert 0 < (diff > 0.1).float().mean() < 0.1


def test_two_object_prob_sets_the_share_of_two_object_clips_and_is_checked():
    rng = np.random.default_rng(5)
    share = {p: np.mean([len(world.sample_spec(rng, "train", p).objects) == 2 for _ in range(400)])
             for p in (0.0, 0.3, 0.6)}
    assert share[0.0] == 0.0
    # about a fifth of the second objects find no placement apart and are dropped
    assert 0.2 < share[0.3] < 0.3 and 0.4 < share[0.6] < 0.55
    with pytest.raises(ValueError, match="two_object_prob must be between 0 and 1, got 1.5"):
        world.sample_spec(rng, "train", 1.5)


def test_motion_weights_draw_those_motions_more_often_and_none_keeps_the_stream():
    def motions(weights, seed=9, n=600):
        rng = np.random.default_rng(seed)
        return [world.sample_spec(rng, "train", 0.0, weights).objects[0].motion for _ in range(n)]

    plain = motions(None)
    assert motions({}) == plain  # no weights: the very same clips as before the option existed
    heavy = motions({"rotate": 4.0, "grow": 4.0})
    share = {m: sum(x == m for x in heavy) / len(heavy) for m in ("rotate", "grow")}
    base = {m: sum(x == m for x in plain) / len(plain) for m in ("rotate", "grow")}
    for m in share:  # about 3x as often (4 / the weights' mean)
        assert share[m] > 2.2 * base[m], (m, share[m], base[m])
    assert "still" not in motions({"still": 0.0})
    with pytest.raises(ValueError, match=r"unknown motion\(s\) \['spin'\]"):
        world.sample_spec(np.random.default_rng(0), "train", 0.0, {"spin": 2.0})
    with pytest.raises(ValueError, match="weights must be 0 or more"):
        world.sample_spec(np.random.default_rng(0), "train", 0.0, {"grow": -1.0})


def test_lexicon_paths_are_the_worlds_trajectories():
    """A path read from the lexicon is the world's own trajectory of that motion and speed: centre
    x, y and log radius, less their means (no start place or size is asked for)."""
    from magicvideo.models import lexicon

    lex = world.lexicon()
    assert set(lex.paths) == set(world.MOTIONS)
    for motion in world.MOTIONS:
        for speed in (None,) if motion == "still" else world.SPEEDS:
            x, y, r, _ = world.trajectory(world.ObjectSpec("red", "circle", motion, speed, 0.5, 0.5, 0.1), 16)
            old = torch.tensor(np.stack([x, y, np.log(r)], -1), dtype=torch.float32)
            new = lexicon.path(lex.motion_params(motion, speed), 16)
            assert torch.allclose(new, old - old.mean(0), atol=1e-6), (motion, speed)
    # a motion named without a speed word takes the default (slow) speed; "still" has none
    assert lex.default_speed == "slow" and lex.unit_travel == world.LINEAR_TRAVEL["slow"]
    assert lex.motion_params("left", None) == lex.motion_params("left", "slow")
    assert lex.motion_params("still", "fast") == lex.motion_params("still", None)
    assert lex.motion_params(None, "fast") is None


def test_lexicon_and_text_fields_travel_as_plain_data():
    from magicvideo.models.lexicon import Lexicon

    lex = world.lexicon()
    data = json.loads(json.dumps(lex.to_dict()))
    assert Lexicon.from_dict(data) == lex
    fields = world.text_fields()
    assert fields["vocab"] == world.text_vocab() == sorted(set(world.text_vocab()))
    assert set(world.vocabulary()) <= set(fields["vocab"]) and {"a", "the", "with"} <= set(fields["vocab"])
    assert fields["lexicon"] == lex.to_dict()
    # every word the lexicon reads is one the encoder knows
    words = {w for table in (lex.colours, lex.shapes, lex.speeds) for w in table}
    words |= {w for phrase in lex.motions for w in phrase.split()}
    assert words <= set(fields["vocab"])
    # parse_caption is the lexicon's reading of the normalised caption
    caption = "two objects: a violet ball bouncing up and down quickly and a red box drifting left on a navy floor"
    objects = world.parse_caption(caption)
    assert [(o.colour, o.shape, o.motion, o.speed) for o in objects] == \
        [("purple", "circle", "bounce", "fast"), ("red", "square", "left", None)]
    assert objects == lex.parse(caption.lower().replace(":", " ").split())
