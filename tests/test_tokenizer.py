"""The tokenizer's special ids and settings, and decoding that skips them (streaming: test_streaming.py)."""

import pytest

from nano_orion.tokenizer import Tokenizer

from conftest import FIXTURES


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(FIXTURES / "orion-mini-rmsnorm")


def test_special_ids_and_settings(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
    assert (tok.add_bos, tok.add_eos) == (False, False)  # tokenizer_config.json: both off
    plain = tok.encode("expert 专家")
    assert plain == tok.sp.encode("expert 专家")
    both = Tokenizer(FIXTURES / "orion-mini-rmsnorm" / "tokenizer.model", add_bos=True, add_eos=True)
    assert both.encode("expert 专家") == [1, *plain, 2]


def test_decode_skips_special_tokens(tok):
    ids = tok.encode("位置 hello")
    assert tok.decode([1, 0, *ids, 2, 0]) == tok.sp.decode(ids) == "位置 hello"
