"""The docs are tested like code, so that they never rot.

* Every ```python block of docs/*.md and README.md runs, the blocks of one file in order
  in one shared namespace, with the repository root as the working directory: one test
  case per file. A block fenced as ```python no-run is shown but not run (for GPU-only or
  full-size examples); docs/README.md states the convention.
* Every relative link in those files points at a file that exists, and a link whose text
  is a `name` pointing at a .py file names a function or class defined in that file.
* docs/README.md lists every walkthrough, in reading order.
"""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = DOCS + [ROOT / "README.md"]
WALKTHROUGHS = [p for p in DOCS if re.match(r"\d\d_", p.name)]

FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, source) of each runnable ```python block; ```python no-run blocks are left out."""
    blocks = []
    for m in FENCE.finditer(text):
        if "no-run" in m.group(1):
            continue
        line = text.count("\n", 0, m.start()) + 2  # the block's first line of code
        blocks.append((line, m.group(2)))
    return blocks


def test_python_blocks_finds_runnable_blocks_and_skips_no_run():
    text = "intro\n```python\nx = 1\n```\n```python no-run\nboom()\n```\n```bash\nls\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (12, "y = x\n")]


@pytest.fixture
def one_thread():
    """The snippets' models are tiny: one thread runs them fastest, and leaves the other cores alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_snippets_run(page, monkeypatch, one_thread):
    blocks = python_blocks(page.read_text())
    if page in WALKTHROUGHS:
        assert blocks, f"{page.name} has no runnable python block"
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": f"docs.{page.stem}"}
    for line, source in blocks:
        code = compile(source, f"{page.relative_to(ROOT)}:{line}", "exec")
        exec(code, namespace)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page):
    prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # links inside code blocks are code
    for text, target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web links and in-page anchors
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: link [{text}]({target}) points at a missing file"
        name = re.fullmatch(r"`(\w+)(\(\))?`", text)
        if name and path.suffix == ".py":
            defined = re.search(rf"^\s*(def|class)\s+{name.group(1)}\b", path.read_text(), re.M)
            assert defined, f"{page.name}: [{text}]({target}): no def or class {name.group(1)} in {target}"


def test_index_lists_every_walkthrough_in_order():
    index = (ROOT / "docs" / "README.md").read_text()
    linked = [t for _, t in LINK.findall(index) if re.match(r"\d\d_.*\.md$", t)]
    assert linked == [p.name for p in WALKTHROUGHS]


def test_walkthroughs_open_with_what_you_will_learn():
    for page in WALKTHROUGHS:
        head = page.read_text()[:1500]
        assert "What you will learn" in head, f"{page.name} does not open with 'What you will learn'"
