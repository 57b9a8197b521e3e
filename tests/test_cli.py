"""The callbacks are built from LightningCLI configs: YAML values, short names, checks, fit."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import Tensor
from torch.utils.data import DataLoader

import lightning_adv
from lightning_adv import FGM, FGSM, PGD
from tests.helpers import QUIET_TRAINER_YAML, loader, make_batches, tiny_bert


class TinyBertModule(pl.LightningModule):
    """A module LightningCLI can build from YAML: a tiny BERT classifier and its data."""

    def __init__(self, hidden_size: int = 16, num_labels: int = 3, lr: float = 0.1,
                 batches: int = 3) -> None:
        super().__init__()
        self.model = tiny_bert(hidden=hidden_size, labels=num_labels)
        self.lr = lr
        self.batches = batches
        self.loss_steps: list[int] = []

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def compute_loss(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.loss_steps.append(self.trainer.global_step)
        return self.model(**batch).loss

    def train_dataloader(self) -> DataLoader[Any]:
        return loader(make_batches(self.batches, labels=self.model.config.num_labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)




@pytest.fixture(autouse=True)
def _no_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI warns when pytest's own arguments sit next to `args=`.
    monkeypatch.setattr(sys, "argv", ["prog"])


def _config(tmp_path: Path, callbacks: str, extra: str = "") -> str:
    listed = textwrap.indent(textwrap.dedent(callbacks), "    ")
    text = QUIET_TRAINER_YAML + "  callbacks:\n" + listed
    text += textwrap.dedent(extra)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def _build(path: str) -> LightningCLI:
    return LightningCLI(TinyBertModule, run=False, args=["--config", path],
                        save_config_callback=None)


def _ours(cli: LightningCLI) -> list[Any]:
    return [cb for cb in cli.trainer.callbacks if isinstance(cb, lightning_adv.AdversarialCallback)]


def _public(callback: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(callback).items() if not k.startswith("_")}


def test_full_class_path_sets_every_value(tmp_path):
    path = _config(tmp_path, """\
        - class_path: lightning_adv.FGM
          init_args:
            epsilon: 0.25
            target: output
            loss_fn: compute_loss
            adv_weight: 0.5
            start_step: 3
            every_n_steps: 2
            replay_dropout: false
            log_prefix: adv
        """)
    (callback,) = _ours(_build(path))
    assert type(callback) is FGM
    assert callback.epsilon == 0.25
    assert callback.target == "output"
    assert callback.loss_fn == "compute_loss"
    assert callback.adv_weight == 0.5
    assert callback.start_step == 3
    assert callback.every_n_steps == 2
    assert callback.replay_dropout is False
    assert callback.log_prefix == "adv"


def test_short_names_build_each_method(tmp_path):
    path = _config(tmp_path, """\
        - class_path: FGM
          init_args: {epsilon: 0.5}
        - class_path: FGSM
          init_args: {epsilon: 0.002, target: output}
        - class_path: PGD
          init_args: {epsilon: 0.75, alpha: 0.2, steps: 4, embedding: word_embeddings}
        """)
    fgm, fgsm, pgd = _ours(_build(path))
    assert (type(fgm), fgm.epsilon, fgm.target) == (FGM, 0.5, "weight")
    assert (type(fgsm), fgsm.epsilon, fgsm.target) == (FGSM, 0.002, "output")
    assert (type(pgd), pgd.epsilon, pgd.alpha, pgd.steps) == (PGD, 0.75, 0.2, 4)
    assert pgd.embedding == "word_embeddings"


def test_defaults_match_the_python_defaults(tmp_path):
    path = _config(tmp_path, "- class_path: FGSM\n- class_path: PGD\n")
    fgsm, pgd = _ours(_build(path))
    assert _public(fgsm) == _public(FGSM())
    assert _public(pgd) == _public(PGD())


@pytest.mark.parametrize("init_args", ["{target: embeddings}", "{epsilon: nan}"])
def test_value_rejected_by_the_type_names_the_argument(tmp_path, capsys, init_args):
    path = _config(tmp_path, f"- class_path: FGM\n  init_args: {init_args}\n")
    with pytest.raises(SystemExit):
        _build(path)
    err = capsys.readouterr().err
    key = "target" if "target" in init_args else "epsilon"
    assert f'Parser key "{key}"' in err
    if key == "target":
        assert "'weight', 'output'" in err


@pytest.mark.parametrize(("init_args", "message"), [
    ("{epsilon: -1}", "FGM: `epsilon` must be a finite number >= 0, got -1.0"),
    ("{epsilon: .inf}", "FGM: `epsilon` must be a finite number >= 0, got inf"),
    ("{every_n_steps: 0}", "FGM: `every_n_steps` must be >= 1, got 0"),
    ("{start_step: -2}", "FGM: `start_step` must be >= 0, got -2"),
])
def test_value_rejected_by_the_constructor_keeps_its_message(tmp_path, init_args, message):
    path = _config(tmp_path, f"- class_path: FGM\n  init_args: {init_args}\n")
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        _build(path)


def test_pgd_steps_checked_through_the_cli(tmp_path):
    path = _config(tmp_path, "- class_path: PGD\n  init_args: {steps: 0}\n")
    with pytest.raises(ValueError, match="PGD: `steps` must be >= 1, got 0"):
        _build(path)


def test_help_lists_target_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(TinyBertModule, run=False, args=["--trainer.callbacks.help", "FGM"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--trainer.callbacks.target {weight,output}" in out
    assert "--trainer.callbacks.epsilon EPSILON" in out


def test_fit_through_the_cli_attacks_the_scheduled_steps(tmp_path):
    path = _config(tmp_path, """\
        - class_path: FGM
          init_args: {epsilon: 0.5, loss_fn: compute_loss, start_step: 1, every_n_steps: 2}
        """, extra="""\
          max_steps: 4
          default_root_dir: {root}
        model:
          hidden_size: 8
          batches: 5
        """.replace("{root}", str(tmp_path)))
    cli = LightningCLI(TinyBertModule, args=["fit", "--config", path], save_config_callback=None)
    (callback,) = _ours(cli)
    module = cli.model
    assert module.model.config.hidden_size == 8
    assert cli.trainer.global_step == 4
    # One adversarial pass each at steps 1 and 3, none at 0 and 2.
    assert module.loss_steps == [1, 3]
    assert callback.attacked_steps == 2
    assert cli.trainer.callback_metrics["fgm/attacked"] == 1.0
