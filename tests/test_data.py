"""nano_orion.data: uint32 token files, the tokenizer's special ids, clear errors, batches."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nano_orion import Tokenizer
from nano_orion.data import DataError, get_batch, prepare, read_tokens, vocab_size_for, write_tokens


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=50))
def test_uint32_round_trip(tmp_path_factory, ids):
    path = tmp_path_factory.mktemp("tokens") / "ids.bin"
    write_tokens(path, ids)
    assert read_tokens(path).tolist() == ids
    assert path.stat().st_size == 4 * len(ids)


def test_ids_above_uint16_survive(tmp_path):
    ids = [0, 65535, 65536, 113663, 2**32 - 1]  # 113663: Orion's last piece, beyond uint16
    write_tokens(tmp_path / "ids.bin", ids)
    assert read_tokens(tmp_path / "ids.bin").tolist() == ids


def test_too_small_corpus_is_a_clear_error_and_leaves_nothing(tmp_path):
    (tmp_path / "small.txt").write_text("Just one short sentence.\n" * 100)  # 2.5 kB
    with pytest.raises(DataError, match="corpus too small: 2,500 bytes"):
        prepare(tmp_path / "small.txt", tmp_path / "data")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_too_small_vocab_request_is_its_own_error():
    with pytest.raises(DataError, match=r"--vocab-size must be at least 320 .*got 100"):
        vocab_size_for(10**7, 100)  # plenty of text: the request is the problem, not the corpus
    assert vocab_size_for(10**7, 320) == 320 and vocab_size_for(40_000, 4096) == 384  # capped at 100 bytes a piece


def test_bad_paths_and_encodings_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="nope: no such file or folder"):
        prepare(tmp_path / "nope", tmp_path / "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="the folder holds no files"):
        prepare(tmp_path / "empty", tmp_path / "data")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10000)
    with pytest.raises(DataError, match="latin1.txt: not UTF-8"):
        prepare(tmp_path / "latin1.txt", tmp_path / "data")


def test_prepare_folder_orion_ids_split_and_cache(tmp_path):
    src = tmp_path / "texts"
    src.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "eta", "theta", "iota", "kappa", "λ", "mu"]
    for i in range(4):
        (src / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 3000)) + "\n")  # ~20 kB each, 4 documents
    messages = []
    out = prepare(src, tmp_path / "data", vocab_size=400, log=messages.append)
    tok = Tokenizer(out / "tokenizer.model")
    sp = tok.sp
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)  # Orion's ids; pad reuses 0
    assert sp.id_to_piece(3) == "<0x00>"  # byte fallback: 256 byte pieces follow the specials
    assert 320 <= tok.n_pieces <= 400
    assert tok.decode(tok.encode("kappa 日本")) == "kappa 日本"  # unseen characters round-trip as bytes
    train, val = read_tokens(out / "train.bin"), read_tokens(out / "val.bin")
    ids = np.concatenate([train, val])
    assert (ids == tok.eos_id).sum() == 4  # one eos after each document
    assert len(val) == int(len(ids) * 0.1)
    assert len(messages) == 2
    assert prepare(src, tmp_path / "data", vocab_size=400, log=messages.append) == out  # cached: no work
    assert len(messages) == 2


def test_batches_are_reproducible_and_split_across_micro_batches():
    tokens = np.arange(1000, dtype=np.uint32)
    x, y = get_batch(tokens, 4, 16, seed=0, step=3)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)  # targets = inputs shifted
    assert torch.equal(get_batch(tokens, 4, 16, seed=0, step=3)[0], x)  # a function of (seed, step)
    assert not torch.equal(get_batch(tokens, 4, 16, seed=0, step=4)[0], x)
    # micro-batches 0 and 1 of 2 are the two halves of the 8-sequence global batch
    whole = get_batch(tokens, 8, 16, seed=0, step=3)[0]
    halves = [get_batch(tokens, 4, 16, seed=0, step=3, micro=m, n_micro=2)[0] for m in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)


def test_batches_reach_every_valid_window():
    # block_size + 1 tokens hold exactly one window (16 inputs, 16 targets)
    x, y = get_batch(np.arange(17, dtype=np.uint32), 2, 16, seed=0, step=0)
    assert x.tolist() == [list(range(16))] * 2 and y.tolist() == [list(range(1, 17))] * 2
    # one token more: two windows, and both are drawn, the last one included
    x, _ = get_batch(np.arange(18, dtype=np.uint32), 64, 16, seed=0, step=0)
    assert set(x[:, 0].tolist()) == {0, 1}
    with pytest.raises(DataError, match="16 tokens cannot fill one block of 16 \\(needs 17\\)"):
        get_batch(np.arange(16, dtype=np.uint32), 1, 16, seed=0, step=0)
