"""Relative budgets, the logged size statistics, and the collapse warning."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lightning_adv import FGM, FGSM, PGD, FreeLB
from lightning_adv.functional import relative_sizes, row_norms
from lightning_adv.monitor import WEIGHT_LARGEST_LIMIT, CollapseMonitor
from tests.helpers import (
    PAD,
    Classifier,
    attack_and_capture,
    clone,
    loader,
    make_batches,
    tiny_bert,
    trainer,
)


def _capturing(cls):
    class Capturing(cls):
        def attack(self, step):
            r = attack_and_capture(super().attack, step)
            self.seen = (r.clone(), step.reference.clone(), step)

    Capturing.__name__ = cls.__name__
    return Capturing


def _fit(callback, batches=None, **kwargs):
    module = Classifier(clone(tiny_bert()))
    trainer(
        [callback], max_steps=1, logger=False, **kwargs
    ).fit(module, loader(batches or make_batches(1)))
    return module


@pytest.mark.parametrize("target", ["weight", "output"])
def test_relative_fgm_norm_is_epsilon_times_what_it_perturbs(target):
    callback = _capturing(FGM)(epsilon=0.2, epsilon_scale="relative", target=target)
    _fit(callback)
    r, reference, _ = callback.seen
    ratio = row_norms(r) / row_norms(reference)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.2), rtol=1e-10, atol=0)
    assert r.shape[0] == (4 if target == "output" else 1)


def test_relative_output_reference_is_the_clean_embedding_output_without_padding():
    batches = make_batches(1)
    callback = _capturing(FGM)(epsilon=0.1, epsilon_scale="relative", target="output")
    module = _fit(callback, batches)
    _, reference, _ = callback.seen
    ids = batches[0]["input_ids"]
    emb = module.model.get_input_embeddings()(ids) * (ids != PAD).unsqueeze(-1)
    torch.testing.assert_close(reference, emb.reshape(ids.shape[0], -1).detach())


@pytest.mark.parametrize("target", ["weight", "output"])
def test_relative_fgsm_entry_is_epsilon_times_rms_entry(target):
    callback = _capturing(FGSM)(epsilon=0.1, epsilon_scale="relative", target=target)
    _fit(callback)
    r, reference, step = callback.seen
    keep = step.mask(torch.ones_like(r)) != 0
    rms = row_norms(reference) / keep.sum(dim=1, keepdim=True).sqrt()
    nonzero = r != 0
    assert nonzero.any()
    torch.testing.assert_close(r.abs(), (0.1 * rms).expand_as(r) * nonzero)
    assert not (r != 0)[~keep].any()  # padding entries never move


@pytest.mark.parametrize("target", ["weight", "output"])
def test_relative_pgd_stays_in_its_ball(target):
    callback = _capturing(PGD)(
        epsilon=0.1, alpha=0.08, steps=3, epsilon_scale="relative", target=target
    )
    _fit(callback)
    r, reference, _ = callback.seen
    ratio = row_norms(r) / row_norms(reference)
    assert (ratio <= 0.1 + 1e-12).all()
    assert (ratio > 0.1 - 1e-6).all()  # three steps of 0.08 reach the boundary


def test_relative_sizes_function():
    reference = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    r = torch.tensor([[0.3, 0.4, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    mean, largest = relative_sizes(r, reference, unit=2)
    # Row 0: 0.5 / 5 = 0.1; row 1: 2 / sqrt(2). Units: 0.1, -, 2.0, 0 (padding unit skipped).
    assert mean.item() == pytest.approx((0.1 + 2 / math.sqrt(2)) / 2)
    assert largest.item() == pytest.approx(2.0)


def test_logged_statistics():
    module = Classifier(clone(tiny_bert()))
    fit = trainer([FGM(epsilon=0.05, epsilon_scale="relative", target="output")], max_steps=1,
                  log_every_n_steps=1)
    fit.fit(module, loader(make_batches(1)))
    recorded = {k: float(v) for k, v in fit.callback_metrics.items()}
    assert recorded["fgm/attacked"] == 1.0
    assert recorded["fgm/rel_size_mean"] == pytest.approx(0.05, rel=1e-6)
    assert recorded["fgm/rel_size_max"] >= recorded["fgm/rel_size_mean"]
    assert recorded["fgm/adv_clean_ratio"] > 0
    assert recorded["fgm/adv_loss"] == pytest.approx(
        recorded["fgm/adv_clean_ratio"] * recorded["train_loss"], rel=1e-6
    )


def _warnings_of(callback, steps=4, text="perturbation of a single token"):
    module = Classifier(clone(tiny_bert()), lr=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([callback], max_steps=steps, log_every_n_steps=1).fit(
            module, loader(make_batches(steps))
        )
    return [str(w.message) for w in caught if text in str(w.message)]


def test_collapse_warning_fires_for_an_oversized_epsilon_and_names_the_fix():
    messages = _warnings_of(FGM(epsilon=20.0, target="output"))
    assert len(messages) == 1  # once, not every step
    assert "epsilon" in messages[0] and "relative" in messages[0]


def test_collapse_warning_names_the_argument_the_method_has():
    # FreeLB has no `epsilon`: its ball is `max_norm`. A relative budget is not told to
    # become relative.
    [message] = _warnings_of(FreeLB(alpha=40.0, max_norm=40.0, init_magnitude=0.0))
    assert "Lower `max_norm` (try `max_norm=" in message and "epsilon_scale='relative'" in message
    [message] = _warnings_of(FGM(epsilon=3.0, epsilon_scale="relative", target="output"))
    assert "Lower `epsilon` (try `epsilon=" in message and "epsilon_scale" not in message


def test_collapse_warning_silent_for_a_small_relative_epsilon():
    assert _warnings_of(FGM(epsilon=0.05, epsilon_scale="relative", target="output")) == []


def test_collapse_warning_can_be_turned_off():
    assert _warnings_of(FGM(epsilon=20.0, target="output", warn_on_collapse=False)) == []


def test_chance_rule_needs_learning_then_climb_back():
    monitor = CollapseMonitor("FGM", epsilon=1.0)
    chance = math.log(2)
    for loss in [0.9 * chance, 0.96 * chance]:  # never learned: silent
        monitor.update(torch.tensor(0.1), torch.tensor(loss), classes=2)
        assert monitor.check() == []
    for _ in range(40):  # learns
        monitor.update(torch.tensor(0.1), torch.tensor(0.3), classes=2)
    assert monitor.check() == []
    for _ in range(60):  # collapses back to chance
        monitor.update(torch.tensor(0.1), torch.tensor(chance), classes=2)
    with pytest.warns(UserWarning, match="chance level"):
        messages = monitor.check()
    assert len(messages) == 1


def test_mean_rule_catches_evenly_spread_perturbations():
    # FGSM's sign step moves every touched row by the same share: the largest stays below 1
    # while the whole input is drowned (measured: mean 0.49, largest 0.63 before collapse).
    monitor = CollapseMonitor("FGSM", epsilon=0.01)
    monitor.update(torch.tensor(0.63), None, classes=2, mean=torch.tensor(0.49))
    with pytest.warns(UserWarning, match="on average 0.49 times"):
        messages = monitor.check()
    assert len(messages) == 1 and "epsilon=0.00102" in messages[0]
    monitor.update(torch.tensor(0.63), None, classes=2, mean=torch.tensor(0.49))
    assert monitor.check() == []  # once per cause


def test_output_target_warns_at_a_lower_mean():
    # Pretrained MiniLM, FGM output target: relative 0.03 trained, 0.1 collapsed with the
    # largest token at 0.33, under the largest-size rule's limit.
    [message] = _warnings_of(FGM(epsilon=0.1, epsilon_scale="relative", target="output"),
                             text="on average")
    assert "on average 0.10 times" in message and "try `epsilon=0.032`" in message
    assert _warnings_of(FGM(epsilon=0.03, epsilon_scale="relative", target="output"),
                        text="on average") == []
    # The same mean on the weight target trained MiniLM: no warning.
    assert _warnings_of(FGM(epsilon=0.1, epsilon_scale="relative", target="weight"),
                        text="on average") == []


def test_weight_target_allows_a_few_rows_up_to_twice_their_length():
    # FGM, weight target, relative 0.05 from step 300 on the character model: the largest
    # row at 1.12 and a healthy run; the weight runs that collapsed had rows at 3.0-9.0.
    healthy = _warnings_of(FGM(epsilon=0.05, epsilon_scale="relative", target="weight"))
    assert healthy == []
    monitor = CollapseMonitor("FGM", epsilon=0.05, relative=True,
                              largest_limit=WEIGHT_LARGEST_LIMIT)
    monitor.update(torch.tensor(1.12), None, classes=2, mean=torch.tensor(0.05))
    assert monitor.check() == []
    monitor.update(torch.tensor(3.0), None, classes=2, mean=torch.tensor(0.1))
    with pytest.warns(UserWarning, match="3.00 times the vector"):
        assert len(monitor.check()) == 1


def test_mean_rule_silent_for_a_healthy_run():
    # FGM, weight target, absolute 0.1 on the character model: mean 0.02, largest 0.45.
    monitor = CollapseMonitor("FGM", epsilon=0.1)
    monitor.update(torch.tensor(0.45), None, classes=2, mean=torch.tensor(0.02))
    assert monitor.check() == []


def test_a_loss_that_never_leaves_chance_is_warned_about_once():
    monitor = CollapseMonitor("FreeLB", epsilon=0.1, argument="max_norm", relative=True,
                              stuck_after=50)
    for _ in range(49):
        monitor.update(None, torch.tensor(0.69), classes=2)
    assert monitor.check() == []
    monitor.update(None, torch.tensor(0.69), classes=2)
    (message,) = monitor.check()
    assert "after 50 attacked steps" in message and "`max_norm`" in message
    monitor.update(None, torch.tensor(0.69), classes=2)
    assert monitor.check() == []


def test_a_loss_that_learned_is_not_stuck():
    monitor = CollapseMonitor("FGM", epsilon=0.1, stuck_after=5)
    monitor.update(None, torch.tensor(0.2), classes=2)
    assert monitor.check() == []
    for _ in range(10):
        monitor.update(None, torch.tensor(0.3), classes=2)
    assert monitor.check() == []


def test_a_start_step_beyond_the_fit_is_warned_about():
    module = Classifier(clone(tiny_bert()), lr=0.0)
    with pytest.warns(UserWarning, match=r"start_step=300, but this fit runs 4 optimizer "
                                         r"steps, so no step will be attacked"):
        trainer([FGM(epsilon=0.05, epsilon_scale="relative", start_step=300)],
                max_steps=4).fit(module, loader(make_batches(4)))
