"""Callback state in checkpoints: distinct state keys, exact resume, older states."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from lightning_adv import FGM, PGD, AdversarialCallback, FreeLB
from tests.helpers import Classifier, loader, make_batches, tiny_bert, trainer

BATCHES_PER_EPOCH = 4


class StepClassifier(Classifier):
    """Records the optimizer step of every adversarial pass (the callback's `loss_fn`)."""

    def __init__(self) -> None:
        super().__init__(tiny_bert(), lr=0.05, optimizer="adam")
        self.loss_steps: list[int] = []

    def compute_loss(self, batch: dict[str, Tensor], batch_idx: int) -> Any:
        self.loss_steps.append(self.trainer.global_step)
        return super().compute_loss(batch, batch_idx)


def _fit(callbacks: list[Any], max_steps: int, ckpt_path: str | None = None,
         batches: list[dict[str, Tensor]] | None = None,
         **kwargs: Any) -> tuple[StepClassifier, Any]:
    module = StepClassifier()
    if batches is None:
        batches = make_batches(BATCHES_PER_EPOCH)
    run = trainer(callbacks, max_steps=max_steps, max_epochs=-1, **kwargs)
    run.fit(module, loader(batches), ckpt_path=ckpt_path)
    return module, run


def _callback_states(path: str | Path) -> dict[str, Any]:
    return torch.load(path, weights_only=False)["callbacks"]


def _attacked_steps(path: str | Path, callback: AdversarialCallback) -> int:
    return _callback_states(path)[callback.state_key]["attacked_steps"]


# Passes through `loss_fn` per attacked step.
PASSES = {"fgm": 1, "pgd": 2, "freelb": 2}


def _schedule(method: str) -> AdversarialCallback:
    # Attacks steps 2, 5 and 8 of a 10-step run; the break after step 4 falls between two.
    if method == "pgd":
        return PGD(epsilon=0.5, alpha=0.2, steps=2, loss_fn="compute_loss", start_step=2,
                   every_n_steps=3)
    if method == "freelb":
        # A random start from the callback's own generator: its state must resume too.
        return FreeLB(steps=2, init_magnitude=0.5, loss_fn="compute_loss", start_step=2,
                      every_n_steps=3, seed=7)
    return FGM(epsilon=1.0, loss_fn="compute_loss", start_step=2, every_n_steps=3)


# Lightning restarts a plain DataLoader from its first batch when it resumes mid-epoch, and
# from a `save_checkpoint` made after a `max_steps` stop at an epoch's end it runs one extra
# batch before the next epoch. Those cases repeat one batch, so the order of the data cannot
# matter and only the callback's own state decides whether the runs agree.
@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch")
@pytest.mark.parametrize(("method", "saver"), [
    ("fgm", "epoch_end"), ("pgd", "epoch_end"), ("freelb", "epoch_end"), ("fgm", "mid_epoch"),
    ("fgm", "after_fit"),
])
def test_resume_mid_schedule_matches_an_uninterrupted_run(tmp_path, method, saver):
    if saver == "epoch_end":
        batches = make_batches(BATCHES_PER_EPOCH)
    else:
        batches = make_batches(1) * (BATCHES_PER_EPOCH - 1)
    passes = PASSES[method]
    whole, _ = _fit([_schedule(method)], max_steps=10, batches=batches)
    assert whole.loss_steps == [2] * passes + [5] * passes + [8] * passes

    first_callback = _schedule(method)
    path = str(tmp_path / "mid.ckpt")
    if saver == "after_fit":
        first, run = _fit([first_callback], max_steps=4, batches=batches)
        run.save_checkpoint(path)
    else:
        # Saved from `on_train_batch_end` of the fourth step.
        saving = ModelCheckpoint(dirpath=tmp_path, filename="mid", every_n_train_steps=4)
        first, _ = _fit([first_callback, saving], max_steps=4, batches=batches,
                        enable_checkpointing=True)
    assert first.loss_steps == [2] * passes
    assert first_callback.attacked_steps == 1
    assert _attacked_steps(path, first_callback) == 1

    resumed_callback = _schedule(method)
    resumed, run = _fit([resumed_callback], max_steps=10, ckpt_path=path, batches=batches)
    assert run.global_step == 10
    assert resumed.loss_steps == [5] * passes + [8] * passes
    assert resumed_callback.attacked_steps == 3

    expected = whole.state_dict()
    got = resumed.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    if saver == "epoch_end":
        # The attack changed the trajectory: a run without it ends elsewhere.
        clean, _ = _fit([], max_steps=10, batches=batches)
        assert not torch.equal(clean.model.classifier.weight, whole.model.classifier.weight)


def _pair() -> tuple[FGM, FGM]:
    # Over steps 0..3 the first attacks 0 and 2, the second attacks 1.
    return (
        FGM(epsilon=1.0, every_n_steps=2, log_prefix="fgm_a"),
        FGM(epsilon=0.5, start_step=1, every_n_steps=3, log_prefix="fgm_b"),
    )


def test_two_instances_keep_separate_states(tmp_path):
    a, b = _pair()
    assert a.state_key != b.state_key
    _, run = _fit([a, b], max_steps=4)
    assert (a.attacked_steps, b.attacked_steps) == (2, 1)
    path = tmp_path / "pair.ckpt"
    run.save_checkpoint(path)
    assert (_attacked_steps(path, a), _attacked_steps(path, b)) == (2, 1)

    # Given in the other order, each instance still finds its own state; step 4 is
    # attacked by both (4 = 0 + 2 * 2 = 1 + 3).
    a2, b2 = _pair()
    _fit([b2, a2], max_steps=5, ckpt_path=str(path))
    assert (a2.attacked_steps, b2.attacked_steps) == (3, 2)


def test_fgm_and_pgd_coexist(tmp_path):
    fgm = FGM(epsilon=1.0, every_n_steps=2)
    pgd = PGD(epsilon=1.0, steps=2, start_step=1, every_n_steps=2)
    _, run = _fit([fgm, pgd], max_steps=4)
    path = tmp_path / "both.ckpt"
    run.save_checkpoint(path)
    assert (_attacked_steps(path, fgm), _attacked_steps(path, pgd)) == (2, 2)


@pytest.mark.parametrize(("name", "value"), [
    ("epsilon", 0.5),
    ("target", "output"),
    ("loss_fn", "compute_loss"),
    ("embedding", "word_embeddings"),
    ("start_step", 1),
    ("every_n_steps", 2),
    ("adv_weight", 0.5),
    ("epsilon_scale", "relative"),
])
def test_instances_differing_in_one_argument_have_distinct_keys(name, value):
    # Each pair could be meant to run side by side (e.g. two schedules of one attack), and
    # each keeps its own counter, so it needs its own place in the checkpoint.
    base = FGM(epsilon=1.0)
    other = FGM(**{"epsilon": 1.0, name: value})
    assert base.state_key != other.state_key
    # Lightning refuses two stateful callbacks with one key at Trainer construction.
    trainer([base, other])


def test_pgd_state_key_includes_its_arguments():
    keys = {PGD().state_key, PGD(alpha=0.1).state_key, PGD(steps=5).state_key,
            PGD(epsilon=2.0).state_key}
    assert len(keys) == 4


def test_state_round_trip_and_older_state_defaults():
    callback = FGM()
    callback.attacked_steps = 7
    fresh = FGM()
    fresh.load_state_dict(callback.state_dict())
    assert fresh.attacked_steps == 7
    # A state saved before `attacked_steps` existed, or with keys no longer used.
    fresh.load_state_dict({})
    assert fresh.attacked_steps == 0
    fresh.load_state_dict({"retired_key": 3})
    assert fresh.attacked_steps == 0


def test_checkpoint_with_an_older_state_resumes_with_defaults(tmp_path):
    callback = FGM(every_n_steps=2)
    _, run = _fit([callback], max_steps=4)
    path = tmp_path / "old.ckpt"
    run.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    # An older release wrote a different state under the same key.
    checkpoint["callbacks"][callback.state_key] = {"retired_key": 3}
    torch.save(checkpoint, path)

    resumed = FGM(every_n_steps=2)
    _fit([resumed], max_steps=6, ckpt_path=str(path))
    # Steps 4 and 5 run; only 4 is attacked, counted from the default 0.
    assert resumed.attacked_steps == 1


def test_checkpoint_without_the_callback_resumes(tmp_path):
    _, run = _fit([], max_steps=2)
    path = tmp_path / "plain.ckpt"
    run.save_checkpoint(path)
    assert not _callback_states(path)
    callback = FGM(loss_fn="compute_loss")
    module, _ = _fit([callback], max_steps=4, ckpt_path=str(path))
    assert module.loss_steps == [2, 3]
    assert callback.attacked_steps == 2


def test_a_callback_reused_across_fits_counts_every_attacked_step():
    callback = FGM(epsilon=0.01)
    for fits in range(1, 4):
        fit = trainer([callback], max_steps=1)
        fit.fit(Classifier(tiny_bert()), loader(make_batches(1)))
        assert callback.attacked_steps == fits
