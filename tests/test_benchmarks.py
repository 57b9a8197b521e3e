"""The benchmark scripts' ``--quick`` modes run and write what they promise.

The three scripts run side by side, each in its own process and output folder; the tests
then read the Markdown section and the figure each one wrote.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks._common import write_section

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Script:
    module: str
    section: str
    figure: str
    first_column: str


SCRIPTS = {
    "step_time": Script("benchmarks.step_time", "step-time", "step_time.png", "method"),
    "memory": Script("benchmarks.memory", "memory", "memory.png", "method"),
    "robustness": Script("benchmarks.robustness", "robustness", "robustness.png", "method"),
}


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Start every script's ``--quick`` run at once; wait for all; yield their folders."""
    folders = {name: tmp_path_factory.mktemp(name) for name in SCRIPTS}
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", script.module, "--quick", "--out", str(folders[name])],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, script in SCRIPTS.items()
    }
    failures = []
    for name, process in processes.items():
        try:
            _, stderr = process.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            failures.append(f"{name}: timed out")
            continue
        if process.returncode != 0:
            failures.append(f"{name} exited with {process.returncode}:\n{stderr[-4000:]}")
    if failures:
        pytest.fail("\n\n".join(failures))
    yield folders


def section(doc: Path, name: str) -> str:
    text = doc.read_text(encoding="utf-8")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    assert text.count(start) == 1 and text.count(end) == 1
    return text.split(start, 1)[1].split(end, 1)[0]


def table(text: str, first_column: str) -> list[dict[str, str]]:
    """The Markdown table of ``text`` whose header starts with ``first_column``."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    header_index = next(i for i, line in enumerate(lines)
                        if line.strip("| ").startswith(first_column))
    header = [cell.strip() for cell in lines[header_index].strip("|").split("|")]
    assert set(lines[header_index + 1].replace("|", "").replace(":", "")) == {"-"}
    rows = []
    for line in lines[header_index + 2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def number(cell: str) -> float:
    """The first number of a cell such as ``1.234``, ``+4.7`` or ``53.33 ± 1.20``."""
    return float(cell.replace("**", "").split()[0])


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_quick_run_writes_section_and_figure(quick_runs: dict[str, Path], name: str) -> None:
    script = SCRIPTS[name]
    folder = quick_runs[name]
    text = section(folder / "benchmarks.md", script.section)
    assert f"(img/{script.figure})" in text
    assert table(text, script.first_column)
    assert_png(folder / "img" / script.figure)
    assert str(ROOT) not in (folder / "benchmarks.md").read_text(encoding="utf-8")


def test_step_time_table(quick_runs: dict[str, Path]) -> None:
    rows = table(section(quick_runs["step_time"] / "benchmarks.md", "step-time"), "method")
    labels = [row["method"] for row in rows]
    for expected in ("FGM", "FGSM", "PGD", "FreeLB", "SMART", "VAT", "R3F", "AWP",
                     "snippet FGM", "snippet PGD", "one extra pass (no attack)"):
        assert expected in labels
    for row in rows:
        assert number(row["ratio (median of pairs)"]) > 0
        assert number(row["s/step, no attack"]) > 0 and number(row["s/step, method"]) > 0
        assert number(row["floor (this run)"]) > 1
    judged = {row["method"]: row["met"] for row in rows if row["target"]}
    assert set(judged) == {"FGM", "PGD", "FreeLB", "SMART", "R3F", "AWP"}
    assert all(value in ("yes", "**no**") for value in judged.values())


def test_memory_table(quick_runs: dict[str, Path]) -> None:
    text = section(quick_runs["memory"] / "benchmarks.md", "memory")
    rows = {(row["method"], row["runner"]): row for row in table(text, "method")}
    assert set(rows) == {("no attack", "Lightning"), ("FGM", "Lightning"),
                         ("one extra pass (no attack)", "Lightning"),
                         ("one extra pass (no attack)", "plain PyTorch"),
                         ("snippet FGM", "plain PyTorch")}
    for row in rows.values():
        assert number(row["peak MB"]) > 50  # a Python process with torch loaded
        assert abs(number(row["kept per step, MB"])) < 1000
    assert number(rows[("no attack", "Lightning")]["over no attack, MB"]) == 0
    extra = rows[("one extra pass (no attack)", "Lightning")]
    assert number(extra["live tensors over one extra pass, MB"]) == 0
    # The tiny model's backup is a few KB; a second copy of a weight matrix would show.
    fgm_live = number(rows[("FGM", "Lightning")]["live tensors over one extra pass, MB"])
    assert 0 <= fgm_live < 0.5
    assert "snippet's FGM adds" in text and "FGM on the weight target holds" in text


def test_robustness_table(quick_runs: dict[str, Path]) -> None:
    text = section(quick_runs["robustness"] / "benchmarks.md", "robustness")
    rows = {row["method"]: row for row in table(text, "method")}
    assert set(rows) == {"none", "fgm"}
    for row in rows.values():
        clean, robust = number(row["clean accuracy %"]), number(row["robust % at ε"])
        assert 0 <= robust <= 100 and 0 <= clean <= 100
        assert number(row["robust % at 2ε"]) <= 100
    assert rows["fgm"]["target met"] in ("yes", "**no**")


def test_write_section_replaces_only_its_own(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    write_section(doc, "alpha", "first alpha")
    write_section(doc, "beta", "first beta")
    doc.write_text(doc.read_text(encoding="utf-8") + "\nA note someone added.\n",
                   encoding="utf-8")
    write_section(doc, "alpha", "second alpha")

    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks")
    assert "second alpha" in text and "first alpha" not in text
    assert "first beta" in text and "A note someone added." in text
    assert text.count("<!-- alpha:start -->") == 1
    assert text.index("alpha:end") < text.index("beta:start")


def test_robustness_scores_are_kept_and_reused_only_with_the_same_settings(
        tmp_path: Path) -> None:
    from benchmarks.robustness import Budget, Evaluated

    budget = Budget(0.02, "relative", "FGM epsilon")
    scores = Evaluated("fgm", "fgm-seed1", budget, 0.81, {budget.key: 0.75},
                       {budget.key: 0.8})
    settings = {"split": "val", "steps": 10, "max_batches": 8, "checkpoint": "a.ckpt"}
    path = tmp_path / "fgm-fgm-seed1.json"
    scores.save(path, settings)

    assert Evaluated.load(path, settings) == scores
    assert Evaluated.load(path, {**settings, "steps": 5}) is None
    assert Evaluated.load(tmp_path / "missing.json", settings) is None
    doubled = budget.doubled()
    more = Evaluated("fgm", "fgm-seed1", budget, 0.81, {doubled.key: 0.6}, {doubled.key: 0.8})
    assert scores.merged(more).robust == {budget.key: 0.75, doubled.key: 0.6}


def test_robustness_attacks_the_baseline_at_every_methods_budgets() -> None:
    from benchmarks.robustness import Budget, Target, needed_budgets

    small, large = Budget(0.02, "relative", "a"), Budget(0.1, "absolute", "b")
    targets = [Target("none", "1", small), Target("fgm", "1", small),
               Target("pgd", "1", large)]
    needed = needed_budgets(targets)

    keys = {t.method: {b.key for b in needed[t]} for t in targets}
    assert keys["fgm"] == {small.key, small.doubled().key}
    assert keys["pgd"] == {large.key, large.doubled().key}
    assert keys["none"] == keys["fgm"] | keys["pgd"]


def test_robustness_reads_a_training_budget_only_where_it_is_an_l2_size() -> None:
    from benchmarks.robustness import training_budget
    from lightning_adv import AWP, FGSM, R3F, SMART, FreeLB

    def budget(callback: object) -> tuple[float, str] | None:
        found = training_budget([callback])
        return None if found is None else found.key

    assert budget(FreeLB(max_norm=0.05, epsilon_scale="relative")) == (0.05, "relative")
    assert budget(SMART(epsilon=0.05, norm="l2")) == (0.05, "absolute")
    assert budget(SMART(epsilon=0.05)) is None  # an L-infinity ball
    assert budget(FGSM(epsilon=0.05, epsilon_scale="relative")) == (0.05, "relative")
    assert budget(FGSM(epsilon=0.001)) is None  # per entry: sqrt(hidden) times that per row
    assert budget(R3F(epsilon=0.05, epsilon_scale="relative")) == (0.05, "relative")
    assert budget(R3F(epsilon=0.05, epsilon_scale="relative", noise="uniform")) is None
    assert budget(AWP()) is None


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "--steps: must be a whole number of at least 1"),
    (["--max-batches", "0"], "--max-batches: must be a whole number of at least 1"),
    (["--epsilon", "-1"], "--epsilon: must be a finite number >= 0"),
    (["--checkpoints", "fgm"], "takes METHOD=PATH"),
    (["--checkpoints", "fgm=missing.ckpt"], "no checkpoint file at 'missing.ckpt'"),
    (["--checkpoints", "fgm=a.ckpt", "none=./a.ckpt"], "more than once"),
    (["--checkpoints", "fgm=a.ckpt", "--max-length", "64", "--data.path=x.csv"],
     "--max-length --data.path=x.csv: only used when training"),
])
def test_robustness_refuses_bad_arguments_before_any_work(
        argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.robustness import parse_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err
