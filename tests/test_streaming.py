"""Text in, text out (streaming.py): the streaming detokenizer never shows a broken character
and joins the pieces as a full decode would; generate_text stops at a stop string or at eos,
and a batch of prompts gives each the text it would get alone."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nano_orion
from nano_orion.sampler import SamplingConfig
from nano_orion.streaming import REPLACEMENT_CHAR, StreamDecoder, generate_text
from nano_orion.tokenizer import Tokenizer

from conftest import FIXTURE_NAMES, FIXTURES, reference

FIXTURE = FIXTURES / "orion-mini-rmsnorm"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(FIXTURE)


@pytest.fixture(scope="module")
def model_and_tok():
    return nano_orion.load(FIXTURE)


@pytest.fixture(scope="module")
def ref():
    return reference(FIXTURE.name)


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def fixture(request):
    model, tok = nano_orion.load(FIXTURES / request.param)
    return request.param, model, tok, reference(request.param)


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


def test_stop_string_ends_the_text_before_it(model_and_tok, ref):
    model, tok = model_and_tok
    prompt = ref["prompt_ids"][0].tolist()
    full = tok.decode(ref["greedy_ids"][0].tolist())[len(tok.decode(prompt)) :]  # the greedy completion
    assert "expert" in full
    result = generate_text(model, tok, [prompt], 24, stop=["expert"])
    assert result.texts == [full[: full.index("expert")]]
    assert result.new_tokens[0] < 24


def test_eos_ends_the_text(model_and_tok, ref):
    model, tok = model_and_tok
    prompt, greedy = ref["prompt_ids"][0].tolist(), ref["greedy_ids"][0, 12:].tolist()
    eos_tok = nano_orion.Tokenizer.from_dir(FIXTURE)
    eos_tok.eos_id = greedy[5]  # pretend the 6th greedy token is eos
    result = generate_text(model, eos_tok, [prompt], 24)
    assert result.new_tokens == [greedy.index(greedy[5]) + 1]
    assert result.texts[0] == (tok.decode(prompt + greedy[: greedy.index(greedy[5])]))[len(tok.decode(prompt)) :]


def test_text_batch_equals_one_at_a_time(fixture):
    _, model, tok, _ = fixture
    prompts = ["expert", "位置 and the experts of 专家", "Hello"]
    sampling = SamplingConfig(repetition_penalty=1.05, no_repeat_ngram_size=3)
    together = generate_text(model, tok, prompts, 10, sampling).texts
    assert together == [generate_text(model, tok, [p], 10, sampling).texts[0] for p in prompts]
