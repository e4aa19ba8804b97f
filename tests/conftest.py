"""Shared fixtures: a real ComfyUI server, the host's modules in-process, and headless Chromium.

Unit tests need none of these. End-to-end tests take the fixtures below; mark them
``@pytest.mark.host`` (server or host modules) or ``@pytest.mark.browser`` (Chromium),
so ``pytest -m "not host and not browser"`` runs the fast unit tests alone.

``comfy`` (session): a running ``magicvideo.host.ComfyHost``: ComfyUI with ``--cpu`` on a
free loopback port, this pack linked into its ``custom_nodes/``, the test-only nodes of
``tests/host_nodes/`` beside it (``TestMVFrames``: image lists of any sizes and counts,
any fps), and fresh input/output folders for the session. It fails at once when the
host's log says the pack did not import or ``/object_info`` lacks its nodes (the core
video nodes plus every ``MagicVideo*`` type used in ``workflows/``).

    entry = comfy.run(prompt)             # API-format dict -> /history entry; PromptError on failure
    message = comfy.run_expect_error(p)   # the host's message: validation (400) or execution error
    files = comfy.output_files(entry)     # [{"filename", "subfolder", "type", ...}] of all output nodes
    path = comfy.output_path(files[0])    # Path on disk (comfy.output_dir / comfy.input_dir)
    name = comfy.upload(path_or_bytes, "clip.mp4")   # into the input folder, as the UI's upload does
    prompt = comfy.workflow_to_prompt(ui_workflow)   # UI-format JSON -> API format
    comfy.object_info, comfy.log_text(), comfy.url

``comfy_path`` (session): the ComfyUI folder (``$COMFYUI_PATH``, else ``.comfyui/`` made by
``scripts/setup.sh``). ``host_modules`` (session): puts that folder on ``sys.path`` (host
in CPU mode) so tests can ``import comfy.sd`` / ``folder_paths``; call host classes under
``torch.inference_mode()`` as the server does.

``page`` (function): a Playwright page in headless Chromium (Debian's ``chromium``, fresh
profile, no browser download) with the host's web UI loaded and ``window.app`` ready.

Keep ``tests/`` free of ``__init__.py``: the repository root is itself a package, and
pytest's default import mode relies on ``tests/`` not being one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from magicvideo.host import CORE_PACK_NODES, NODE_PREFIX, ComfyHost, HostError, comfy_path as _comfy_path

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
TEST_NODES = Path(__file__).resolve().parent / "host_nodes"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


def workflow_node_types(path: Path) -> set[str]:
    return {node["type"] for node in json.loads(path.read_text()).get("nodes", [])}


@pytest.fixture(scope="session")
def comfy_path() -> Path:
    path = _comfy_path()
    if not (path / "main.py").is_file():
        pytest.fail(f"no ComfyUI at {path}: run `bash scripts/setup.sh --test` or set COMFYUI_PATH", pytrace=False)
    return path


@pytest.fixture(scope="session")
def comfy(comfy_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui")
    required = set(CORE_PACK_NODES)
    for workflow in WORKFLOWS:
        required |= {t for t in workflow_node_types(workflow) if t.startswith(NODE_PREFIX)}
    host = ComfyHost(comfy_path, output_dir=root / "output", input_dir=root / "input",
                     extra_custom_nodes=[TEST_NODES], log_path=root / "comfyui.log")
    try:
        host.start()
        host.check_nodes(required)
    except HostError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield host
    host.stop()


@pytest.fixture(scope="session")
def host_modules(comfy_path):
    """``import comfy`` / ``folder_paths`` in the test process, for tests that call host classes.

    The host runs in CPU mode, as the test server does (``--cpu``); without it, importing
    ``comfy.model_management`` asks CUDA for a device even on machines with no GPU.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(comfy_path))
        from comfy.cli_args import args

        patch.setattr(args, "cpu", True)
        yield comfy_path


@pytest.fixture(scope="session")
def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("Debian's chromium is not installed: run `bash scripts/setup.sh --test`", pytrace=False)
    return path


@pytest.fixture(scope="session")
def browser_context(chromium, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=chromium, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1600, "height": 1000},
        )
        yield context
        context.close()


@pytest.fixture
def page(browser_context, comfy):
    page = browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # the profile lives for the session: start each page without the last test's graph
    page.add_init_script("try { localStorage.clear(); } catch (e) {}")
    page.goto(comfy.url)
    page.wait_for_function(
        "() => window.app?.graph && window.LiteGraph && Object.keys(LiteGraph.registered_node_types).length > 50",
        timeout=60_000,
    )
    page.js_errors = errors
    yield page
    page.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failing test that used the server, attach the end of the server's log."""
    outcome = yield
    report = outcome.get_result()
    host = item.funcargs.get("comfy") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(host, ComfyHost):
        report.sections.append(("ComfyUI log (tail)", host.log_tail(80)))


def pytest_collection_modifyitems(config, items):
    """Tests that take a server or the browser get the marker even if the author forgot it."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & {"comfy", "comfy_path", "host_modules"}:
            item.add_marker(pytest.mark.host)
        if names & {"page", "browser_context", "chromium"}:
            item.add_marker(pytest.mark.browser)

