"""`python -m magicvideo.train`: see models/train.py."""

from .models.train import main

if __name__ == "__main__":
    main()
