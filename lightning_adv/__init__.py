"""Adversarial training for NLP models as PyTorch Lightning callbacks."""

from lightning_adv.callback import AdversarialCallback
from lightning_adv.fgm import FGM
from lightning_adv.fgsm import FGSM
from lightning_adv.pgd import PGD
from lightning_adv.step import AttackStep

__all__ = ["FGM", "FGSM", "PGD", "AdversarialCallback", "AttackStep"]

__version__ = "0.1.0"
