"""One tree, two ways in: a ComfyUI custom node folder under any name, and the package `magicvideo`."""

import ast
import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_DIRS = ["nodes", "models"]


def pack_sources():
    """Python files ComfyUI loads from the pack: the root modules and the package folders."""
    files = sorted(REPO.glob("*.py"))
    for folder in PACK_DIRS:
        files += sorted((REPO / folder).rglob("*.py"))
    return files


def test_design_card_layout():
    for name in ["__init__.py", "nodes", "models", "workflows", "tests", "pyproject.toml", "web/magicvideo.js"]:
        assert (REPO / name).exists(), name
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["name"] == "magicvideo"
    assert project["tool"]["setuptools"]["package-dir"] == {"magicvideo": "."}
    assert {"PublisherId", "DisplayName"} <= set(project["tool"]["comfy"])


def test_plain_package_import_has_no_host():
    """Outside ComfyUI the package imports without the host and registers no nodes."""
    import magicvideo

    assert Path(magicvideo.__file__).resolve().parent == REPO
    if "folder_paths" not in sys.modules:
        assert magicvideo.NODE_CLASS_MAPPINGS == {}
    assert magicvideo.WEB_DIRECTORY == "./web"


@pytest.mark.parametrize("path", pack_sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_pack_code_never_edits_sys_path_nor_imports_itself_by_name(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
            pytest.fail(f"{path.name}:{node.lineno} touches sys.path")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "magicvideo":
            pytest.fail(f"{path.name}:{node.lineno} imports 'magicvideo' by name; use relative imports")
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "magicvideo" for a in node.names):
            pytest.fail(f"{path.name}:{node.lineno} imports 'magicvideo' by name; use relative imports")


@pytest.mark.parametrize("path", sorted((REPO / "models").rglob("*.py")), ids=lambda p: p.name)
def test_library_never_imports_the_host(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            assert name.split(".")[0] not in {"comfy", "folder_paths", "nodes", "server", "execution"}, \
                f"models/{path.name}:{node.lineno} imports the host ({name})"


@pytest.mark.host
def test_comfyui_loads_the_folder_under_any_name(host_modules, tmp_path):
    """The host imports custom_nodes/<any name>/__init__.py as a module of that name; so do we."""
    link = tmp_path / "ComfyUI-MagicVideo copy"
    link.symlink_to(REPO, target_is_directory=True)
    name = link.name
    spec = importlib.util.spec_from_file_location(name, link / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert {"MagicVideoSaveVideo", "MagicVideoLoadVideo"} <= set(module.NODE_CLASS_MAPPINGS)
        assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == set(module.NODE_CLASS_MAPPINGS)
        assert all(key.startswith("MagicVideo") for key in module.NODE_CLASS_MAPPINGS)
        assert (link / module.WEB_DIRECTORY / "magicvideo.js").is_file()
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
