"""magicvideo.host: linking the pack, and failing fast when the host cannot import it."""

import os
import time

import pytest

from magicvideo.host import REPO_ROOT, ComfyHost, HostError, link_pack


def test_link_pack_links_once_and_refuses_a_foreign_folder(tmp_path):
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    entry = link_pack(comfy)
    assert entry == comfy / "custom_nodes" / "magicvideo" and entry.resolve() == REPO_ROOT
    assert link_pack(comfy) == entry  # already there: nothing new

    other = tmp_path / "Other"
    (other / "custom_nodes" / "magicvideo").mkdir(parents=True)  # someone else's copy
    with pytest.raises(HostError, match="not this checkout"):
        link_pack(other)


def test_an_existing_link_under_another_name_is_reused(tmp_path):
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "custom_nodes" / "ComfyUI-MagicVideo").symlink_to(REPO_ROOT, target_is_directory=True)
    assert link_pack(comfy).name == "ComfyUI-MagicVideo"
    assert os.listdir(comfy / "custom_nodes") == ["ComfyUI-MagicVideo"]


@pytest.mark.host
def test_start_fails_at_once_when_a_pack_does_not_import(comfy_path, tmp_path):
    broken = tmp_path / "nodes" / "broken_pack"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this pack is broken on purpose')\n")
    host = ComfyHost(comfy_path, output_dir=tmp_path / "out", input_dir=tmp_path / "in",
                     extra_custom_nodes=[tmp_path / "nodes"], log_path=tmp_path / "log.txt")
    started = time.monotonic()
    with pytest.raises(HostError, match="could not import") as info:
        host.start(timeout=120)
    assert "broken on purpose" in str(info.value)
    assert time.monotonic() - started < 60
    assert host.proc.poll() is not None  # the server was stopped
