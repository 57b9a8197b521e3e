"""The example as a LightningCLI program: every config, manual optimization, compare.py."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from examples.sentiment import compare
from examples.sentiment.cli import SentimentCLI, main
from lightning_adv import AdversarialCallback

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

CONFIGS = sorted((Path(__file__).parents[1] / "examples" / "sentiment" / "configs").glob("*.yaml"))
TINY_MODEL = [
    "--model.hidden_size", "16", "--model.num_layers", "1", "--model.num_heads", "2",
    "--model.intermediate_size", "32",
]


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small two-label CSV of made-up Chinese reviews; the label shows in the words."""
    rng = random.Random(0)
    filler = "这本书质量内容作者故事东西买了还是一般"
    words = {"好评": "好棒喜欢推荐满意", "差评": "差烂失望难看退货"}
    lines = ["text,label"]
    for index in range(160):
        label = "好评" if index % 2 else "差评"
        text = "".join(rng.choice(filler) for _ in range(rng.randint(4, 30)))
        text += "".join(rng.choice(words[label]) for _ in range(3)) + str(index)
        lines.append(f"{text},{label}")
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The models here are tiny: a second thread only adds waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative output folders of the configs (runs/...) land in the test's folder."""
    monkeypatch.chdir(tmp_path)


def run_fit(config: Path, reviews: Path, out: Path, *extra: str) -> SentimentCLI:
    args = [
        "fit", "--config", str(config),
        "--data.path", str(reviews), "--data.max_length", "24", "--data.batch_size", "8",
        "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        *TINY_MODEL, *extra,
    ]
    return main(args)


def attacks(cli: SentimentCLI) -> list[AdversarialCallback]:
    return [cb for cb in cli.trainer.callbacks if isinstance(cb, AdversarialCallback)]


def test_configs_share_one_budget() -> None:
    assert {path.stem for path in CONFIGS} >= {"none", "fgm", "fgsm", "pgd"}
    budgets = []
    for path in CONFIGS:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        trainer = config["trainer"]
        assert trainer["logger"]["init_args"]["name"] == path.stem
        for callback in trainer.pop("callbacks") or []:
            assert callback["init_args"].get("loss_fn") == "compute_loss"
        trainer["logger"]["init_args"].pop("name")
        budgets.append(config)
    assert all(budget == budgets[0] for budget in budgets)


def test_callback_named_by_class_name_alone(reviews: Path, tmp_path: Path) -> None:
    short = '[{"class_path": "FGM", "init_args": {"epsilon": 0.2, "loss_fn": "compute_loss"}}]'
    none = next(path for path in CONFIGS if path.stem == "none")
    cli = run_fit(none, reviews, tmp_path, "--trainer.fast_dev_run", "true",
                  "--trainer.callbacks", short)
    [attack] = attacks(cli)
    assert type(attack).__name__ == "FGM" and attack.epsilon == 0.2
    assert attack.attacked_steps == 1


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_fast_dev_run_of_every_config(config: Path, reviews: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    # Configs that warm up without attack start at step 0 here: fast_dev_run is one step.
    start = [] if config.stem == "none" else ["--trainer.callbacks.init_args.start_step", "0"]
    cli = run_fit(config, reviews, tmp_path, "--trainer.fast_dev_run", "true", *start)

    assert cli.model.model.config.vocab_size == cli.datamodule.vocab_size
    assert cli.model.hparams["num_labels"] == 2 and cli.datamodule.label_names == ["好评", "差评"]
    expected = 0 if config.stem == "none" else 1
    assert sum(callback.attacked_steps for callback in attacks(cli)) == expected
    assert len(attacks(cli)) == expected
    assert "Test accuracy" in capsys.readouterr().out


def test_fit_writes_metrics_plot_labels_and_tokenizer(reviews: Path, tmp_path: Path) -> None:
    config = next(path for path in CONFIGS if path.stem == "fgm")
    run_fit(
        config, reviews, tmp_path, "--trainer.max_epochs", "2",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.log_every_n_steps", "1",
        "--trainer.callbacks.init_args.start_step", "1",  # the curves start unattacked
    )
    run_dir = tmp_path / "fgm" / "version_0"
    header = (run_dir / "metrics.csv").read_text(encoding="utf-8").splitlines()[0]
    for column in ("train/loss_step", "fgm/adv_loss", "val/acc", "val/f1", "test/acc"):
        assert column in header.split(",")
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert json.loads((run_dir / "labels.json").read_text(encoding="utf-8")) == ["好评", "差评"]
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    metrics = json.loads((run_dir / "test_metrics.json").read_text(encoding="utf-8"))
    assert 0 <= metrics["test/acc"] <= 1 and 0 <= metrics["test/f1"] <= 1


def test_manual_optimization_with_compute_loss(reviews: Path, tmp_path: Path) -> None:
    config = next(path for path in CONFIGS if path.stem == "pgd")
    cli = run_fit(
        config, reviews, tmp_path, "--model.automatic_optimization", "false",
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", "--trainer.logger", "false",
        "--plot_after_fit", "false", "--trainer.callbacks.init_args.start_step", "0",
    )
    assert not cli.model.automatic_optimization
    assert cli.trainer.global_step == 3
    assert attacks(cli)[0].attacked_steps == 3


def test_manual_optimization_refuses_training_step(reviews: Path, tmp_path: Path) -> None:
    config = next(path for path in CONFIGS if path.stem == "fgm")
    with pytest.raises(RuntimeError, match="compute_loss"):
        run_fit(
            config, reviews, tmp_path, "--model.automatic_optimization", "false",
            "--trainer.callbacks.init_args.loss_fn", "training_step",
            "--trainer.fast_dev_run", "true",
        )


def test_local_pretrained_folder_gives_tokenizer_and_weights(reviews: Path,
                                                             tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from examples.sentiment.tokenizer import build_char_tokenizer

    folder = tmp_path / "pretrained"
    tokenizer = build_char_tokenizer(["好棒喜欢推荐", "差烂失望难看"], min_frequency=1)
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, num_labels=2)
    saved = BertForSequenceClassification(config)
    saved.save_pretrained(str(folder))

    cli = main([
        "--config", str(CONFIGS[0]), "--data.path", str(reviews),
        "--data.tokenizer", str(folder), "--trainer.fast_dev_run", "true",
        "--trainer.enable_progress_bar", "false",
    ], run=False)
    assert cli.model.hparams["pretrained"] == str(folder)
    assert cli.model.model.training  # from_pretrained returns eval mode
    assert torch.equal(cli.model.model.get_input_embeddings().weight,
                       saved.get_input_embeddings().weight)
    cli.trainer.fit(cli.model, cli.datamodule)


def test_compare_quick_writes_table_and_chart(reviews: Path, tmp_path: Path) -> None:
    table, chart = compare.main([
        "--quick", "--out-dir", str(tmp_path / "docs"), f"--data.path={reviews}",
        "--data.batch_size=16", *TINY_MODEL,
    ])
    text = table.read_text(encoding="utf-8")
    assert "Smoke run" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    methods = [row.split("|")[1].strip() for row in rows]
    for name in ("none", "fgm", "fgsm", "pgd"):
        assert methods.count(name) == 2  # summary row and per-seed row
    fgm_row = next(row for row in rows if row.startswith("| fgm | FGM("))
    assert "[" in fgm_row.split("|")[7]  # a bootstrap interval
    assert chart.stat().st_size > 10_000
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_compare_resumes_from_saved_outcomes(reviews: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--quick", "--seeds", "1", "--out-dir", str(tmp_path / "docs"),
              "--saved", str(tmp_path / "saved"), f"--data.path={reviews}",
              "--data.batch_size=16", *TINY_MODEL]
    compare.main([*common, "--methods", "none", "--save-checkpoints", str(tmp_path / "ckpt")])
    assert (tmp_path / "saved" / "none-seed1.json").is_file()
    assert (tmp_path / "ckpt" / "none-seed1.ckpt").is_file()
    first = (tmp_path / "docs" / "sentiment_comparison.md").read_text(encoding="utf-8")
    notes = f"{compare.NOTES_MARKER}\n\n## How the configs came to be\n"
    (tmp_path / "docs" / "sentiment_comparison.md").write_text(first + "\n" + notes,
                                                               encoding="utf-8")
    capsys.readouterr()

    table, _ = compare.main([*common, "--methods", "none", "fgm"])
    assert "1 run(s) found" in capsys.readouterr().out
    text = table.read_text(encoding="utf-8")
    row = next(line for line in first.splitlines() if line.startswith("| none | no attack"))
    assert row in text  # the saved run is reused as it was
    assert "| fgm | FGM(" in text
    assert "start_step" not in text  # a smoke run attacks from step 0, not the config's 300
    assert text.endswith(notes) and text.count(compare.NOTES_MARKER) == 1

    # Other overrides make other runs: nothing is reused.
    compare.main([*common, "--methods", "none", "--data.max_length=40"])
    assert "0 run(s) found" in capsys.readouterr().out


def test_paired_bootstrap_interval() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    baseline = rng.random((3, 400)) < 0.7
    better = baseline | (rng.random((3, 400)) < 0.2)
    diff, low, high = compare.paired_bootstrap(better, baseline, samples=500)
    assert diff == pytest.approx(better.mean() - baseline.mean())
    assert 0 < low < diff < high
    same = compare.paired_bootstrap(baseline, baseline, samples=100)
    assert same == (0.0, 0.0, 0.0)


def test_a_saved_outcome_is_not_reused_once_its_config_changed(tmp_path: Path) -> None:
    outcome = compare.RunOutcome("fgm", 1, 0.8, 0.79, np.array([True, False]), 1.0,
                                 "FGM(epsilon=0.02)", {})
    path = tmp_path / "fgm-seed1.json"
    config = {"trainer": {"callbacks": [{"init_args": {"epsilon": 0.02}}]}}
    outcome.save(path, ["--trainer.max_epochs", "1"], config)

    found = compare.RunOutcome.load(path, ["--trainer.max_epochs", "1"], config)
    assert found is not None and found.accuracy == 0.8
    changed = {"trainer": {"callbacks": [{"init_args": {"epsilon": 0.05}}]}}
    assert compare.RunOutcome.load(path, ["--trainer.max_epochs", "1"], changed) is None
    assert compare.RunOutcome.load(path, [], config) is None
