"""Adversarial training for NLP models as PyTorch Lightning callbacks."""

from lightning_adv.awp import AWP
from lightning_adv.callback import AdversarialCallback
from lightning_adv.fgm import FGM
from lightning_adv.fgsm import FGSM
from lightning_adv.freelb import FreeLB
from lightning_adv.pgd import PGD
from lightning_adv.r3f import R3F
from lightning_adv.robust import RobustAccuracy
from lightning_adv.smart import SMART
from lightning_adv.step import AttackStep
from lightning_adv.vat import VAT

__all__ = [
    "AWP",
    "FGM",
    "FGSM",
    "PGD",
    "R3F",
    "SMART",
    "VAT",
    "AdversarialCallback",
    "AttackStep",
    "FreeLB",
    "RobustAccuracy",
]

__version__ = "0.1.0"
