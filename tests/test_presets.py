"""The main workflow's sampling settings are one preset, ``sampling.PRESETS["main"]``: the
workflow file runs it, and the Keyframe Sampler's defaults, the command line's and the
evaluator's are it."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from pathlib import Path

import pytest

from magicvideo.models import evaluate as ev
from magicvideo.models.sampling import PRESETS, SamplingOptions

REPO = Path(__file__).resolve().parents[1]
MAIN = PRESETS["main"]
MODEL_GENERATE_FN = ev.model_generate_fn  # before any test patches it
# the settings the workflow's Keyframe Sampler has as widgets (seed is per run; noise_sharing -1 = None)
COMPARED = ("steps", "cfg", "sampler", "scheduler", "fps", "denoise", "cfg_start", "cfg_end", "motion_guidance",
            "motion_guidance_until", "settings")
# the Keyframe Sampler's widgets in the order the UI saves them (control_after_generate follows seed)
WIDGETS = ["seed", "control_after_generate", "steps", "cfg", "sampler", "scheduler", "fps", "denoise", "frames",
           "noise_sharing", "cfg_start", "cfg_end", "motion_guidance", "motion_guidance_until", "settings"]


def _preset(options: SamplingOptions) -> dict:
    return {k: getattr(options, k) for k in COMPARED}


def _workflow_widgets() -> dict:
    workflow = json.loads((REPO / "workflows" / "text_to_video.json").read_text())
    values = next(n for n in workflow["nodes"] if n["type"] == "MagicVideoKeyframeSampler")["widgets_values"]
    return dict(zip(WIDGETS, values, strict=True))


def test_the_presets():
    assert SamplingOptions() == MAIN and MAIN.check() is MAIN
    assert (MAIN.steps, MAIN.cfg, MAIN.cfg_end, MAIN.sampler, MAIN.motion_guidance) == (20, 6.0, 0.7, "euler", 0.2)
    assert PRESETS["plain"].check() and PRESETS["plain"].motion_guidance == 0 and PRESETS["plain"].cfg_end == 1.0
    assert all(o.guided(0.0) for o in PRESETS.values()) and not MAIN.guided(0.8) and PRESETS["plain"].guided(1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        MAIN.steps = 3  # shared by every caller's defaults: nobody may change it in place


def test_the_main_workflow_runs_the_main_preset():
    widgets = _workflow_widgets()
    assert {k: widgets[k] for k in COMPARED} == _preset(MAIN)
    assert widgets["noise_sharing"] == -1 and MAIN.noise_sharing is None  # both: the model's own
    assert widgets["frames"] == 0  # the latent's own frame count


def test_the_command_lines_defaults_are_the_main_preset():
    from magicvideo.cli import build_parser

    args = build_parser().parse_args(["generate"])
    assert SamplingOptions.from_args(args) == MAIN  # every setting, the seed too (0)
    changed = build_parser().parse_args(["generate", "--cfg-end", "1", "--steps", "7", "--sampler", "ddim",
                                         "--motion-guidance", "0", "--noise-sharing", "0.5", "--seed", "4"])
    assert SamplingOptions.from_args(changed) == MAIN.replace(cfg_end=1.0, steps=7, sampler="ddim",
                                                              motion_guidance=0.0, noise_sharing=0.5, seed=4)


class _Stop(Exception):
    pass


def _evaluator_options(monkeypatch, *flags) -> SamplingOptions:
    """The options ``python -m magicvideo.evaluate --model ...`` samples with (stopped before loading)."""
    seen = {}

    def capture(path, **kw):
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(ev, "model_generate_fn", capture)
    with pytest.raises(_Stop):
        ev.main(["--model", "model.safetensors", "--n", "1", *flags])
    return seen["options"]


def test_the_evaluators_defaults_are_the_main_preset(monkeypatch):
    assert _evaluator_options(monkeypatch) == MAIN
    # its --seed is the prompt set's (each prompt has its own); the other flags reach the options
    assert _evaluator_options(monkeypatch, "--seed", "4", "--cfg-end", "1", "--steps", "7", "--sampler", "ddim") == \
        MAIN.replace(cfg_end=1.0, steps=7, sampler="ddim")
    # and called from code, its generator's default is the preset too
    assert inspect.signature(MODEL_GENERATE_FN).parameters["options"].default == MAIN


@pytest.fixture(scope="module")
def nodes(host_modules):
    """magicvideo.nodes.model imported in-process against the host's modules (CPU)."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
    return importlib.import_module("magicvideo.nodes.model")


def test_the_keyframe_samplers_defaults_are_the_main_preset(nodes):
    spec = nodes.KeyframeSampler.INPUT_TYPES()
    inputs = {**spec["required"], **spec["optional"]}
    assert {k: inputs[k][1]["default"] for k in COMPARED} == _preset(MAIN)
    assert inputs["noise_sharing"][1]["default"] == -1  # the model's own, as the preset's None
    # the node's widgets are in the order the workflow test reads them
    widgets = [k for k, (kind, _) in inputs.items() if isinstance(kind, list) or kind in ("INT", "FLOAT")]
    widgets.insert(widgets.index("seed") + 1, "control_after_generate")
    assert widgets == WIDGETS
    # called without the optional inputs (an older workflow), the sampler runs the preset too
    params = inspect.signature(nodes.KeyframeSampler.sample).parameters
    assert {k: params[k].default for k in COMPARED if k in params and params[k].default is not inspect.Parameter.empty} \
        == {k: getattr(MAIN, k) for k in ("cfg_start", "cfg_end", "motion_guidance", "motion_guidance_until", "settings")}
