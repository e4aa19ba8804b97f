"""Run a UI-format workflow JSON in a headless ComfyUI and print the files it wrote.

    .venv/bin/python scripts/run_workflow.py workflows/video_demo.json [--output-dir output]

The host is $COMFYUI_PATH or the vendored copy in .comfyui/ (bash scripts/setup.sh makes it).
The work is done by magicvideo.host, which the tests share.
"""

import sys

from magicvideo.host import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
