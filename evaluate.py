"""`python -m magicvideo.evaluate`: score the world's own clips or a model; see models/evaluate.py."""

import sys

from .models.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
