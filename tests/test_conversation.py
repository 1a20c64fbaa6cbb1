"""Chat: the token layout of Orion's chat format, fitting the history, the reply (greedy
generation up to eos or "Human:", streamed), bad conversations, and generate.py --chat."""

import io
import re

import pytest
import sentencepiece as spm
import torch

import nano_orion
from nano_orion import streaming
from nano_orion.conversation import chat_ids, fit_history
from nano_orion.sampler import ORION_DEMO, decode_step_of

from conftest import FIXTURES, load_script, usage_error

generate_cli = load_script("generate.py")
FIXTURE = FIXTURES / "orion-mini-rmsnorm"
BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def fixture():
    return nano_orion.load(FIXTURE)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_chat_ids_follow_the_format_token_by_token():
    """<s>Human: {system}\\n\\n{user}\\n\\nAssistant: </s>{assistant}</s>Human: {user}\\n\\nAssistant: </s>,
    the special tokens as ids and each text segment encoded on its own."""
    tok = nano_orion.Tokenizer.from_dir(FIXTURE)
    sp = spm.SentencePieceProcessor(model_file=str(FIXTURE / "tokenizer.model"))
    messages = [
        {"role": "system", "content": "Be brief."},
        user("What is an expert?"),
        assistant("A small MLP."),
        user("And the router?"),
    ]
    expected = (
        [BOS]
        + sp.encode("Human: Be brief.\n\nWhat is an expert?\n\nAssistant: ")
        + [EOS]
        + sp.encode("A small MLP.")
        + [EOS]
        + sp.encode("Human: And the router?\n\nAssistant: ")
        + [EOS]
    )
    assert chat_ids(tok, messages) == expected
    # the shortest conversation, piece by piece (the fixture's tokenizer adds a "▁" at a segment's
    # start, turns newlines into spaces, and spells "H" and ":" as bytes)
    pieces = [sp.id_to_piece(i) for i in chat_ids(tok, [user("hi")])]
    assert pieces == [
        "<s>",
        "▁",
        "<0x48>",
        "u",
        "m",
        "an",
        "<0x3A>",
        "▁",
        "h",
        "i",
        "▁A",
        "s",
        "s",
        "i",
        "s",
        "t",
        "an",
        "t",
        "<0x3A>",
        "</s>",
    ]


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([], "no messages"),
        ([{"role": "bot", "content": "hi"}], "message 0: role 'bot' is not one of system, user, assistant"),
        ([user("hi"), "hello"], "message 1: 'hello' is not a message"),
        (
            [user("hi"), {"role": "system", "content": "Be brief."}, user("hi")],
            "message 1: a system message can only come first; move it to the start",
        ),
        (
            [user("hi"), assistant("hello")],
            "ends with a assistant message, so there is nothing to reply to; end it with a user",
        ),
        ([{"role": "system", "content": "Be brief."}], "ends with a system message"),
    ],
)
def test_bad_conversations_are_one_clear_error(messages, problem):
    tok = nano_orion.Tokenizer.from_dir(FIXTURE)
    with pytest.raises(ValueError, match=re.escape(problem)):
        chat_ids(tok, messages)


def test_fit_history_drops_the_oldest_turns_and_keeps_the_system_message():
    tok = nano_orion.Tokenizer.from_dir(FIXTURE)
    system = {"role": "system", "content": "Be brief."}
    turns = [user("first question"), assistant("first answer"), user("second"), assistant("two"), user("third")]
    whole = len(chat_ids(tok, [system, *turns]))
    assert fit_history(tok, [system, *turns], whole) == [system, *turns]
    assert fit_history(tok, [system, *turns], whole - 1) == [
        system,
        *turns[2:],
    ]  # one turn dropped: a question, its answer
    last = len(chat_ids(tok, [system, turns[-1]]))
    assert fit_history(tok, [system, *turns], last) == [system, turns[-1]]
    with pytest.raises(
        ValueError,
        match=rf"the last message with the system message takes {last} tokens in the chat format, "
        f"more than the {last - 1} there is room for; shorten it",
    ):
        fit_history(tok, [system, *turns], last - 1)


def test_reply_is_the_greedy_continuation_up_to_eos(fixture):
    model, tok = fixture
    messages = [user("What is an expert?"), assistant("A small MLP."), user("And the router?")]
    ids = chat_ids(tok, messages)
    chunks = []
    reply = nano_orion.chat(model, tok, messages, stream=chunks.append, max_new_tokens=24)
    new = nano_orion.generate(model, torch.tensor([ids]), 24)[0, len(ids) :].tolist()
    new = new[: new.index(EOS)] if EOS in new else new
    assert reply == tok.decode(new) and "Human:" not in reply  # a fresh text: no leading space
    assert "".join(chunks) == reply


def test_reply_ends_where_the_model_starts_a_user_turn(fixture, monkeypatch):
    model, tok = fixture
    scripted = tok.sp.encode("Hi there.\n\nHuman: and you?")

    def generate_tokens(*args, **kwargs):
        for i in scripted:
            yield torch.tensor([[i]])

    monkeypatch.setattr(streaming, "generate_tokens", generate_tokens)
    chunks = []
    reply = nano_orion.chat(model, tok, [user("hello")], stream=chunks.append, max_new_tokens=len(scripted))
    assert reply == "Hi there. " and "".join(chunks) == reply  # the fixture's tokenizer made "\n\n" a space


def test_a_conversation_longer_than_max_seq_len_is_an_error(fixture):
    model, tok = fixture
    with pytest.raises(ValueError, match="new ones would pass the model's max_seq_len 256; drop its oldest turns"):
        nano_orion.chat(model, tok, [user("hi")], max_new_tokens=250)


def transcript(replies):
    """What generate.py --chat prints for the script below: a prompt per line read, each reply after it."""
    first, second, third = replies
    return f"you> {first}\nyou> {second}\nyou> you> {third}\nyou> "


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_cli_chat_keeps_the_history_and_resets(fixture, monkeypatch, capsys, compiled):
    """Two turns, /reset, one more, /exit: the replies are chat()'s on the same history, with
    the same draws, and the third starts a new conversation. With --compile too (the step
    compile_decode_step would give is stood in for by the eager one: compiling takes minutes)."""
    model, tok = fixture
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("What is an expert?\nAnd the router?\n/reset\nHello\n/exit\nnever read\n")
    )
    monkeypatch.setattr(generate_cli, "compile_decode_step", lambda model, batch_size, padded: decode_step_of(model))
    generate_cli.main(
        [
            "--ckpt",
            str(FIXTURE),
            "--chat",
            "--device",
            "cpu",
            "--max-new-tokens",
            "12",
            "--seed",
            "5",
            "--system",
            "Be brief.",
            *(["--compile"] if compiled else []),
        ]
    )
    out, err = capsys.readouterr()
    generator = torch.Generator().manual_seed(5)
    system = {"role": "system", "content": "Be brief."}

    def reply(*messages):
        return nano_orion.chat(model, tok, [system, *messages], ORION_DEMO, max_new_tokens=12, generator=generator)

    first = reply(user("What is an expert?"))
    second = reply(user("What is an expert?"), assistant(first), user("And the router?"))
    third = reply(user("Hello"))
    assert out == transcript([first, second, third])
    assert re.fullmatch(r"(\[compiled the decode step in \d+\.\d s\]\n)?\[conversation reset\]\n", err)
    assert err.startswith("[compiled") == compiled


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["--chat", "--prompt", "hi"], "--prompt: not with --chat"),
        (["--chat", "--stop", "x"], "--stop: not with --chat"),
        (["--system", "Be brief."], "--system: only with --chat"),
    ],
)
def test_cli_chat_flag_conflicts(capsys, argv, problem):
    assert problem in usage_error(capsys, generate_cli.main, ["--ckpt", str(FIXTURE), *argv])


def test_cli_chat_without_room_for_a_turn(capsys):
    last = usage_error(
        capsys,
        generate_cli.main,
        ["--ckpt", str(FIXTURE), "--chat", "--max-new-tokens", "250", "--system", "Be brief."],
    )
    assert last.endswith(
        "--max-new-tokens 250: a turn with --system takes at least 26 tokens, and the model's "
        "max_seq_len 256 leaves room for 6; ask for fewer new tokens or shorten --system"
    )


def test_cli_chat_message_too_long_is_one_line_and_the_session_goes_on(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("word " * 300 + "\nhi\n"))
    generate_cli.main(["--ckpt", str(FIXTURE), "--chat", "--device", "cpu", "--max-new-tokens", "8"])
    out, err = capsys.readouterr()
    assert ": the last message takes " in err and "more than the 248 there is room for" in err and err.count("\n") == 1
    assert out.startswith("you> you> ") and out.endswith(
        "\nyou> \n"
    )  # the second message got a reply; EOF ends the line
