"""Training data: text -> a sentencepiece tokenizer -> uint32 token files -> batches.

`prepare(source, cache_dir)` turns a UTF-8 text file, or a folder of them, into

    tokenizer.model   sentencepiece BPE with byte fallback, trained the way Orion's was:
                      ids unk 0, bos 1, eos 2, and padding reuses 0 (Orion has no pad piece)
    train.bin         token ids of the first (1 - val_fraction) of the corpus, uint32
    val.bin           the rest, uint32
    meta.json         where it came from, the vocabulary size, the token counts

in a folder named after a hash of the source files, so a second run reuses it. Each
document is followed by eos, so the model learns where documents end.

Why uint32: Orion's vocabulary has 113,664 pieces, more than uint16's 65,536.

Without a source, the corpus is the Python standard library's own ``.py`` files (code,
comments and docstrings): text every Python installation carries, so the default
needs no download.

Batches are a pure function of (seed, step, micro-batch): `get_batch` draws its random
offsets from a generator seeded with them. A resumed run therefore sees exactly the data
the uninterrupted run would have, and data-parallel ranks split one global batch.
"""

import hashlib
import json
import sysconfig
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from .atomic import atomic_folder
from .tokenizer import Tokenizer

# Below this many pieces a BPE vocabulary is mostly the 256 byte pieces and the 3 specials.
MIN_VOCAB = 320
# A vocabulary of V pieces wants roughly this many bytes of text per piece, or the rarest
# merges are learned from a handful of occurrences (and sentencepiece may refuse to reach V).
BYTES_PER_PIECE = 100


class DataError(Exception):
    """Unusable training data; the message names the problem and the fix."""


def default_corpus() -> list[Path]:
    """The standard library's top-level modules: about 4-5 MB of Python in any installation."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    if not files:
        raise DataError(f"no .py files found in the standard library at {stdlib}; pass --data PATH")
    return files


def source_files(source) -> list[Path]:
    """The text files of `source`: a file, or every file in a folder (recursively, sorted;
    hidden files and folders such as .git are skipped)."""
    path = Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"--data {path}: the folder holds no files; point at a UTF-8 text file or a folder of them")
    else:
        raise DataError(f"--data {path}: no such file or folder; point at a UTF-8 text file or a folder of them")
    return files


def read_documents(files: list[Path]) -> list[str]:
    docs = []
    for f in files:
        try:
            docs.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start}); convert it or leave it out") from None
    return [d for d in docs if d.strip()]


def vocab_size_for(n_bytes: int, requested: int) -> int:
    """The requested vocabulary, capped at one piece per BYTES_PER_PIECE bytes of text
    (rounded down to a multiple of 64); too little text for MIN_VOCAB is an error."""
    if requested < MIN_VOCAB:
        raise DataError(
            f"--vocab-size must be at least {MIN_VOCAB} (256 byte pieces, 3 specials and some merges), "
            f"got {requested}; ask for more"
        )
    cap = n_bytes // BYTES_PER_PIECE // 64 * 64
    if cap < MIN_VOCAB:
        raise DataError(
            f"corpus too small: {n_bytes:,} bytes of text cannot train a tokenizer of at least {MIN_VOCAB} pieces "
            f"(needs about {MIN_VOCAB * BYTES_PER_PIECE:,} bytes); give --data more text"
        )
    return min(requested, cap)


def train_tokenizer(docs: list[str], model_prefix: Path, vocab_size: int) -> None:
    """Sentencepiece BPE with byte fallback; writes model_prefix.model. The text it trains on
    is written to model_prefix.txt for the while (beside the model: inside `prepare`'s
    temporary folder, which goes with a killed run's leftovers)."""
    text_file = Path(f"{model_prefix}.txt")
    with open(text_file, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(d if d.endswith("\n") else d + "\n")
    try:
        spm.SentencePieceTrainer.train(
            input=text_file,
            model_prefix=str(model_prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # a repetitive corpus may yield fewer pieces: fine, not an error
            byte_fallback=True,  # unseen characters become UTF-8 byte pieces, never unk
            character_coverage=0.9995,
            normalization_rule_name="identity",  # keep text as is: newlines, tabs, runs of spaces
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,  # Orion has no pad piece; padding reuses id 0
            split_digits=True,
            remove_extra_whitespaces=False,  # keep code indentation
            allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 16,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(
            f"sentencepiece could not train a {vocab_size}-piece tokenizer on this corpus ({e}); "
            "give --data more text or ask for a smaller --vocab-size"
        ) from None
    finally:
        text_file.unlink()


def fingerprint(files: list[Path], vocab_size: int, val_fraction: float) -> str:
    h = hashlib.sha256(json.dumps([vocab_size, val_fraction]).encode())
    for f in files:
        h.update(str(f.resolve()).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def prepare(source=None, cache_dir="data", vocab_size: int = 4096, val_fraction: float = 0.1, log=print) -> Path:
    """Tokenizer and uint32 token files for `source` (None: the standard library), cached
    under cache_dir/<name>-<hash>/. Returns that folder. Written to a temporary folder
    and renamed into place (atomic.atomic_folder), so an interrupted run leaves nothing
    half-written, and the next run removes what a killed one left."""
    files = default_corpus() if source is None else source_files(source)
    name = "stdlib" if source is None else Path(source).name
    out = Path(cache_dir) / f"{name}-{fingerprint(files, vocab_size, val_fraction)}"
    if (out / "meta.json").exists():
        return out
    docs = read_documents(files)
    n_bytes = sum(len(d.encode()) for d in docs)
    vocab = vocab_size_for(n_bytes, vocab_size)
    log(f"preparing {out}: {len(docs)} documents, {n_bytes / 1e6:.1f} MB, training a {vocab}-piece tokenizer")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        train_tokenizer(docs, tmp / "tokenizer", vocab)
        tok = Tokenizer(tmp / "tokenizer.model")
        ids = np.concatenate([np.array(tok.encode(d) + [tok.eos_id], dtype=np.uint32) for d in docs])
        n_val = max(1, int(len(ids) * val_fraction))
        write_tokens(tmp / "train.bin", ids[:-n_val])
        write_tokens(tmp / "val.bin", ids[-n_val:])
        meta = {
            "source": str(source) if source else "python standard library",
            "files": len(files),
            "vocab_size": tok.n_pieces,
            "train_tokens": len(ids) - n_val,
            "val_tokens": n_val,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"prepared {meta['train_tokens']:,} train and {n_val:,} val tokens")
    return out


def write_tokens(path, ids) -> None:
    """Token ids -> a raw little-endian uint32 file."""
    np.asarray(ids, dtype="<u4").tofile(path)


def read_tokens(path) -> np.ndarray:
    """A uint32 token file, memory-mapped (nothing is read until used)."""
    return np.memmap(path, dtype="<u4", mode="r")


def check_fills_block(tokens: np.ndarray, block_size: int) -> None:
    """A block needs block_size + 1 tokens: its inputs and, one further, their targets."""
    if len(tokens) < block_size + 1:
        raise DataError(
            f"{len(tokens):,} tokens cannot fill one block of {block_size} (needs {block_size + 1}); "
            "use a smaller --block-size or more data"
        )


def get_batch(
    tokens: np.ndarray, batch_size: int, block_size: int, seed: int, step: int, micro: int = 0, n_micro: int = 1
):
    """Micro-batch `micro` of `n_micro` of the global batch of `step`: inputs x and targets
    y = x shifted by one, each (batch_size, block_size) int64.

    The global batch (n_micro * batch_size windows at random offsets) depends only on
    (seed, step), so every rank and every resumed run draws the same one and takes its slice.
    """
    check_fills_block(tokens, block_size)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    # a window is block_size + 1 tokens (inputs and the next token), so starts run 0 .. len - block_size - 1
    starts = torch.randint(len(tokens) - block_size, (n_micro * batch_size,), generator=g)
    starts = starts[micro * batch_size : (micro + 1) * batch_size].tolist()
    window = np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64)  # (B, T + 1)
    window = torch.from_numpy(window)
    return window[:, :-1], window[:, 1:]
