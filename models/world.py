"""The procedural world the bundled default learns: coloured shapes moving on muted backgrounds.

A clip is described by a `ClipSpec` (background + one or two `ObjectSpec`s). Specs are
sampled from a numpy Generator, so a seed fixes everything; clips are rendered on the
fly (vectorised signed-distance rasterisation in torch), so training needs no files.

    rng = np.random.default_rng(0)
    spec = sample_spec(rng)                      # ClipSpec
    frames = render(spec, frames=16, size=64)    # [F, H, W, 3] in 0..1
    text = caption(spec, rng)                    # "a red ball drifting to the left slowly"
    videos, captions, specs = batch(0, 64)       # [B, F, 3, H, W] in -1..1 for the trainer

Units. Positions and radii are fractions of the frame side, so one spec renders at any
size. Motion is defined over clip time 0..1, not per frame: a spec is one clip's worth of
motion, and rendering it with more frames samples the same motion more densely (so a
16-frame clip and its 61-frame rendering are keyframes and ground-truth in-betweens for
the frame interpolator, and the evaluator's speed buckets hold at any frame count).
Objects are placed so the whole path stays inside the frame.

Held-out combinations. `HELDOUT_TRIPLES` lists (colour, shape, motion) triples that
split="train" never produces and split="heldout" produces exclusively; every colour,
shape and motion, and every pair of them, still appears in training, so the held-out
scores measure composition rather than unseen words.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .lexicon import CaptionObject, Lexicon
from .text import FUNCTION_WORDS, normalise

REFERENCE_FRAMES = 16
REFERENCE_SIZE = 64

# Object colours: saturated and bright, far apart in RGB and far from every background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 225, 30),
    "green": (30, 180, 50),
    "cyan": (0, 210, 220),
    "blue": (30, 80, 235),
    "purple": (140, 50, 220),
    "pink": (255, 105, 190),
    "white": (240, 240, 240),
}
COLOURS = tuple(PALETTE)

# Backgrounds: dark, muted; textures are a faint +-TEXTURE_CONTRAST pattern on top.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 22),
    "charcoal": (48, 50, 56),
    "grey": (92, 92, 96),
    "navy": (22, 28, 64),
    "olive": (58, 60, 30),
    "brown": (70, 46, 30),
}
TEXTURES = ("plain", "checker", "stripes_h", "stripes_v", "stripes_d")
TEXTURE_CONTRAST = 10  # in 0..255 units

SHAPES = ("circle", "square", "triangle")
# Size of each shape relative to the spec radius r: chosen so the three have similar area.
SQUARE_HALF_SIDE = 0.9  # half side = 0.9 r
TRIANGLE_CIRCUMRADIUS = 1.3  # circumradius = 1.3 r
EXTENT = {"circle": 1.0, "square": SQUARE_HALF_SIDE * math.sqrt(2), "triangle": TRIANGLE_CIRCUMRADIUS}

DIRECTIONS: dict[str, tuple[float, float]] = {  # unit (dx, dy), y pointing down as in images
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up_left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "up_right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "down_left": (-math.sqrt(0.5), math.sqrt(0.5)),
    "down_right": (math.sqrt(0.5), math.sqrt(0.5)),
}
MOTIONS = tuple(DIRECTIONS) + ("bounce", "grow", "shrink", "rotate", "still")
SPEEDS = ("slow", "fast")

# Amounts of motion per clip. Linear travel is a fraction of the frame side: at 64 px a
# slow object travels ~17 px, a fast one ~33 px, far enough apart for the evaluator to tell
# them apart exactly; the other motions keep the same 1:2 ratio.
LINEAR_TRAVEL = {"slow": 0.26, "fast": 0.52}
BOUNCE_HEIGHT = 0.3
BOUNCE_HOPS = {"slow": 1, "fast": 2}
SCALE_FACTOR = {"slow": 1.45, "fast": 2.1}  # radius end / start (or start / end when shrinking)
SPIN = {"slow": math.radians(45), "fast": math.radians(90)}

# Radii (fractions of the side) by motion: ~8-10.5 px at 64 for most, growers start small.
RADIUS_RANGE = {"grow": (0.085, 0.11), "shrink": (0.17, 0.22), "rotate": (0.14, 0.17)}
DEFAULT_RADIUS_RANGE = (0.125, 0.165)


def _motion_allowed(shape: str, motion: str) -> bool:
    return not (shape == "circle" and motion == "rotate")  # a spinning circle looks still


ALL_TRIPLES = tuple(
    (c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS if _motion_allowed(s, m)
)

# Chosen once by `_choose_heldout(seed=7, fraction=0.1)` and frozen here so the split never
# changes under a numpy upgrade; tests check coverage of every single value and every pair.
HELDOUT_TRIPLES: tuple[tuple[str, str, str], ...] = (
    ('blue', 'circle', 'down'),
    ('blue', 'circle', 'up'),
    ('blue', 'circle', 'up_right'),
    ('blue', 'triangle', 'up'),
    ('cyan', 'square', 'down'),
    ('cyan', 'square', 'shrink'),
    ('cyan', 'square', 'up'),
    ('cyan', 'triangle', 'down_left'),
    ('green', 'circle', 'grow'),
    ('green', 'circle', 'still'),
    ('green', 'square', 'down_left'),
    ('green', 'triangle', 'up_right'),
    ('orange', 'circle', 'down'),
    ('orange', 'circle', 'still'),
    ('orange', 'square', 'down_right'),
    ('orange', 'triangle', 'down_left'),
    ('pink', 'circle', 'grow'),
    ('pink', 'circle', 'up_left'),
    ('pink', 'square', 'up_left'),
    ('pink', 'triangle', 'rotate'),
    ('purple', 'square', 'bounce'),
    ('purple', 'square', 'down_right'),
    ('purple', 'triangle', 'left'),
    ('red', 'circle', 'down_right'),
    ('red', 'triangle', 'left'),
    ('red', 'triangle', 'up_left'),
    ('white', 'square', 'left'),
    ('white', 'square', 'right'),
    ('white', 'triangle', 'bounce'),
    ('white', 'triangle', 'up_right'),
    ('yellow', 'circle', 'right'),
    ('yellow', 'square', 'rotate'),
    ('yellow', 'square', 'shrink'),
    ('yellow', 'triangle', 'right'),
)
_HELDOUT_SET = frozenset(HELDOUT_TRIPLES)
TRAIN_TRIPLES = tuple(t for t in ALL_TRIPLES if t not in _HELDOUT_SET)
SPLITS = ("train", "heldout", "all")


def _choose_heldout(seed: int = 7, fraction: float = 0.1) -> tuple[tuple[str, str, str], ...]:
    """How HELDOUT_TRIPLES was picked: visit motions round-robin; for each take, in a seeded
    shuffle, the triple whose colour and shape are held out least so far, among those whose
    three pairs (colour-shape, colour-motion, shape-motion) each keep a training triple."""
    rng = np.random.default_rng(seed)
    shuffled = [ALL_TRIPLES[i] for i in rng.permutation(len(ALL_TRIPLES))]
    target = round(fraction * len(ALL_TRIPLES))
    pair_count: dict[tuple, int] = {}
    for t in ALL_TRIPLES:
        for p in _pairs(t):
            pair_count[p] = pair_count.get(p, 0) + 1
    chosen: list[tuple[str, str, str]] = []
    for motion in itertools.cycle(MOTIONS):
        if len(chosen) == target:
            break
        ok = [t for t in shuffled if t[2] == motion and t not in chosen and all(pair_count[p] > 1 for p in _pairs(t))]
        if not ok:
            continue
        used = lambda t: (sum(c[0] == t[0] for c in chosen), sum(c[1] == t[1] for c in chosen))  # noqa: E731
        t = min(ok, key=used)
        chosen.append(t)
        for p in _pairs(t):
            pair_count[p] -= 1
    return tuple(sorted(chosen))


def _pairs(t: tuple[str, str, str]) -> tuple[tuple, ...]:
    c, s, m = t
    return (("cs", c, s), ("cm", c, m), ("sm", s, m))


# ---------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str
    motion: str
    speed: str | None  # None for "still"
    x: float  # start centre, fraction of the width
    y: float  # start centre (floor for "bounce"), fraction of the height
    radius: float  # start radius r, fraction of the side
    angle: float = 0.0  # start orientation, radians
    spin: int = 1  # +1 / -1: rotation sense for "rotate"

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.motion)


@dataclass(frozen=True)
class ClipSpec:
    objects: tuple[ObjectSpec, ...]
    background: str = "black"
    texture: str = "plain"
    texture_scale: float = 0.125  # checker cell / stripe width, fraction of the side

    @property
    def heldout(self) -> bool:
        return any(o.triple in _HELDOUT_SET for o in self.objects)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClipSpec":
        d = dict(d)
        d["objects"] = tuple(ObjectSpec(**o) for o in d["objects"])
        return cls(**d)


def is_heldout(colour: str, shape: str, motion: str) -> bool:
    return (colour, shape, motion) in _HELDOUT_SET


def _radius_range(motion: str) -> tuple[float, float]:
    return RADIUS_RANGE.get(motion, DEFAULT_RADIUS_RANGE)


def trajectory(obj: ObjectSpec, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centre x, centre y, radius, angle at `frames` evenly spaced clip times ([frames] each;
    fractions of the side / radians)."""
    tau = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    x = np.full(frames, obj.x)
    y = np.full(frames, obj.y)
    r = np.full(frames, obj.radius)
    a = np.full(frames, obj.angle)
    if obj.motion in DIRECTIONS:
        dx, dy = DIRECTIONS[obj.motion]
        x = obj.x + dx * LINEAR_TRAVEL[obj.speed] * tau
        y = obj.y + dy * LINEAR_TRAVEL[obj.speed] * tau
    elif obj.motion == "bounce":  # a ball hopping off the floor at y
        y = obj.y - BOUNCE_HEIGHT * np.abs(np.sin(np.pi * BOUNCE_HOPS[obj.speed] * tau))
    elif obj.motion in ("grow", "shrink"):
        sign = 1.0 if obj.motion == "grow" else -1.0
        r = obj.radius * SCALE_FACTOR[obj.speed] ** (sign * tau)
    elif obj.motion == "rotate":
        a = obj.angle + obj.spin * SPIN[obj.speed] * tau
    return x, y, r, a


def place_object(rng: np.random.Generator, colour: str, shape: str, motion: str) -> ObjectSpec:
    """One object of the given colour, shape and motion at a random speed, size and start
    position that keep its whole path inside the frame."""
    speed = None if motion == "still" else SPEEDS[rng.integers(len(SPEEDS))]
    r = float(rng.uniform(*_radius_range(motion)))
    r_max = r * SCALE_FACTOR[speed] if motion == "grow" else r
    ext = EXTENT[shape] * r_max
    lo_x, hi_x = lo_y, hi_y = ext, 1 - ext
    if motion in DIRECTIONS:  # keep the whole path inside the frame
        dx, dy = DIRECTIONS[motion]
        lo_x, hi_x = lo_x + max(0.0, -dx * LINEAR_TRAVEL[speed]), hi_x - max(0.0, dx * LINEAR_TRAVEL[speed])
        lo_y, hi_y = lo_y + max(0.0, -dy * LINEAR_TRAVEL[speed]), hi_y - max(0.0, dy * LINEAR_TRAVEL[speed])
    elif motion == "bounce":
        lo_y = ext + BOUNCE_HEIGHT
    x = float(rng.uniform(lo_x, hi_x))
    y = float(rng.uniform(lo_y, hi_y))
    # rotating shapes start at a random angle; the others stand upright (square axis-aligned,
    # triangle pointing up) so shape words map to one look
    angle = float(rng.uniform(0, 2 * math.pi)) if motion == "rotate" else 0.0
    spin = int(rng.choice([-1, 1]))
    return ObjectSpec(colour, shape, motion, speed, x, y, r, angle, spin)


def _apart(a: ObjectSpec, b: ObjectSpec, gap: float = 3 / 64, samples: int = 33) -> bool:
    """True if the two objects never come within `gap` of touching during the clip."""
    ax, ay, ar, _ = trajectory(a, samples)
    bx, by, br, _ = trajectory(b, samples)
    d = np.sqrt((ax - bx) ** 2 + (ay - by) ** 2).min()
    return d >= EXTENT[a.shape] * ar.max() + EXTENT[b.shape] * br.max() + gap


def split_triples(split: str) -> tuple[tuple[str, str, str], ...]:
    if split == "train":
        return TRAIN_TRIPLES
    if split == "heldout":
        return HELDOUT_TRIPLES
    if split == "all":
        return ALL_TRIPLES
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


TWO_OBJECT_PROB = 0.3  # share of clips that ask for a second object


def motion_probs(triples, motion_weights: dict[str, float] | None) -> np.ndarray | None:
    """Sampling probabilities of ``triples`` with each motion weighted (1 where unnamed);
    None for uniform. ValueError for an unknown motion or a negative weight."""
    if not motion_weights:
        return None
    unknown = sorted(set(motion_weights) - set(MOTIONS))
    if unknown:
        raise ValueError(f"motion_weights: unknown motion(s) {unknown}; expected some of {list(MOTIONS)}")
    if any(not w >= 0 for w in motion_weights.values()):
        raise ValueError(f"motion_weights: weights must be 0 or more, got {motion_weights!r}")
    w = np.array([float(motion_weights.get(t[2], 1.0)) for t in triples])
    if w.sum() <= 0:
        raise ValueError(f"motion_weights: every motion of the split has weight 0 ({motion_weights!r})")
    return w / w.sum()


def _draw(rng: np.random.Generator, triples, motion_weights: dict[str, float] | None):
    probs = motion_probs(triples, motion_weights)
    return triples[rng.integers(len(triples)) if probs is None else rng.choice(len(triples), p=probs)]


def sample_spec(
    rng: np.random.Generator,
    split: str = "train",
    two_object_prob: float = TWO_OBJECT_PROB,
    motion_weights: dict[str, float] | None = None,
) -> ClipSpec:
    """A random clip. split="train" never uses a held-out triple; "heldout" uses only them
    (both objects of a two-object clip); "all" uses everything. ``two_object_prob`` is the
    chance of asking for a second object (it is dropped when no apart placement is found).
    ``motion_weights`` (e.g. {"rotate": 3}) draws the triples of those motions that many
    times as often as the others (weight 1); None draws all triples alike."""
    if not 0.0 <= two_object_prob <= 1.0:
        raise ValueError(f"two_object_prob must be between 0 and 1, got {two_object_prob!r}")
    triples = split_triples(split)
    first = _draw(rng, triples, motion_weights)
    objects = [place_object(rng, *first)]
    if rng.random() < two_object_prob:
        others = [t for t in triples if t[0] != first[0]]  # distinct colours tell them apart
        for attempt in range(60):
            if attempt % 10 == 0:
                second = _draw(rng, others, motion_weights)
            cand = place_object(rng, *second)
            if _apart(objects[0], cand):
                objects.append(cand)
                break
    background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    texture = TEXTURES[rng.integers(len(TEXTURES))] if rng.random() < 0.5 else "plain"
    scale = float(rng.choice([0.0625, 0.125, 0.25]))
    return ClipSpec(tuple(objects), background, texture, scale)


# ---------------------------------------------------------------------------------------
# Captions

SHAPE_WORDS = {
    "circle": ("circle", "ball", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
}
COLOUR_WORDS = {c: (c,) for c in COLOURS} | {"purple": ("purple", "violet")}
BACKGROUND_WORDS = {b: (b,) for b in BACKGROUNDS} | {"grey": ("grey", "gray"), "charcoal": ("charcoal", "dark grey")}
TEXTURE_WORDS = {
    "plain": ("plain", ""),
    "checker": ("checkered", "checkerboard"),
    "stripes_h": ("striped", "horizontally striped"),
    "stripes_v": ("striped", "vertically striped"),
    "stripes_d": ("striped", "diagonally striped"),
}
DIRECTION_WORDS = {
    "left": ("left", "to the left", "leftward"),
    "right": ("right", "to the right", "rightward"),
    "up": ("up", "upward", "upwards"),
    "down": ("down", "downward", "downwards"),
    "up_left": ("diagonally up and to the left", "up and left", "toward the top left"),
    "up_right": ("diagonally up and to the right", "up and right", "toward the top right"),
    "down_left": ("diagonally down and to the left", "down and left", "toward the bottom left"),
    "down_right": ("diagonally down and to the right", "down and right", "toward the bottom right"),
}
MOVE_VERBS = (  # (-ing form, third person)
    ("moving", "moves"),
    ("drifting", "drifts"),
    ("sliding", "slides"),
    ("gliding", "glides"),
    ("going", "goes"),
    ("traveling", "travels"),
)
# motion -> list of (-ing phrase, third-person phrase); linear motions are built from verbs
MOTION_PHRASES = {
    "bounce": (("bouncing", "bounces"), ("bouncing up and down", "bounces up and down"), ("hopping", "hops")),
    "grow": (("growing", "grows"), ("getting bigger", "gets bigger"), ("expanding", "expands"), ("growing larger", "grows larger")),
    "shrink": (("shrinking", "shrinks"), ("getting smaller", "gets smaller"), ("contracting", "contracts")),
    "rotate": (("rotating", "rotates"), ("spinning", "spins"), ("turning in place", "turns in place")),
    "still": (("staying still", "stays still"), ("sitting still", "sits still"), ("not moving", "does not move"), ("resting", "rests")),
}
SPEED_WORDS = {"slow": ("slowly", "gently"), "fast": ("quickly", "fast", "rapidly", "swiftly")}
TEMPLATE_WORDS = "a an the is two objects and while on against over background".split()
_BACKGROUND_PREPOSITIONS = ("on", "against", "over")  # open a caption's background clause


def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _motion_phrase(rng: np.random.Generator, obj: ObjectSpec, third_person: bool) -> str:
    form = 1 if third_person else 0
    if obj.motion in DIRECTIONS:
        verb = _pick(rng, MOVE_VERBS)[form]
        where = _pick(rng, DIRECTION_WORDS[obj.motion])
        adverb = _pick(rng, SPEED_WORDS[obj.speed])
        order = rng.integers(3)
        if order == 0:
            return f"{verb} {where} {adverb}"
        if order == 1:
            return f"{verb} {adverb} {where}"
        return f"{adverb} {verb} {where}" if not third_person else f"{verb} {where} {adverb}"
    phrase = _pick(rng, MOTION_PHRASES[obj.motion])[form]
    if obj.speed is None:
        return phrase
    return f"{phrase} {_pick(rng, SPEED_WORDS[obj.speed])}"


def _object_phrase(rng: np.random.Generator, obj: ObjectSpec, third_person: bool) -> str:
    noun = f"{_pick(rng, COLOUR_WORDS[obj.colour])} {_pick(rng, SHAPE_WORDS[obj.shape])}"
    return f"{noun} {_motion_phrase(rng, obj, third_person)}"


def _with_article(phrase: str, bare: bool) -> str:
    if bare:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(spec: ClipSpec, rng: np.random.Generator) -> str:
    """A caption from templates with synonyms, e.g. "a red ball drifting to the left slowly",
    "red circle moves left slowly", "two objects: a red ball moving up and a blue box spinning"."""
    third = bool(rng.integers(2))
    bare = third and rng.random() < 0.5  # "red circle moves left slowly"
    phrases = [_with_article(_object_phrase(rng, o, third), bare) for o in spec.objects]
    if len(phrases) == 1:
        text = phrases[0]
    else:
        joint = _pick(rng, (" and ", " while ")) if third else " and "
        text = joint.join(phrases)
        if rng.random() < 0.5:
            text = "two objects: " + text
    if rng.random() < 0.5:
        tex = _pick(rng, TEXTURE_WORDS[spec.texture])
        bg = _pick(rng, BACKGROUND_WORDS[spec.background])
        prep = _pick(rng, _BACKGROUND_PREPOSITIONS)
        text += f", {prep} " + _with_article(f"{tex + ' ' if tex else ''}{bg} background", False)
    return text


def _caption_words(caption_text: str) -> list[str]:
    return normalise(caption_text)


def _object_tail(words: list[str], shape: int, end: int) -> list[int]:
    """Indices of an object's motion and speed words: after its shape word (index ``shape``),
    up to ``end`` (the next object's colour word) or the background clause, less the template's
    function words."""
    rest = []
    for i in range(shape + 1, end):
        if words[i] in _BACKGROUND_PREPOSITIONS:
            break
        if words[i] not in TEMPLATE_WORDS:
            rest.append(i)
    return rest


def object_word_positions(caption_text: str, spec: ClipSpec, motion: bool = False) -> list[tuple[int, ...]]:
    """Word indices (in ``text.normalise`` order) of each object's colour word and shape word,
    in the order of ``spec.objects``: the words that object's pixels should attend to.
    Objects are named in order as "<colour> <shape>", which nothing else in a caption is.

    With ``motion`` each tuple goes on with the object's motion and speed words: those after
    its shape word, up to the next object's colour word or the background clause ("on",
    "against", "over"), less the template's function words ("and", "the", ...)."""
    words = _caption_words(caption_text)
    nouns, start = [], 0
    for obj in spec.objects:
        for i in range(start, len(words) - 1):
            if words[i] in COLOUR_WORDS[obj.colour] and words[i + 1] in SHAPE_WORDS[obj.shape]:
                nouns.append((i, i + 1))
                start = i + 2
                break
        else:
            raise ValueError(f"no '{obj.colour} {obj.shape}' in caption {caption_text!r}")
    if not motion:
        return nouns
    ends = [n[0] for n in nouns[1:]] + [len(words)]
    return [(colour, shape, *_object_tail(words, shape, end)) for (colour, shape), end in zip(nouns, ends)]


@functools.lru_cache(maxsize=1)
def lexicon() -> Lexicon:
    """The world's captions as word tables and motion paths: what motion guidance needs to read a
    prompt, stored with the text encoder in every model file trained on the world."""
    travel = {d: {s: {"dx": dx * LINEAR_TRAVEL[s], "dy": dy * LINEAR_TRAVEL[s]} for s in SPEEDS}
              for d, (dx, dy) in DIRECTIONS.items()}
    paths = {m: {s: {"dx": 0.0, "dy": 0.0, "bounce": 0.0, "hops": 0.0, "log_scale": 0.0, **travel.get(m, {}).get(s, {})}
                 for s in (SPEEDS if m != "still" else ("none",))} for m in MOTIONS}
    for s in SPEEDS:
        paths["bounce"][s].update(bounce=BOUNCE_HEIGHT, hops=float(BOUNCE_HOPS[s]))
        paths["grow"][s]["log_scale"] = math.log(SCALE_FACTOR[s])
        paths["shrink"][s]["log_scale"] = -math.log(SCALE_FACTOR[s])
    motions = {ph: m for m, forms in MOTION_PHRASES.items() for pair in forms for ph in pair}
    motions |= {ph: m for m, options in DIRECTION_WORDS.items() for ph in options}
    word_of = [{w: name for name, options in table.items() for w in options}
               for table in (COLOUR_WORDS, SHAPE_WORDS, SPEED_WORDS)]
    return Lexicon(colours=word_of[0], shapes=word_of[1], speeds=word_of[2], motions=motions, paths=paths,
                   default_speed="slow", unit_travel=LINEAR_TRAVEL["slow"], stop_words=list(TEMPLATE_WORDS),
                   clause_words=list(_BACKGROUND_PREPOSITIONS))


def text_vocab() -> list[str]:
    """The built-in text encoder's vocabulary for the world: every caption word plus a few
    function words users naturally add (sorted)."""
    return sorted(set(vocabulary()) | set(FUNCTION_WORDS))


def text_fields() -> dict:
    """The ``TextConfig`` fields a text encoder trained on the world needs: its vocabulary and lexicon."""
    return {"vocab": text_vocab(), "lexicon": lexicon().to_dict()}


def parse_caption(caption_text: str) -> list[CaptionObject]:
    """The objects a caption in the world's words names, in order (``Lexicon.parse``): colour,
    shape, motion (None when not named) and speed, and the indices of their words."""
    return lexicon().parse(_caption_words(caption_text))


def vocabulary() -> list[str]:
    """Every word a caption can contain (lowercase, no punctuation), sorted."""
    texts = list(TEMPLATE_WORDS)
    for group in (SHAPE_WORDS, COLOUR_WORDS, BACKGROUND_WORDS, TEXTURE_WORDS, DIRECTION_WORDS, SPEED_WORDS):
        for options in group.values():
            texts.extend(options)
    texts.extend(itertools.chain.from_iterable(MOVE_VERBS))
    for options in MOTION_PHRASES.values():
        texts.extend(itertools.chain.from_iterable(options))
    return sorted({w for text in texts for w in text.split()})


# ---------------------------------------------------------------------------------------
# Rendering

_TEXTURE_ID = {t: i for i, t in enumerate(TEXTURES)}


def _background(specs: list[ClipSpec], size: int) -> torch.Tensor:
    """[B, H, W, 3] in 0..1."""
    base = torch.tensor([BACKGROUNDS[s.background] for s in specs], dtype=torch.float32) / 255
    kind = torch.tensor([_TEXTURE_ID[s.texture] for s in specs])
    cell = torch.tensor([max(1.0, s.texture_scale * size) for s in specs])[:, None, None]
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    cx = torch.floor(xx / cell)
    cy = torch.floor(yy / cell)
    patterns = torch.stack(
        [
            torch.zeros_like(cx),  # plain
            torch.remainder(cx + cy, 2) * 2 - 1,  # checker
            torch.remainder(cy, 2) * 2 - 1,  # horizontal stripes
            torch.remainder(cx, 2) * 2 - 1,  # vertical stripes
            torch.remainder(torch.floor((xx + yy) / cell), 2) * 2 - 1,  # diagonal stripes
        ]
    )  # [5, B, H, W]
    pattern = patterns[kind, torch.arange(len(specs))]
    return (base[:, None, None, :] + pattern[..., None] * (TEXTURE_CONTRAST / 255)).clamp(0, 1)


def _sdf(shape: str, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, angle: torch.Tensor, size: int) -> torch.Tensor:
    """Signed distance in pixels [N, F, H, W] (negative inside) of one shape per clip;
    cx, cy, r, angle [N, F] in pixels / radians."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = coords[None, None, None, :] - cx[..., None, None]  # [N, F, 1, W]
    dy = coords[None, None, :, None] - cy[..., None, None]  # [N, F, H, 1]
    r = r[..., None, None]
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - r
    cos, sin = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    u = cos * dx + sin * dy  # object frame: rotate the pixel grid by -angle
    v = -sin * dx + cos * dy
    if shape == "square":
        h = SQUARE_HALF_SIDE * r
        qx, qy = u.abs() - h, v.abs() - h
        return torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)
    # equilateral triangle, apex up (image y points down, so flip v), centred on its centroid
    half = TRIANGLE_CIRCUMRADIUS * r * (math.sqrt(3) / 2)
    k = math.sqrt(3)
    px = u.abs() - half
    py = half / k - v
    fold = (px + k * py) > 0
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - torch.maximum(px.clamp(max=0), -2 * half)
    return -torch.sqrt(px * px + py * py) * torch.sign(py)


def render_batch(specs: list[ClipSpec], frames: int = REFERENCE_FRAMES, size: int = REFERENCE_SIZE) -> torch.Tensor:
    """Render clips: float [B, F, H, W, 3] in 0..1."""
    b = len(specs)
    video = _background(specs, size)[:, None].expand(b, frames, size, size, 3).clone()
    for _, idx, objs, alpha in _object_alphas(specs, frames, size):
        colour = torch.tensor([PALETTE[o.colour] for o in objs], dtype=torch.float32)[:, None, None, None] / 255
        under = video[idx]
        video[idx] = torch.lerp(under, colour.expand_as(under), alpha[..., None])
    return video


def _object_alphas(specs: list[ClipSpec], frames: int, size: int):
    """Per object slot and shape, in drawing order: (slot, clip indices, objects, coverage
    [N, F, H, W] in 0..1 with a 1 px anti-aliased edge). One shape at a time, so each clip
    pays for its own shape only."""
    for slot in range(max(len(s.objects) for s in specs)):
        for shape in SHAPES:
            idx = [i for i, s in enumerate(specs) if slot < len(s.objects) and s.objects[slot].shape == shape]
            if not idx:
                continue
            objs = [specs[i].objects[slot] for i in idx]
            tracks = torch.from_numpy(np.stack([np.stack(trajectory(o, frames)) for o in objs])).float()  # [N, 4, F]
            sdf = _sdf(shape, tracks[:, 0] * size, tracks[:, 1] * size, tracks[:, 2] * size, tracks[:, 3], size)
            yield slot, torch.tensor(idx), objs, (0.5 - sdf).clamp_(0, 1)


def object_coverage(specs: list[ClipSpec], frames: int, size: int, cells: int) -> torch.Tensor:
    """Where each object is: [B, F, MAX_OBJECTS, cells, cells], the fraction of each cell of a
    ``cells`` x ``cells`` grid (e.g. the latent grid) that the object covers (as rendered at
    ``size``, anti-aliased edge included); zero for an absent second object. Training aid for
    ``unet.binding_weight``."""
    if size % cells:
        raise ValueError(f"a {size}-pixel clip does not split into {cells} x {cells} cells")
    if any(len(s.objects) > MAX_OBJECTS for s in specs):
        raise ValueError(f"object coverage holds at most {MAX_OBJECTS} objects per clip")
    out = torch.zeros(len(specs), frames, MAX_OBJECTS, size, size)
    for slot, idx, _, alpha in _object_alphas(specs, frames, size):
        out[idx, :, slot] = alpha
    k = size // cells
    return out.view(len(specs), frames, MAX_OBJECTS, cells, k, cells, k).mean(dim=(4, 6))


def render(spec: ClipSpec, frames: int = REFERENCE_FRAMES, size: int = REFERENCE_SIZE) -> torch.Tensor:
    """Render one clip: float [F, H, W, 3] in 0..1 (the host's IMAGE layout)."""
    return render_batch([spec], frames, size)[0]


def shape_twin(spec: ClipSpec, rng: np.random.Generator) -> ClipSpec:
    """The same clip with every object's shape swapped for another of the world's shapes
    (same colour, path, size, angle). Training aid for ``vae.separation_weight``: the VAE
    learns to keep such twins apart in latent space."""
    objects = tuple(dataclasses.replace(o, shape=str(rng.choice([s for s in SHAPES if s != o.shape])))
                    for o in spec.objects)
    return dataclasses.replace(spec, objects=objects)


# Training aid (``unet.text_aux_weight``): each object's attributes as class indices, in the
# order the caption names the objects, so a probe can read them back from the text encoder.
ATTRIBUTE_CLASSES = {"colour": COLOURS, "shape": SHAPES, "motion": MOTIONS, "speed": SPEEDS}
MAX_OBJECTS = 2
IGNORE_LABEL = -100  # torch's cross-entropy ignore_index: an absent object, a still object's speed


def attribute_labels(spec: ClipSpec) -> list[int]:
    """[MAX_OBJECTS * 4] ints: colour, shape, motion, speed index of object 1, then object 2."""
    if len(spec.objects) > MAX_OBJECTS:
        raise ValueError(f"a clip has {len(spec.objects)} objects; labels cover at most {MAX_OBJECTS}")
    out = []
    for i in range(MAX_OBJECTS):
        obj = spec.objects[i] if i < len(spec.objects) else None
        for name, classes in ATTRIBUTE_CLASSES.items():
            value = getattr(obj, name) if obj is not None else None
            out.append(classes.index(value) if value is not None else IGNORE_LABEL)
    return out


def batch(
    seed_or_rng: int | np.random.Generator,
    batch_size: int,
    frames: int = REFERENCE_FRAMES,
    size: int = REFERENCE_SIZE,
    split: str = "train",
    two_object_prob: float = TWO_OBJECT_PROB,
    motion_weights: dict[str, float] | None = None,
) -> tuple[torch.Tensor, list[str], list[ClipSpec]]:
    """A training batch: videos [B, F, 3, H, W] in -1..1, captions, specs.
    Pass one Generator and call repeatedly for a stream; an int seed gives a fixed batch."""
    rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)
    specs = [sample_spec(rng, split, two_object_prob, motion_weights) for _ in range(batch_size)]
    captions = [caption(s, rng) for s in specs]
    videos = render_batch(specs, frames, size).permute(0, 1, 4, 2, 3) * 2 - 1
    return videos.contiguous(), captions, specs
