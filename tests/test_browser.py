"""The host's web UI in headless Chromium: every workflow in workflows/ loads as a dropped file,
has no missing node types, queues, and shows its output in the page; saved videos dropped
back on the canvas restore their workflow."""

import json
from pathlib import Path

import pytest

from magicvideo.models import video_io

pytestmark = [pytest.mark.host, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
RUN_TIMEOUT_MS = 10 * 60_000

DROP = """async ({name, type, data, base64}) => {
    const bytes = base64 ? Uint8Array.from(atob(data), (c) => c.charCodeAt(0)) : data;
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, {type}));
    app.canvasEl.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
}"""

GRAPH_IS = "(types) => JSON.stringify(app.graph._nodes.map((n) => n.type).sort()) === JSON.stringify(types)"

# Where an output file shows up in the page: our video preview, the host's animated
# preview (<img> in a DOM widget), or images the host draws on the canvas (node.imgs).
SHOWN = """(files) => files.every((f) => {
    const media = [...document.querySelectorAll("video, img")].filter((m) => (m.src || "").includes(encodeURIComponent(f)));
    const onCanvas = app.graph._nodes.flatMap((n) => n.imgs ?? []).filter((i) => (i.src || "").includes(encodeURIComponent(f)));
    return media.some((m) => m.tagName === "VIDEO" ? m.readyState >= 2 && m.videoWidth > 0 : m.complete && m.naturalWidth > 0)
        || onCanvas.some((i) => i.complete && i.naturalWidth > 0);
})"""


def drop_file(page, name, mime, data: bytes | str):
    if isinstance(data, bytes):
        import base64

        page.evaluate(DROP, {"name": name, "type": mime, "data": base64.b64encode(data).decode(), "base64": True})
    else:
        page.evaluate(DROP, {"name": name, "type": mime, "data": data, "base64": False})


def missing_nodes_dialog(page) -> str:
    return page.evaluate("() => [...document.querySelectorAll('.comfy-missing-nodes')].map((e) => e.textContent).join(' ')")


def _shorter(workflow: dict) -> dict:
    """The minute workflow with a 4-second schedule: the same graph, a suite-sized run (the
    host test runs the full minute headlessly)."""
    for node in workflow["nodes"]:
        if node["type"] == "MagicVideoSlidingWindowSampler":
            node["widgets_values"][:2] = ["0-2: a red circle moving to the right\n2-end: a red circle moving up", 4.0]
    return workflow


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_loads_runs_and_shows_its_output(comfy, page, path, tmp_path):
    workflow = json.loads(path.read_text())
    if path.name == "minute_video.json":
        workflow = _shorter(workflow)
        path = tmp_path / path.name
        path.write_text(json.dumps(workflow))
    types = sorted(n["type"] for n in workflow["nodes"])

    drop_file(page, path.name, "application/json", path.read_text())
    page.wait_for_function(GRAPH_IS, arg=types, timeout=30_000)

    assert missing_nodes_dialog(page) == "", f"the host reports missing node types: {missing_nodes_dialog(page)}"
    unregistered = page.evaluate("(types) => types.filter((t) => !LiteGraph.registered_node_types[t])", types)
    assert unregistered == []

    # what the UI would send is what our headless runner sends
    ui_prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert ui_prompt == comfy.workflow_to_prompt(workflow)

    outputs_before = {int(k) for k in page.evaluate("() => Object.keys(app.nodeOutputs)")}
    page.click("#queue-button")
    output_nodes = page.evaluate("() => app.graph._nodes.filter((n) => n.constructor.nodeData?.output_node).map((n) => n.id)")
    assert output_nodes, "the workflow has no output node"
    page.wait_for_function("(ids) => ids.every((id) => app.nodeOutputs[id])", arg=output_nodes, timeout=RUN_TIMEOUT_MS)
    assert not outputs_before & set(output_nodes)

    outputs = page.evaluate("(ids) => ids.map((id) => app.nodeOutputs[id])", output_nodes)
    files = [f for output in outputs for items in output.values() if isinstance(items, list)
             for f in items if isinstance(f, dict) and "filename" in f]
    assert files, f"the output nodes reported no files: {outputs}"
    page.wait_for_function(SHOWN, arg=[f["filename"] for f in files], timeout=60_000)

    for info in files:  # and on disk
        disk = comfy.output_path(info)
        assert disk.is_file() and disk.stat().st_size > 0
        if disk.suffix.lower().lstrip(".") in video_io.FORMATS:
            assert len(video_io.read_video(disk).frames) > 0
            assert video_io.read_metadata(disk)["workflow"]["nodes"], "the workflow was not embedded"
    assert page.js_errors == []


@pytest.mark.parametrize("fmt", list(video_io.FORMATS))
def test_dropping_a_saved_video_restores_its_workflow(comfy, page, fmt):
    workflow = json.loads((REPO / "workflows" / "video_demo.json").read_text())
    saver = next(n for n in workflow["nodes"] if n["type"] == "MagicVideoSaveVideo")
    saver["widgets_values"][1] = fmt
    saver["widgets_values"][4] = f"restore/{fmt}"
    entry = comfy.run(comfy.workflow_to_prompt(workflow), workflow=workflow)
    video = comfy.output_path(comfy.output_files(entry)[0])

    page.evaluate("() => app.graph.clear()")
    drop_file(page, video.name, video_io.FORMATS[fmt].mime, video.read_bytes())

    types = sorted(n["type"] for n in workflow["nodes"])
    page.wait_for_function(GRAPH_IS, arg=types, timeout=30_000)
    restored = page.evaluate("() => app.graph._nodes.find((n) => n.type === 'MagicVideoSaveVideo').widgets.map((w) => w.value)")
    assert restored[1] == fmt
    assert page.js_errors == []


def test_load_video_uploads_and_previews_a_video(comfy, page, tmp_path):
    from host_nodes.magicvideo_testkit import moving_pattern

    clip = tmp_path / "uploaded clip.mp4"
    video_io.write_video(clip, moving_pattern(6, 48, 64), 8, "mp4")
    page.evaluate("""() => {
        app.graph.clear();
        const node = LiteGraph.createNode("MagicVideoLoadVideo");
        node.pos = [100, 100];
        app.graph.add(node);
    }""")
    buttons = page.evaluate("() => app.graph._nodes[0].widgets.filter((w) => w.type === 'button').map((w) => w.name)")
    assert buttons == ["choose video to upload"]

    page.set_input_files("input[type=file][accept^='video']", str(clip))  # what the button's file dialog does
    page.wait_for_function("() => app.graph._nodes[0].widgets.find((w) => w.name === 'video').value === 'uploaded clip.mp4'",
                           timeout=30_000)
    page.wait_for_function("() => document.querySelector('.magicvideo-preview video')?.readyState >= 2", timeout=30_000)
    assert (comfy.input_dir / "uploaded clip.mp4").read_bytes() == clip.read_bytes()
    assert page.js_errors == []
