"""Keep the docs' shown outputs and code links true to the code (`make docs-refresh`).

    python scripts/refresh_docs.py [PAGE.md ...]      # default: docs/*.md and README.md
    python scripts/refresh_docs.py --check            # report what is stale, change nothing

Two things in the pages are copies of what the code says, and this script rewrites both:

* **Shown outputs.** A ```python block that prints is followed by a ```text output block
  holding what it printed. The script runs each page's python blocks in order (as
  tests/test_docs.py does) and, for each block, keeps the shown output if it still
  matches (see `outputs_match`), else writes what the block printed now; it adds a
  missing output block and removes one whose block no longer prints.
* **Line anchors of code links.** A link whose text is a function or class name in
  backticks, [`route`](../nano_orion/moe.py#L43) or [`Orion.forward`](../nano_orion/model.py#L97),
  points at the line of that `def` or `class`; the script sets each `#L<n>` to where
  the name is defined now.

tests/test_docs.py checks both with the functions below and fails, naming this script,
when code changes have made a page stale. Review the diff the script makes before
committing it: an output that changed may mean the prose around it needs a new word too.
"""

import argparse
import contextlib
import io
import math
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*\n?", re.S | re.M)
OUTPUT_INFO = "text output"
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
CODE_NAME = re.compile(r"`(\w+(?:\.\w+)?)(?:\(\))?`")  # `name`, `name()`, `Class.method`
WILDCARD = "..."


# ---- the pages' blocks ------------------------------------------------------------------


class Block:
    """A runnable ```python block and the ```text output block right after it, if any."""

    def __init__(self, line, source, end, output=None, output_span=None):
        self.line = line  # 1-based line of the block's first line of code
        self.source = source
        self.end = end  # offset just past the python block's closing fence
        self.output = output  # the shown output's text, or None
        self.output_span = output_span  # (start, end) offsets of the whole output block

    def __repr__(self):
        return f"Block(line={self.line}, output={self.output!r})"


def parse(text: str) -> list[Block]:
    """The runnable python blocks of a page, each with the output block that follows it.

    An output block belongs to the python block it follows, with only blank lines between.
    Raises ValueError for an output block that follows no runnable python block.
    """
    blocks, previous = [], None
    for m in FENCE.finditer(text):
        info = m.group(1).strip()
        if info == OUTPUT_INFO:
            if previous is None or previous.output is not None or text[previous.end : m.start()].strip():
                line = text.count("\n", 0, m.start()) + 1
                raise ValueError(
                    f"line {line}: a ```{OUTPUT_INFO} block must directly follow the "
                    "```python block whose output it shows"
                )
            previous.output = m.group(2).rstrip("\n")
            previous.output_span = (m.start(), m.end())
            continue
        previous = None
        if info.split()[:1] == ["python"] and "no-run" not in info:
            line = text.count("\n", 0, m.start()) + 2
            previous = Block(line, m.group(2), m.end())
            blocks.append(previous)
    return blocks


@contextlib.contextmanager
def one_thread():
    """The snippets' models are tiny: one thread runs them fastest (and deterministically)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


TEMP_PATH = re.compile(re.escape(tempfile.gettempdir()) + r"/tmp[\w.-]+")
FINGERPRINT = re.compile(r"(?<=\.py-)[0-9a-f]{16}\b")  # data.prepare's cache folder: hashes the corpus's absolute path
TIMING = re.compile(r"\b(in|took) \d+(?:\.\d+)? (s|ms)\b")  # train.py's "saved the checkpoint to ... in 0.3 s"


def mask_nondeterministic(out: str) -> str:
    """What changes from run to run or from checkout to checkout is shown as the wildcard:
    temporary folders' names, the fingerprint in a prepared corpus's folder name, timings."""
    out = TEMP_PATH.sub(WILDCARD, out)
    out = FINGERPRINT.sub(WILDCARD, out)
    return TIMING.sub(rf"\1 {WILDCARD} \2", out)


def run_blocks(page: Path, blocks: list[Block]) -> list[str]:
    """Run the blocks in order in one namespace, from the repository root; what each printed."""
    outputs = []
    namespace = {"__name__": f"docs.{page.stem}"}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with one_thread():
            for block in blocks:
                code = compile(block.source, f"{shown(page)}:{block.line}", "exec")
                buffer = io.StringIO()
                with contextlib.redirect_stdout(buffer):
                    exec(code, namespace)
                outputs.append(mask_nondeterministic(buffer.getvalue()).rstrip("\n"))
    finally:
        os.chdir(cwd)
    return outputs


# ---- comparing outputs --------------------------------------------------------------------

NUMBER = re.compile(
    r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|(?<=[\w.])(?:\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
)
TOKEN = re.compile(r"\.\.\.|" + NUMBER.pattern + r"|[^\W\d_]+|\S")

LAST_DIGITS = 2  # two numbers printed to the same digit may differ by this many units in it


class Number:
    """A number as printed: its value, and the unit of its last digit (None for an integer)."""

    def __init__(self, text):
        self.text = text
        mantissa, _, exponent = text.replace(",", "").lower().partition("e")
        self.value = float(mantissa) * 10 ** int(exponent or 0)
        decimals = len(mantissa.partition(".")[2])
        self.unit = None if "." not in mantissa and not exponent else 10.0 ** (int(exponent or 0) - decimals)

    def matches(self, printed: "Number") -> bool:
        """Is this shown number what was printed? Integers (counts, ids, shapes) must be equal;
        other numbers must be shown to the digit they are printed to, and may differ from the
        printed one by LAST_DIGITS units in that digit (rounding noise between torch versions)."""
        if self.unit is None or printed.unit is None:
            return self.unit is None and printed.unit is None and self.value == printed.value
        if not math.isclose(self.unit, printed.unit, rel_tol=1e-9):
            return False  # 0.2 shown for a printed 0.26: a digit is missing, so drift could hide there
        return abs(self.value - printed.value) <= LAST_DIGITS * self.unit * (1 + 1e-9)


def tokens(text: str) -> list:
    """Words, single punctuation marks, numbers (as Number) and the wildcard; whitespace dropped."""
    out = []
    for m in TOKEN.finditer(text):
        t = m.group()
        out.append(Number(t) if t != WILDCARD and t[-1].isdigit() else t)
    return out


def same(a, b) -> bool:
    if isinstance(a, Number) and isinstance(b, Number):
        return a.matches(b)
    return not isinstance(a, Number) and not isinstance(b, Number) and a == b


def outputs_match(shown: str, printed: str) -> tuple[bool, str]:
    """Does the shown output say what the code printed? -> (ok, why not).

    Both are split into words, punctuation marks and numbers, whitespace ignored (so column
    alignment and line breaks may differ). Words and marks must be equal. Integers must be
    equal ("3 of 80" does not match "4 of 80"). A number with a decimal point or an exponent
    must be shown with the digits it is printed with, and may differ from the printed one by
    LAST_DIGITS units in its last digit: a shown 0.617 matches a printed 0.618 or 0.615, not
    0.612, 0.6171 or 0.62; a shown 0.2 does not match a printed 0.26. `...` in the shown output
    stands for any text (a temporary path, a timing), as in doctest.
    """
    want, got = tokens(shown), tokens(printed)
    if WILDCARD not in want:
        for i, (a, b) in enumerate(zip(want, got)):
            if not same(a, b):
                return False, f"token {i}: shown {text_of(a)!r}, printed {text_of(b)!r} (in ...{context(got, i)}...)"
        if len(want) != len(got):
            extra = got[len(want) :] if len(got) > len(want) else want[len(got) :]
            side = "printed" if len(got) > len(want) else "shown"
            return False, f"the {side} output goes on: {' '.join(text_of(t) for t in extra[:12])} ..."
        return True, ""
    # With wildcards: which positions of `got` can each prefix of `want` end at?
    states = {0}
    for a in want:
        if a == WILDCARD:
            states = set(range(min(states), len(got) + 1)) if states else set()
        else:
            states = {j + 1 for j in states if j < len(got) and same(a, got[j])}
        if not states:
            break
    if len(got) in states:
        return True, ""
    return False, "the printed output does not fit the shown one (with ... as a wildcard)"


def text_of(t) -> str:
    return t.text if isinstance(t, Number) else t


def context(toks, i, width=6) -> str:
    return " ".join(text_of(t) for t in toks[max(0, i - width) : i + width])


def check_outputs(page: Path, blocks: list[Block], printed: list[str]) -> list[str]:
    """What is wrong with the page's shown outputs, one message per block."""
    problems = []
    for block, out in zip(blocks, printed):
        where = f"{shown(page)}:{block.line}"
        if block.output is None and out:
            problems.append(f"{where}: the block prints but shows no ```{OUTPUT_INFO} block")
        elif block.output is not None and not out:
            problems.append(f"{where}: a ```{OUTPUT_INFO} block is shown, but the block prints nothing")
        elif block.output is not None:
            ok, why = outputs_match(block.output, out)
            if not ok:
                problems.append(
                    f"{where}: the shown output is not what the block prints: {why}\n--- printed now:\n{out}"
                )
    return problems


def with_outputs(text: str, blocks: list[Block], printed: list[str], keep_matching: bool = True) -> str:
    """The page with each block's output block written, kept (if it matches and keep_matching), or removed."""
    pieces, pos = [], 0
    for block, out in zip(blocks, printed):
        if block.output is not None:
            start, end = block.output_span
            pieces.append(text[pos : block.end])
            keep = out and keep_matching and outputs_match(block.output, out)[0]
            if keep:
                pieces.append(text[block.end : end])
            elif out:
                pieces.append(text[block.end : start] + f"```{OUTPUT_INFO}\n{out}\n```\n")
            # else: the block prints nothing now, so its output block (and the blank lines before it) go
            pos = end
        elif out:
            pieces.append(text[pos : block.end] + f"\n```{OUTPUT_INFO}\n{out}\n```\n")
            pos = block.end
    pieces.append(text[pos:])
    return "".join(pieces)


# ---- line anchors ----------------------------------------------------------------------


def definition_line(source: str, name: str) -> int | None:
    """1-based line of `def name` or `class name` (a top-level one first), or, for a name
    "Class.method", of `def method` inside `class Class`; None if there is none."""
    lines = source.splitlines()
    owner, _, member = name.rpartition(".")
    definition = re.compile(rf"(\s*)(?:async\s+)?(?:def|class)\s+{member}\b")
    if owner:
        top = definition_line(source, owner)
        if top is None:
            return None
        indent = len(lines[top - 1]) - len(lines[top - 1].lstrip())
        for n in range(top, len(lines)):
            line = lines[n]
            if line.strip() and len(line) - len(line.lstrip()) <= indent:
                return None  # past the end of the class
            if definition.match(line):
                return n + 1
        return None
    matches = [(n + 1, m.group(1)) for n, line in enumerate(lines) if (m := definition.match(line))]
    top_level = [n for n, indent in matches if not indent]
    return (top_level or [n for n, _ in matches] or [None])[0]


def code_links(page: Path, text: str):
    """(match, name, file path, anchor line or None) of each link [`name`](file.py[#Ln]) in prose."""
    prose = mask_code(text)
    for m in LINK.finditer(prose):
        label, target = m.groups()
        name = CODE_NAME.fullmatch(label)
        file, _, anchor = target.partition("#")
        if not name or name.group(1).endswith(".py") or not file.endswith(".py") or re.match(r"[a-z]+:", target):
            continue
        line = int(anchor[1:]) if re.fullmatch(r"L\d+", anchor) else None
        yield m, name.group(1), (page.parent / file).resolve(), line


def mask_code(text: str) -> str:
    """The page with its fenced blocks blanked out (same length), so links inside code are ignored."""
    return FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)


def shown(path: Path) -> str:
    """A path as messages name it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def check_anchors(page: Path, text: str) -> list[str]:
    problems = []
    for m, name, path, line in code_links(page, text):
        where = f"{shown(page)}: [{m.group(1)}]({m.group(2)})"
        if not path.exists():
            continue  # test_links_resolve reports it
        want = definition_line(path.read_text(), name)
        if want is None:
            problems.append(f"{where}: no def or class {name} in {shown(path)}")
        elif line != want:
            problems.append(
                f"{where}: {name} is defined at line {want}, the link says {'no line' if line is None else line}"
            )
    return problems


def with_anchors(page: Path, text: str) -> str:
    pieces, pos = [], 0
    for m, name, path, line in code_links(page, text):
        want = definition_line(path.read_text(), name) if path.exists() else None
        if want is None or want == line:
            continue
        target = m.group(2).partition("#")[0] + f"#L{want}"
        start, end = m.span(2)
        pieces += [text[pos:start], target]
        pos = end
    return "".join(pieces) + text[pos:]


# ---- command line -----------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pages", nargs="*", type=Path, help="pages to refresh (default: docs/*.md and README.md)")
    parser.add_argument("--check", action="store_true", help="only report what is stale; exit 1 if anything is")
    parser.add_argument("--no-run", action="store_true", help="refresh the line anchors only (fast)")
    parser.add_argument(
        "--rewrite",
        action="store_true",
        help="write every output as printed now, also those that still match (after changing how a "
        "snippet formats its numbers); wildcards (...) other than those the test puts in itself "
        "(temporary paths, fingerprints, timings) are lost",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # the snippets import nano_orion and train.py from the checkout
    stale = False
    for page in [p.resolve() for p in args.pages] or PAGES:
        text = page.read_text()
        problems = check_anchors(page, text)
        new = with_anchors(page, text)
        if not args.no_run:
            blocks = parse(new)
            printed = run_blocks(page, blocks)
            problems += check_outputs(page, blocks, printed)
            new = with_outputs(new, blocks, printed, keep_matching=not args.rewrite)
        for p in problems:
            print(p.splitlines()[0])
        stale |= bool(problems)
        if not args.check and new != text:
            page.write_text(new)
            print(f"rewrote {shown(page)}")
    if args.check and stale:
        sys.exit(1)


if __name__ == "__main__":
    main()
