"""``python -m examples.sentiment fit --config examples/sentiment/configs/fgm.yaml``."""

from examples.sentiment.cli import main

if __name__ == "__main__":
    main()
