"""The documentation runs: its code blocks, its YAML, its argument tables and the site.

Python blocks (```python fences) of README.md and docs/**/*.md are executed:

- each block runs in a fresh namespace, in a fresh temporary working directory;
- a block whose first line starts with ``# continued`` runs after the last block that ran
  on the same page, in its namespace and directory (as a reader would paste them);
- a block whose first line is ``# not run`` is a fragment (it refers to the reader's own
  model, or needs several processes) and is skipped. Keep these few.

YAML blocks that configure ``lightning_adv`` callbacks through ``class_path`` build those
callbacks; the argument tables of the method pages must match the signatures; the API page
must cover every public name; and ``mkdocs build --strict`` must pass.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import lightning_adv

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*$")
NOT_RUN = "# not run"
CONTINUED = "# continued"
MAX_SKIPPED_SHARE = 0.25


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first code line
    lang: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"

    @property
    def first_line(self) -> str:
        return self.code.lstrip("\n").split("\n", 1)[0].strip()


@dataclass
class Chain:
    """A block that starts a namespace, and the ``# continued`` blocks after it."""

    blocks: list[Block] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.blocks[0].name


def read_blocks(page: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = page.read_text(encoding="utf-8").split("\n")
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        indent, lang = match["indent"], match["lang"]
        start = index + 1
        end = start
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = [line[len(indent):] if line.startswith(indent) else line
                for line in lines[start:end]]
        blocks.append(Block(page, start + 1, lang, "\n".join(body)))
        index = end + 1
    return blocks


def python_blocks() -> list[Block]:
    return [b for page in PAGES for b in read_blocks(page) if b.lang in ("python", "py")]


def chains() -> list[Chain]:
    found: list[Chain] = []
    last_on_page: dict[Path, Chain] = {}
    for block in python_blocks():
        if block.first_line.startswith(CONTINUED):
            chain = last_on_page.get(block.page)
            if chain is None:
                raise AssertionError(
                    f"{block.name}: a '# continued' block needs a block that runs before it "
                    "on the same page."
                )
            chain.blocks.append(block)
        elif not block.first_line.startswith(NOT_RUN):
            chain = Chain([block])
            found.append(chain)
            last_on_page[block.page] = chain
    return found


def run_block(block: Block, namespace: dict[str, Any]) -> None:
    # Leading newlines keep the line numbers of a traceback those of the Markdown file.
    source = "\n" * (block.line - 1) + block.code
    exec(compile(source, str(block.page), "exec"), namespace)


@pytest.mark.parametrize("chain", chains(), ids=lambda chain: chain.name)
def test_code_block_runs(chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    environment = dict(os.environ)  # e.g. PL_GLOBAL_SEED, set by seed_everything
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for block in chain.blocks:
                run_block(block, namespace)
    finally:
        os.environ.clear()
        os.environ.update(environment)


def test_few_blocks_are_skipped() -> None:
    blocks = python_blocks()
    skipped = [b.name for b in blocks if b.first_line.startswith(NOT_RUN)]
    assert len(blocks) >= 20, "the pages should carry runnable examples"
    assert len(skipped) <= MAX_SKIPPED_SHARE * len(blocks), (
        f"{len(skipped)} of {len(blocks)} Python blocks are marked '# not run': {skipped}. "
        "Make them runnable (a tiny model from a config, a few steps)."
    )


# -- YAML blocks ----------------------------------------------------------------------------


def _callback_specs(node: Any) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    if isinstance(node, dict):
        path = node.get("class_path")
        if isinstance(path, str) and (path.startswith("lightning_adv.")
                                      or path in lightning_adv.__all__):
            specs.append(node)
        for value in node.values():
            specs.extend(_callback_specs(value))
    elif isinstance(node, list):
        for value in node:
            specs.extend(_callback_specs(value))
    return specs


YAML_BLOCKS = [b for page in PAGES for b in read_blocks(page) if b.lang in ("yaml", "yml")]


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=lambda block: block.name)
def test_yaml_block_builds_its_callbacks(block: Block) -> None:
    config = yaml.safe_load(block.code)
    for spec in _callback_specs(config):
        module_name, _, class_name = spec["class_path"].rpartition(".")
        module = importlib.import_module(module_name or "lightning_adv")
        callback = getattr(module, class_name)(**spec.get("init_args", {}))
        for name, value in spec.get("init_args", {}).items():
            assert getattr(callback, name) == value, f"{block.name}: {name}"


# -- argument tables of the method pages ----------------------------------------------------

METHOD_PAGES = {
    "index": lightning_adv.AdversarialCallback,
    "fgm": lightning_adv.FGM,
    "fgsm": lightning_adv.FGSM,
    "pgd": lightning_adv.PGD,
    "freelb": lightning_adv.FreeLB,
    "smart": lightning_adv.SMART,
    "vat": lightning_adv.VAT,
    "r3f": lightning_adv.R3F,
    "awp": lightning_adv.AWP,
}
HEADER = re.compile(r"^\|\s*argument\s*\|\s*default\s*\|", re.IGNORECASE)
ROW = re.compile(r"^\|\s*`(?P<name>\w+)`\s*\|\s*`(?P<default>[^`]*)`\s*\|")


def documented_defaults(page: Path) -> dict[str, Any]:
    """Rows ``| `name` | `default` | ...`` of the tables headed ``| argument | default |``."""
    rows: dict[str, Any] = {}
    in_table = False
    for line in page.read_text(encoding="utf-8").split("\n"):
        line = line.strip()
        if not line.startswith("|"):
            in_table = False
        elif HEADER.match(line):
            in_table = True
        elif in_table and (match := ROW.match(line)) is not None:
            rows[match["name"]] = ast.literal_eval(match["default"])
    return rows


@pytest.mark.parametrize("stem", sorted(METHOD_PAGES))
def test_method_page_lists_every_argument_with_its_default(stem: str) -> None:
    cls = METHOD_PAGES[stem]
    documented = documented_defaults(DOCS / "methods" / f"{stem}.md")
    parameters = {
        name: p for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    missing = sorted(set(parameters) - set(documented))
    assert not missing, f"docs/methods/{stem}.md has no table row for {missing}"
    shared = inspect.signature(lightning_adv.AdversarialCallback.__init__).parameters
    for name, value in documented.items():
        parameter = parameters.get(name, shared.get(name))
        assert parameter is not None, f"docs/methods/{stem}.md documents unknown `{name}`"
        assert parameter.default == value, (
            f"docs/methods/{stem}.md: `{name}` defaults to {parameter.default!r}, "
            f"the page says {value!r}"
        )


def test_api_page_covers_every_public_name() -> None:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^::: ([\w.]+)", text, flags=re.MULTILINE))
    wanted = {f"lightning_adv.{name}" for name in lightning_adv.__all__}
    wanted |= {"lightning_adv.functional", "lightning_adv.monitor.CollapseMonitor"}
    assert not wanted - listed, f"docs/api.md lacks {sorted(wanted - listed)}"


# -- the site -------------------------------------------------------------------------------


def test_site_builds_strict(tmp_path: Path) -> None:
    missing = [name for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers")
               if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the docs tooling is not installed ({', '.join(missing)}); "
                    "install the `dev` extra: pip install -e '.[dev]'")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()
