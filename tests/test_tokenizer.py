"""The tokenizer's special ids and settings, and the streaming detokenizer (never a broken character)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nano_orion.streaming import REPLACEMENT_CHAR, StreamDecoder
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


def stream(tok, ids, context=()):
    decoder = StreamDecoder(tok, context=context)
    chunks = [decoder.push(i) for i in ids]
    return chunks + [decoder.flush()]


def test_split_character_waits_for_its_last_byte(tok):
    ids = tok.encode("中")  # no piece of its own: three byte-fallback tokens <0xE4> <0xB8> <0xAD>
    assert [tok.sp.id_to_piece(i) for i in ids][-3:] == ["<0xE4>", "<0xB8>", "<0xAD>"]
    chunks = stream(tok, ids)
    assert chunks[-4:] == ["", "", "中", ""]


# Scripts the byte fallback splits: CJK, Hangul, kana, emoji, accented Latin, ASCII, spaces.
multilingual = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK ideographs
        st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3),  # Hangul syllables
        st.characters(min_codepoint=0x3040, max_codepoint=0x30FF),  # hiragana, katakana
        st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji
        st.characters(min_codepoint=0xC0, max_codepoint=0x17F),  # accented Latin
        st.sampled_from(list("abcdefghij expert位置专家 \n")),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(multilingual)
def test_stream_equals_full_decode(text):
    tok = Tokenizer.from_dir(FIXTURES / "orion-mini-rmsnorm")
    ids = tok.encode(text)
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids)
    assert not any(REPLACEMENT_CHAR in c for c in chunks)  # valid text never shows a broken character


@settings(max_examples=60, deadline=None)
@given(multilingual, multilingual)
def test_stream_after_a_prompt_keeps_the_joining_space(prompt, text):
    tok = Tokenizer.from_dir(FIXTURES / "orion-mini-rmsnorm")
    context, ids = tok.encode(prompt), tok.encode(text)
    assert tok.decode(context) + "".join(stream(tok, ids, context)) == tok.decode(context + ids)
