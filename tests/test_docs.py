"""The docs are tested like code, so that they never rot.

* Every ```python block of docs/*.md and README.md runs, the blocks of one file in order
  in one shared namespace, with the repository root as the working directory: one test
  case per file. A block fenced as ```python no-run is shown but not run (for GPU-only or
  full-size examples); docs/README.md states the convention.
* What a block prints is shown under it in a ```text output block, and must match what it
  prints now (numbers shown with the digits they are printed with, to two units in the
  last of them; `...` stands for any text). A block that prints shows its output; one that
  prints nothing shows none.
* Every relative link in those files points at a file that exists (and a .md#anchor link at
  a heading of that page), and a link whose text is a `name` pointing at a .py file names a
  function or class defined in that file, at the line its #L<n> anchor gives.
* docs/README.md lists every walkthrough, in reading order, and each walkthrough opens with
  what you will learn.

`make docs-refresh` (scripts/refresh_docs.py, whose functions these tests use) rewrites the
shown outputs and the line anchors from the code.
"""

import re
from pathlib import Path

import pytest

from conftest import load_script

refresh = load_script("scripts/refresh_docs.py")

ROOT, PAGES = refresh.ROOT, refresh.PAGES  # the pages make docs-refresh rewrites
DOCS = PAGES[:-1]  # docs/*.md (the last page is README.md)
WALKTHROUGHS = [p for p in DOCS if re.match(r"\d\d_", p.name)]
LINK = refresh.LINK
STALE = "; `make docs-refresh` rewrites outputs and line anchors from the code (review its diff)"


def test_parse_finds_runnable_blocks_and_their_outputs():
    text = (
        "intro\n```python\nx = 1\nprint(x)\n```\n\n```text output\n1\n```\n"
        "```python no-run\nboom()\n```\n```bash\nls\n```\n```python\ny = x\n```\n"
    )
    blocks = refresh.parse(text)
    assert [(b.line, b.source, b.output) for b in blocks] == [(3, "x = 1\nprint(x)\n", "1"), (17, "y = x\n", None)]


def test_parse_rejects_an_output_block_that_follows_no_python_block():
    with pytest.raises(ValueError, match="line 4: a ```text output block must directly follow"):
        refresh.parse("```bash\nls\n```\n```text output\nfoo\n```\n")
    with pytest.raises(ValueError, match="line 5"):
        refresh.parse("```python\nprint(1)\n```\nprose\n```text output\n1\n```\n")


@pytest.mark.parametrize(
    "shown, printed",
    [
        ("experts [7, 3], weights [0.617, 0.383]", "experts [7, 3], weights [0.617, 0.383]"),
        ("weights [0.617, 0.383]", "weights [0.618, 0.381]"),  # a unit or two in the last digit
        ("loss 4.27", "loss 4.25"),
        ("a   b\n   c 1.5e-05", "a b c 1.6e-05"),  # whitespace and line breaks are layout
        ("48,177,356,800 parameters", "48177356800 parameters"),
        ("reading .../tiny.json: done", "reading /tmp/tmpab12_x/tiny.json: done"),  # ... is a wildcard
        ("", ""),
    ],
)
def test_outputs_match_tolerates_rounding_noise_in_the_last_digit(shown, printed):
    assert refresh.outputs_match(shown, printed) == (True, "")


@pytest.mark.parametrize(
    "shown, printed, why",
    [
        ("weights [0.617, 0.383]", "weights [0.612, 0.383]", "shown '0.617', printed '0.612'"),  # a wrong number
        ("weights [0.617, 0.383]", "weights [0.383, 0.617]", "shown '0.617', printed '0.383'"),
        ("experts [7, 3]", "experts [7, 2]", "shown '3', printed '2'"),  # integers are exact
        ("would drop 3 of 80", "would drop 3 of 81", "shown '80', printed '81'"),
        ("<0xE4> <0xBB>", "<0xE4> <0xBC>", "shown 'xBB', printed 'xBC'"),
        ("layer 0 loss 2.0", "layer 0 gain 2.0", "shown 'loss', printed 'gain'"),
        ("a b", "a b c", "the printed output goes on: c"),
        ("a b c", "a b", "the shown output goes on: c"),
        ("x ... y 3", "x 1 2 y 4", "does not fit"),
        ("probs [0.2, 0.5]", "probs [0.26, 0.5]", "shown '0.2', printed '0.26'"),  # a digit not shown hides drift
        ("probs [0.0, 0.5]", "probs [0.19, 0.5]", "shown '0.0', printed '0.19'"),
        ("weights [0.617]", "weights [0.6171]", "shown '0.617', printed '0.6171'"),  # shown to fewer digits
        ("weights [0.62]", "weights [0.617]", "shown '0.62', printed '0.617'"),
        ("row sums 1.0000 1.0000", "row sums 1.2000 0.8000", "shown '1.0000', printed '1.2000'"),
        ("loss 4.27", "loss 4.30", "shown '4.27', printed '4.30'"),  # three units off
        ("2.0 layers", "2 layers", "shown '2.0', printed '2'"),
    ],
)
def test_outputs_match_catches_a_wrong_output(shown, printed, why):
    ok, message = refresh.outputs_match(shown, printed)
    assert not ok and why in message


def test_what_changes_between_runs_and_checkouts_is_masked_as_the_wildcard():
    import tempfile

    printed = (
        f"preparing {tempfile.gettempdir()}/tmpab_12x/data/argparse.py-0123456789abcdef: 1 documents\n"
        "step 20: saved the checkpoint to out in 0.3 s; loss 4.31"
    )
    assert refresh.mask_nondeterministic(printed) == (
        "preparing .../data/argparse.py-...: 1 documents\nstep 20: saved the checkpoint to out in ... s; loss 4.31"
    )


def test_check_outputs_wants_every_print_shown_and_nothing_else():
    page = refresh.ROOT / "docs" / "example.md"  # only names the page in messages
    text = (
        "```python\nprint(1)\n```\n\n```python\nx = 2\n```\n\n```text output\n2\n```\n"
        "```python\nprint(3)\n```\n\n```text output\n3\n```\n"
    )
    blocks = refresh.parse(text)
    printed = refresh.run_blocks(page, blocks)
    assert printed == ["1", "", "3"]
    problems = refresh.check_outputs(page, blocks, printed)
    assert len(problems) == 2
    assert "docs/example.md:2: the block prints but shows no ```text output block" in problems[0]
    assert "docs/example.md:6: a ```text output block is shown, but the block prints nothing" in problems[1]
    fixed = refresh.with_outputs(text, blocks, printed)
    assert fixed == (
        "```python\nprint(1)\n```\n\n```text output\n1\n```\n\n```python\nx = 2\n```\n"
        "```python\nprint(3)\n```\n\n```text output\n3\n```\n"
    )
    assert refresh.check_outputs(page, refresh.parse(fixed), printed) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_snippets_run_and_print_what_they_show(page):
    blocks = refresh.parse(page.read_text())
    if page in WALKTHROUGHS:
        assert blocks, f"{page.name} has no runnable python block"
    printed = refresh.run_blocks(page, blocks)
    problems = refresh.check_outputs(page, blocks, printed)
    assert not problems, "\n\n".join(problems) + "\n" + STALE


def test_definition_line_and_anchor_checks(tmp_path):
    source = (
        "import x\n\n\nclass A:\n    def f(self):\n        pass\n\n    def g(self):\n"
        "        def f():\n            pass\n\n\ndef f():\n    pass\n"
    )
    assert refresh.definition_line(source, "A") == 4
    assert refresh.definition_line(source, "f") == 13  # the top-level one
    assert refresh.definition_line(source, "A.f") == 5 and refresh.definition_line(source, "A.g") == 8
    assert refresh.definition_line(source, "A.h") is None and refresh.definition_line(source, "B.f") is None
    (tmp_path / "m.py").write_text(source)
    page = tmp_path / "page.md"
    text = "[`A.g`](m.py#L8), [`f`](m.py#L3), [`A`](m.py), [the file](m.py)\n```python\n# [`f`](m.py)\n```\n"
    problems = refresh.check_anchors(page, text)
    assert [p.split(": ", 2)[-1] for p in problems] == [
        "f is defined at line 13, the link says 3",
        "A is defined at line 4, the link says no line",
    ]
    assert refresh.with_anchors(page, text) == text.replace("#L3", "#L13").replace("(m.py),", "(m.py#L4),")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_code_links_point_at_the_definition_line(page):
    problems = refresh.check_anchors(page, page.read_text())
    assert not problems, "\n".join(problems) + "\n" + STALE


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page):
    prose = refresh.mask_code(page.read_text())  # links inside code blocks are code
    for text, target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web links and in-page anchors
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve()
        assert path.exists(), f"{page.name}: link [{text}]({target}) points at a missing file"
        if anchor and path.suffix == ".md":
            assert anchor in heading_anchors(path), f"{page.name}: link [{text}]({target}): no such heading in {file}"


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as -."""
    headings = re.findall(r"^#+\s+(.*?)\s*$", refresh.mask_code(page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_heading_anchors():
    assert {"the-real-thing-trainpy", "what-goes-wrong-without-it"} <= heading_anchors(
        ROOT / "docs" / "08_training.md"
    ) | heading_anchors(ROOT / "docs" / "05_moe.md")


def test_index_lists_every_walkthrough_in_order():
    index = (ROOT / "docs" / "README.md").read_text()
    listed = "\n".join(re.findall(r"^\d+\. .*$", index, re.M))  # the numbered reading list
    linked = [t for _, t in LINK.findall(listed) if re.match(r"\d\d_.*\.md$", t)]
    assert linked == [p.name for p in WALKTHROUGHS]


def test_walkthroughs_open_with_what_you_will_learn():
    for page in WALKTHROUGHS:
        head = page.read_text()[:1500]
        assert "What you will learn" in head, f"{page.name} does not open with 'What you will learn'"


def test_readme_speed_tables_copy_the_committed_bench_run():
    """The README's `make bench` tables are one committed run (docs/runs/bench/make-bench.txt):
    each roofline row is a line of its output, and each race figure (a ratio, tok/s, ms) one
    of its numbers. Changing a digit in the README fails."""
    readme = (ROOT / "README.md").read_text()
    log = (ROOT / "docs/runs/bench/make-bench.txt").read_text()
    section = readme[readme.index("`make bench` races") : readme.index("On a GPU, with a python")]
    rows = [line for line in section.splitlines() if re.match(r"\| \d \| \w+ \| (eager|compiled) \| ", line)]
    assert len(rows) == 12 and all(row in log.splitlines() for row in rows)
    race = [line for line in section.splitlines() if line.startswith("| decode") or line.startswith("| prefill")]
    figures = [n for line in race for n in re.findall(r"\d[\d,]*\.\d+", line)]
    printed = {n.replace(",", "") for n in re.findall(r"\d[\d,]*\.\d+", log)}
    assert len(figures) == 24 and not [n for n in figures if n.replace(",", "") not in printed]


def test_readme_llama_cpp_table_copies_the_committed_runs():
    """The README's llama.cpp table: each llama.cpp figure is the best repetition its committed
    log records, each nano_orion figure the compiled row of make-bench.txt, each ratio theirs."""
    readme = (ROOT / "README.md").read_text()
    bench = (ROOT / "docs/runs/bench/make-bench.txt").read_text()
    llama_cpp = (ROOT / "docs/runs/bench/llama-cpp.txt").read_text()
    ours = {
        (int(threads), dtype): float(tok_s.replace(",", ""))
        for threads, dtype, tok_s in re.findall(r"^\| (\d) \| (\w+) \| compiled \| ([\d,]+) \|", bench, re.M)
    }
    best = {}  # (threads, llama.cpp dtype) -> the fastest of its repetitions
    for dtype, threads, samples, stated in re.findall(
        r"^(\w+) threads (\d) tg128: ([\d., ]+); mean [\d.]+, best ([\d.]+) tok/s", llama_cpp, re.M
    ):
        best[int(threads), dtype] = max(float(x) for x in samples.split(", "))
        assert f"{best[int(threads), dtype]:.1f}" == stated
    rows = re.findall(r"^\| (\d) \| (f32|f16|q8_0) \| ([\d,.]+) \| (\w+) \| ([\d,]+) \| ([\d.]+) \|$", readme, re.M)
    assert len(rows) == 6
    for threads, theirs, their_tok_s, mine, my_tok_s, ratio in rows:
        their_tok_s, my_tok_s = float(their_tok_s.replace(",", "")), float(my_tok_s.replace(",", ""))
        assert their_tok_s == best[int(threads), theirs] and my_tok_s == ours[int(threads), mine]
        assert ratio == f"{my_tok_s / their_tok_s:.2f}"
