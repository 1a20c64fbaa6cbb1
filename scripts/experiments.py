"""What the experts buy, measured: the training runs and the routing record of walkthrough 11.

    python scripts/experiments.py train [--out out/experiments] [--jobs 2]
    python scripts/experiments.py specialisation --ckpt out/demo [--text docs/corpus/argparse.py]

`train` trains RUNS on the demo corpus (the demo's data, settings and seed; only the model's
feed-forward part changes), JOBS at a time with one thread each, and copies each run's
log.jsonl and config.json into docs/runs/experiments/<name>/. `specialisation` routes a file of
Python through a checkpoint and writes, per layer, how the tokens of each kind (keywords,
identifiers, ...) are shared among the experts: docs/runs/demo/specialisation.json.
`make experiments` does both (after `make demo`).
"""

import argparse
import io
import json
import keyword
import re
import shutil
import subprocess
import sys
import tokenize
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nano_orion import OrionConfig  # noqa: E402

RUNS_DIR = ROOT / "docs" / "runs" / "experiments"
# The demo's MoE layer is 8 experts of ffn_dim 256, top-2: each token goes through 2 x 256 =
# 512 hidden units of the 8 x 256 = 2048 the layer holds. Every run below is the toy preset
# with its feed-forward part changed.
RUNS = {
    "dense-active": dict(n_experts=1, top_k=1, ffn_dim=512),  # dense, the MoE's active size
    "dense-total": dict(n_experts=1, top_k=1, ffn_dim=2048),  # dense, the MoE's total size
    "moe-8x256-top2": dict(n_experts=8, top_k=2, ffn_dim=256),  # the demo's MoE
    "moe-8x512-top1": dict(n_experts=8, top_k=1, ffn_dim=512),  # top-1, the same active size
    "moe-4x256-top2": dict(n_experts=4, top_k=2, ffn_dim=256),  # 4 experts, the same active size
    "moe-16x256-top2": dict(n_experts=16, top_k=2, ffn_dim=256),  # 16 experts, the same active size
}
# make demo's training settings (Makefile: DEMO_TRAIN_ARGS), evaluated every 50 steps
TRAIN_ARGS = [
    "--max-iters",
    "300",
    "--batch-size",
    "16",
    "--block-size",
    "128",
    "--lr",
    "3e-3",
    "--warmup-iters",
    "30",
    "--eval-interval",
    "50",
    "--device",
    "cpu",
    "--threads",
    "1",
]
ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def train(name: str, out: Path) -> str:
    """Train one run with train.py in its own process; -> its name, once its files are copied."""
    import os

    config = OrionConfig.preset("toy", **RUNS[name])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(config.to_dict()))
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(out / f"{name}.json"),
        "--out-dir",
        str(out / name),
        *TRAIN_ARGS,
        "--overwrite",
    ]
    with open(out / f"{name}.txt", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT, check=True)
    (RUNS_DIR / name).mkdir(parents=True, exist_ok=True)
    for file in ("log.jsonl", "config.json"):
        shutil.copy(out / name / file, RUNS_DIR / name / file)
    return name


# ---- what kind of token each piece is -----------------------------------------------------

KINDS = ("keyword", "identifier", "indentation and spaces", "punctuation", "digits", "strings", "comments")


# From Python 3.12, tokenize splits an f-string into its parts (and 3.14 a t-string): the whole
# literal, from its start to its matching end, counts as a string, as in earlier Pythons.
STRING_STARTS = {getattr(tokenize, n) for n in ("FSTRING_START", "TSTRING_START") if hasattr(tokenize, n)}
STRING_ENDS = {getattr(tokenize, n) for n in ("FSTRING_END", "TSTRING_END") if hasattr(tokenize, n)}


def char_kinds(source: str) -> list[str]:
    """The kind of every character of a Python source, from Python's own tokenizer: keywords,
    identifiers (other names), numbers ("digits"), string literals (f-strings whole), operators
    and brackets ("punctuation"), comments; whitespace and newlines are "indentation and spaces"."""
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(row_col):
        return starts[row_col[0] - 1] + row_col[1]

    kinds = ["indentation and spaces"] * len(source)
    depth, literal_start = 0, None  # inside how many f-strings, and where the outermost began
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in STRING_STARTS:
            depth += 1
            literal_start = offset(tok.start) if depth == 1 else literal_start
            continue
        if tok.type in STRING_ENDS:
            depth -= 1
            if depth == 0:
                kinds[literal_start : offset(tok.end)] = ["strings"] * (offset(tok.end) - literal_start)
            continue
        if depth:
            continue
        if tok.type == tokenize.NAME:
            kind = "keyword" if keyword.iskeyword(tok.string) or keyword.issoftkeyword(tok.string) else "identifier"
        elif tok.type == tokenize.NUMBER:
            kind = "digits"
        elif tok.type == tokenize.STRING:
            kind = "strings"
        elif tok.type == tokenize.OP:
            kind = "punctuation"
        elif tok.type == tokenize.COMMENT:
            kind = "comments"
        else:
            continue
        kinds[offset(tok.start) : offset(tok.end)] = [kind] * (offset(tok.end) - offset(tok.start))
    return kinds


def piece_kinds(tokenizer, source: str) -> tuple[list[int], list[str]]:
    """The source's token ids and each piece's kind: that of its first character that is not
    whitespace (a piece of spaces only is "indentation and spaces"). A piece's characters are
    found by laying the pieces' bytes end to end over the source's UTF-8 bytes."""
    ids = tokenizer.encode(source)
    surfaces = []
    for i in ids:
        piece = tokenizer.sp.id_to_piece(i)
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        surfaces.append(bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode())
    data = source.encode()
    joined = b"".join(surfaces)
    prefix = len(joined) - len(data)  # sentencepiece's dummy prefix: a space before the text
    if joined[prefix:] != data or joined[:prefix].strip():
        raise ValueError("the tokenizer does not keep the text as is; its pieces cannot be placed on the source")
    char_at = [0] * (len(data) + 1)  # byte offset -> index of the character it belongs to
    position = 0
    for n, ch in enumerate(source):
        for _ in range(len(ch.encode())):
            char_at[position] = n
            position += 1
    char_at[len(data)] = len(source)
    chars, kinds, start = char_kinds(source), [], -prefix
    for surface in surfaces:
        begin, end = max(start, 0), max(start + len(surface), 0)
        span = range(char_at[begin], char_at[end]) if end > begin else range(0)
        kinds.append(next((chars[c] for c in span if not source[c].isspace()), "indentation and spaces"))
        start += len(surface)
    return ids, kinds


def specialisation(checkpoint: Path, text: Path, block: int = 256) -> dict:
    """Route the text through the checkpoint in blocks of `block` tokens; per layer and kind of
    token, how many tokens of that kind there are and the share of their routed slots each
    expert receives."""
    import torch

    import nano_orion

    model, tokenizer = nano_orion.load(checkpoint)
    ids, kinds = piece_kinds(tokenizer, text.read_text())
    cfg = model.config
    kind_index = torch.tensor([KINDS.index(k) for k in kinds])
    # The control: the same tokens grouped by something routing should not care about, their
    # position modulo len(KINDS), so that its groups are as many as the kinds.
    control_index = torch.arange(len(ids)) % len(KINDS)
    counts = torch.zeros(2, cfg.n_layers, len(KINDS), cfg.n_experts)
    with torch.no_grad():
        for start in range(0, len(ids), block):
            model(torch.tensor([ids[start : start + block]]))
            for layer, (_, experts) in enumerate(model.routing()):
                for c, index in enumerate((kind_index, control_index)):
                    k = index[start : start + block].repeat_interleave(cfg.top_k)
                    counts[c, layer].index_put_((k, experts.flatten()), torch.ones(len(k)), accumulate=True)
    return {
        "checkpoint": checkpoint.name,
        "text": str(text.relative_to(ROOT)) if text.is_relative_to(ROOT) else str(text),
        "n_experts": cfg.n_experts,
        "top_k": cfg.top_k,
        "kinds": list(KINDS),
        "tokens": torch.bincount(kind_index, minlength=len(KINDS)).tolist(),
        "slots": counts[0].int().tolist(),  # slots[layer][kind][expert]: routed slots
        "control_tokens": torch.bincount(control_index, minlength=len(KINDS)).tolist(),
        "control_slots": counts[1].int().tolist(),
    }  # the same, by position modulo len(KINDS)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train RUNS and copy their logs into docs/runs/experiments/")
    t.add_argument("--out", type=Path, default=ROOT / "out" / "experiments")
    t.add_argument("--jobs", type=int, default=2, help="runs at a time (each uses one thread)")
    t.add_argument("--only", nargs="*", default=None, help="names of the runs to train (default: all)")
    s = sub.add_parser("specialisation", help="route a Python file through a checkpoint, per kind of token")
    s.add_argument("--ckpt", type=Path, default=ROOT / "out" / "demo")
    s.add_argument("--text", type=Path, default=ROOT / "docs" / "corpus" / "argparse.py")
    s.add_argument("--out", type=Path, default=ROOT / "docs" / "runs" / "demo" / "specialisation.json")
    args = parser.parse_args(argv)
    if args.command == "train":
        names = args.only or list(RUNS)
        with ThreadPoolExecutor(args.jobs) as pool:
            for name in pool.map(lambda n: train(n, args.out), names):
                print(f"trained {name}: {RUNS_DIR / name}")
    else:
        args.out.write_text(json.dumps(specialisation(args.ckpt, args.text)) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
