"""What a prompt asks of each object, read with word tables that travel in the model file.

Motion guidance needs to know, from a prompt alone, which words name each object and what
path its motion words ask for. A :class:`Lexicon` holds exactly that as plain data (word ->
colour, shape, speed; phrase -> motion; motion and speed -> path parameters), stored with the
built-in text encoder (``TextConfig.lexicon``), so the library reads prompts without knowing
the world the model was trained on. The procedural world builds its own (``world.lexicon()``);
a text encoder trained on other captions carries another, or none (then nothing is steered).

A path is the centre's travel over the clip and the log of the object's size, each less its
mean over frames (no start place or size is asked for). Every motion is one formula at clip
time ``tau`` in 0..1::

    x = dx * tau
    y = dy * tau - bounce * |sin(pi * hops * tau)|
    log r = log_scale * tau

(a still or rotating object keeps all three constant).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

PATH_FIELDS = ("dx", "dy", "bounce", "hops", "log_scale")


@dataclass(frozen=True)
class CaptionObject:
    """One object a caption names: its attributes (None where the caption does not say) and the
    indices of its words (``text.normalise`` order: colour, shape, then motion and speed words)."""

    colour: str
    shape: str
    motion: str | None
    speed: str | None
    words: tuple[int, ...]


@dataclass
class Lexicon:
    """Word tables for reading prompts; see the module docstring.

    ``paths[motion][speed]`` are the :data:`PATH_FIELDS` of that motion at that speed (speed
    ``"none"`` for motions that have none). ``default_speed``: for a motion named without a
    speed word. ``unit_travel``: the travel the guidance loss counts as 1. ``stop_words``: the
    caption's function words, skipped between an object's shape word and its motion words;
    ``clause_words`` end an object's words (the background clause: "on", "against", ...).
    """

    colours: dict[str, str]
    shapes: dict[str, str]
    speeds: dict[str, str]
    motions: dict[str, str]  # phrase (space-separated words) -> motion
    paths: dict[str, dict[str, dict[str, float]]]
    default_speed: str
    unit_travel: float
    stop_words: list[str] = field(default_factory=list)
    clause_words: list[str] = field(default_factory=list)

    def __post_init__(self):
        for motion, by_speed in self.paths.items():
            for speed, p in by_speed.items():
                if set(p) != set(PATH_FIELDS):
                    raise ValueError(f"lexicon path {motion}/{speed} must have the fields {PATH_FIELDS}, got {sorted(p)}")
        unknown = sorted(set(self.motions.values()) - set(self.paths))
        if unknown:
            raise ValueError(f"lexicon phrases name motions without a path: {unknown}")
        # (phrase as words, motion), longest first: "bouncing up and down" before "up"
        self._phrases = sorted(((tuple(p.split()), m) for p, m in self.motions.items()), key=lambda item: -len(item[0]))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("colours", "shapes", "speeds", "motions", "paths", "default_speed",
                                              "unit_travel", "stop_words", "clause_words")}

    @classmethod
    def from_dict(cls, d: dict) -> "Lexicon":
        return cls(**d)

    def _tail(self, words: list[str], shape: int, end: int) -> list[int]:
        """Indices of an object's motion and speed words: after its shape word, up to ``end`` (the
        next object) or the clause words, less the stop words."""
        rest = []
        for i in range(shape + 1, end):
            if words[i] in self.clause_words:
                break
            if words[i] not in self.stop_words:
                rest.append(i)
        return rest

    def parse(self, words: list[str]) -> list[CaptionObject]:
        """The objects normalised prompt ``words`` name, in order: each "<colour> <shape>" pair
        starts one; its motion is the longest motion phrase among the words after it (up to the
        next object or the clause words), its speed the speed word there. Other words are
        skipped, so any prompt parses (to [] when it names no object)."""
        nouns = [i for i in range(len(words) - 1) if words[i] in self.colours and words[i + 1] in self.shapes]
        out = []
        for k, i in enumerate(nouns):
            end = nouns[k + 1] if k + 1 < len(nouns) else len(words)
            tail = self._tail(words, i + 1, end)
            clause = words[i + 2: tail[-1] + 1] if tail else []
            motion = next((m for ph, m in self._phrases
                           if any(tuple(clause[j: j + len(ph)]) == ph for j in range(len(clause)))), None)
            speed = next((self.speeds[w] for w in clause if w in self.speeds), None)
            out.append(CaptionObject(self.colours[words[i]], self.shapes[words[i + 1]], motion,
                                     None if "none" in self.paths.get(motion, {}) else speed, (i, i + 1, *tail)))
        return out

    def motion_params(self, motion: str | None, speed: str | None) -> dict[str, float] | None:
        """The :data:`PATH_FIELDS` a motion asks for at a speed (the default speed when none is
        named); None when no motion is named."""
        if motion is None:
            return None
        by_speed = self.paths[motion]
        return dict(by_speed.get("none") or by_speed[speed or self.default_speed])

    def read(self, words: list[str]) -> dict:
        """What normalised prompt ``words`` ask of each object, as plain data for motion guidance
        (it may travel in a CONDITIONING's dict): ``{"objects": [{"words": [...], "path": {...}}],
        "unit_travel": ...}``, with the word indices of each object that names a motion."""
        objects = [{"words": list(o.words), "path": self.motion_params(o.motion, o.speed)} for o in self.parse(words)]
        return {"objects": [o for o in objects if o["path"] is not None], "unit_travel": self.unit_travel}


def path(params: dict[str, float], frames: int) -> torch.Tensor:
    """The path ``[frames, 3]`` of :data:`PATH_FIELDS` ``params`` (centre x, y as fractions of the
    frame side, log radius), each less its mean over frames."""
    tau = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    x = params["dx"] * tau
    y = params["dy"] * tau - params["bounce"] * np.abs(np.sin(np.pi * params["hops"] * tau))
    log_r = params["log_scale"] * tau
    out = torch.tensor(np.stack([x, y, log_r], -1), dtype=torch.float32)
    return out - out.mean(0)
