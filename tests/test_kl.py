"""The divergences of SMART, VAT and R3F in low precision.

``symmetric_kl`` and ``kl_divergence`` compute in float32 or wider whatever the logits'
dtype, stay finite and non-negative on sharp distributions over 1,000 classes, and are
exactly zero between equal inputs. In real fits under ``bf16-mixed`` and under fp16 with a
loss scaler, the KL methods train with finite weights and a finite, non-negative
adversarial loss.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor

from lightning_adv import R3F, SMART, VAT
from lightning_adv.functional import kl_divergence, symmetric_kl
from tests.helpers import Classifier, loader, make_batches, tiny_bert, trainer

CLASSES = 1000
SHARPNESS = 50.0
LOW = [torch.bfloat16, torch.float16]


def _kl64(p: Tensor, q: Tensor) -> Tensor:
    """``KL(p || q)`` in float64, summed over the class axis, mean over the batch."""
    log_p = F.log_softmax(p.double(), dim=-1)
    log_q = F.log_softmax(q.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


def _sharp_logits(dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    p = torch.randn(8, CLASSES, generator=generator) * SHARPNESS
    # A close neighbour: the differences are where rounding would bite.
    q = p + 0.01 * SHARPNESS * torch.randn(8, CLASSES, generator=generator)
    return p.to(dtype), q.to(dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_logits_are_computed_in_float32(dtype):
    generator = torch.Generator().manual_seed(0)
    p = torch.randn(6, 5, generator=generator).to(dtype)
    q = torch.randn(6, 5, generator=generator).to(dtype)

    forward = kl_divergence(p, q)
    both = symmetric_kl(p, q)
    assert forward.dtype == both.dtype == torch.float32
    # Exact on the given (rounded) logits: a bf16/fp16 softmax would be off by ~1e-3.
    torch.testing.assert_close(forward.double(), _kl64(p, q), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(both.double(), _kl64(p, q) + _kl64(q, p), rtol=1e-5, atol=1e-7)
    # Gradients reach low-precision logits in their own dtype.
    leaf = p.clone().requires_grad_(True)
    symmetric_kl(leaf, q).backward()
    assert leaf.grad.dtype == dtype and leaf.grad.isfinite().all()


def test_float64_stays_float64():
    p, q = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    assert kl_divergence(p, q).dtype == symmetric_kl(p, q).dtype == torch.float64


@pytest.mark.parametrize("dtype", [*LOW, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sharp_distributions_over_1000_classes(dtype, seed):
    p, q = _sharp_logits(dtype, seed)
    for a, b in [(p, q), (q, p)]:
        forward = kl_divergence(a, b)
        both = symmetric_kl(a, b)
        assert forward.isfinite() and both.isfinite()
        assert forward >= 0 and both >= 0
        want = _kl64(a, b)
        torch.testing.assert_close(forward.double(), want, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(both.double(), want + _kl64(b, a), rtol=1e-3, atol=1e-4)
    # Shifted logits give the same distribution: the float32 log-softmax differs only by
    # rounding, which a plain sum of p * (log p - log q) turns into a negative divergence.
    shifted = p.float() + 0.37
    for a, b in [(p, shifted), (shifted, p)]:
        for value in (kl_divergence(a, b), symmetric_kl(a, b)):
            assert 0 <= value < 1e-6


@pytest.mark.parametrize("dtype", [*LOW, torch.float32, torch.float64])
def test_equal_inputs_give_exactly_zero(dtype):
    p, _ = _sharp_logits(dtype, 3)
    assert kl_divergence(p, p).item() == 0.0
    assert symmetric_kl(p, p).item() == 0.0
    assert symmetric_kl(p, p.clone()).item() == 0.0


class SharpClassifier(Classifier):
    """1,000 classes, logits multiplied by 50; records what the callbacks log."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.0) -> None:
        super().__init__(model, lr)
        self.logged: list[dict[str, float]] = []

    def compute_loss(self, batch: dict[str, Tensor], batch_idx: int) -> Any:
        logits = SHARPNESS * self.model(input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"]).logits
        return {"loss": F.cross_entropy(logits.float(), batch["labels"]), "logits": logits}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.compute_loss(batch, batch_idx)["loss"]

    def log_dict(self, dictionary: Any, *args: Any, **kwargs: Any) -> None:
        self.logged.append({k: float(v) for k, v in dictionary.items()})
        super().log_dict(dictionary, *args, **kwargs)


def _precision(kind: str) -> dict[str, Any]:
    if kind == "bf16-mixed":
        return {"precision": "bf16-mixed"}
    # Logits times 50 give gradients of up to 50 per logit: at the default scale of 2**16
    # every step would overflow in fp16 and be skipped. A scale of 64 lets them train.
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}


METHODS = {
    "smart": lambda: SMART(epsilon=0.05, alpha=0.02, noise_std=0.01, loss_fn="compute_loss"),
    "vat": lambda: VAT(epsilon=0.5, loss_fn="compute_loss"),
    "r3f": lambda: R3F(epsilon=0.05, loss_fn="compute_loss"),
}


@pytest.mark.parametrize("kind", ["bf16-mixed", "fp16-scaler"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_kl_methods_train_in_low_precision(method, kind):
    steps = 3
    module = SharpClassifier(tiny_bert(dtype=torch.float32, labels=CLASSES), lr=0.05)
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    callback: pl.Callback = METHODS[method]()
    trainer([callback], max_steps=steps, **_precision(kind)).fit(
        module, loader(make_batches(steps))
    )

    losses = [row[f"{method}/adv_loss"] for row in module.logged if f"{method}/adv_loss" in row]
    assert len(losses) == steps
    assert all(torch.isfinite(torch.tensor(v)) and v >= 0 for v in losses), losses
    assert any(v > 0 for v in losses), losses
    final = dict(module.named_parameters())
    assert all(p.isfinite().all() for p in final.values())
    assert any(not torch.equal(final[n], initial[n]) for n in initial)


def test_zero_noise_gives_zero_divergence_in_a_fit():
    """R3F with ``epsilon=0`` compares the clean logits with themselves: exactly zero."""
    module = SharpClassifier(tiny_bert(dtype=torch.float32, labels=CLASSES))
    trainer([R3F(epsilon=0.0, loss_fn="compute_loss")], max_steps=2,
            precision="bf16-mixed").fit(module, loader(make_batches(2)))
    losses = [row["r3f/adv_loss"] for row in module.logged if "r3f/adv_loss" in row]
    assert losses == [0.0, 0.0]
