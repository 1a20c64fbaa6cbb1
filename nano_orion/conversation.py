"""Chat: a conversation as one token sequence, and the model's reply to it.

A language model only continues token sequences, so a conversation is written as one, in a
format the model has seen. Orion's is that of Orion-14B-Chat (Orion-MoE8x7B's own chat code
is not published; llama.cpp's and FastChat's Orion templates agree with it):

    <s>Human: {user}\\n\\nAssistant: </s>{assistant}</s>Human: {user}\\n\\nAssistant: </s>

bos once at the start; each user turn as "Human: " + text + "\\n\\nAssistant: " followed by
the eos token; each assistant turn as its text followed by eos. `<s>` and `</s>` are the
tokens bos and eos (ids 1 and 2), never the text "</s>" spelled out. The format has no
system message: one goes in front of the first user text, separated by a blank line
(as llama.cpp does), `Human: {system}\\n\\n{user}\\n\\nAssistant: `. The reply is what the
model generates after the last eos; it ends at the next eos, or where the model starts a
user turn of its own ("Human:").

Each text segment between the special tokens is encoded on its own, as Hugging Face's
tokenizer does with a prompt that contains special tokens: so a segment starts the way a
text starts, with sentencepiece's dummy prefix "▁" if the tokenizer adds one, and no
piece ever spans an eos. The reply is decoded as a text of its own in the same way
(streaming.StreamDecoder: what follows an eos is a new text).
"""

from .sampler import GREEDY, SamplingConfig
from .streaming import generate_text
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
USER_TURN = "Human: {}\n\nAssistant: "  # followed by eos
STOP = ("Human:",)  # the model starting a user turn of its own ends the reply


def check_messages(messages):
    """ValueError, naming the problem and the fix, unless messages is a conversation to reply to."""
    if not messages:
        raise ValueError('no messages: give at least one, e.g. [{"role": "user", "content": "Hello"}]')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f'message {i}: {m!r} is not a message; give a dict {{"role": ..., "content": "text"}}')
        if m.get("role") not in ROLES:
            raise ValueError(f"message {i}: role {m.get('role')!r} is not one of {', '.join(ROLES)}")
        if m["role"] == "system" and i > 0:
            raise ValueError(f"message {i}: a system message can only come first; move it to the start")
    if messages[-1]["role"] != "user":
        raise ValueError(
            f"the conversation ends with a {messages[-1]['role']} message, so there is nothing to reply to; "
            "end it with a user message"
        )


def chat_ids(tokenizer: Tokenizer, messages) -> list[int]:
    """The token ids of a conversation in Orion's chat format (the module docstring), ready
    for the reply: they end with the last user turn's eos."""
    check_messages(messages)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    ids = [tokenizer.bos_id]
    for m in messages:
        if m["role"] == "user":
            text = m["content"] if system is None else f"{system}\n\n{m['content']}"
            ids += tokenizer.sp.encode(USER_TURN.format(text)) + [tokenizer.eos_id]
            system = None
        elif m["role"] == "assistant":
            ids += tokenizer.sp.encode(m["content"]) + [tokenizer.eos_id]
    return ids


def fit_history(tokenizer: Tokenizer, messages, max_tokens: int) -> list[dict]:
    """messages without as few of their oldest turns (a user message and the replies to it)
    as make chat_ids fit in max_tokens; a system message stays. ValueError if even the
    last turn alone does not fit."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while (n := len(chat_ids(tokenizer, system + turns))) > max_tokens:
        starts = [i for i, m in enumerate(turns) if m["role"] == "user"]
        if len(starts) < 2:
            raise ValueError(
                f"the last message{' with the system message' if system else ''} takes {n} tokens in the "
                f"chat format, more than the {max_tokens} there is room for; shorten it, or leave more "
                "room (fewer new tokens)"
            )
        turns = turns[starts[1] :]
    return system + turns


def chat(
    model,
    tokenizer: Tokenizer,
    messages,
    sampling: SamplingConfig = GREEDY,
    stream=None,
    max_new_tokens: int = 256,
    generator=None,
    decode_step=None,
) -> str:
    """The model's reply to a conversation: messages are dicts {"role": "system" | "user" |
    "assistant", "content": text}, ending with a user message. Greedy unless `sampling`
    says otherwise (generate.py --chat uses the official demo's settings, sampler.ORION_DEMO).
    stream(chunk) is called as the reply's text becomes final, never splitting a character.
    The reply ends at eos, before a "Human:" of the model's own, or after max_new_tokens.
    generator, decode_step: as in sampler.generate_tokens."""
    ids = chat_ids(tokenizer, messages)
    max_seq_len = model.config.max_seq_len
    if len(ids) + max_new_tokens > max_seq_len:
        raise ValueError(
            f"the conversation takes {len(ids)} tokens, and {max_new_tokens} new ones would pass the "
            f"model's max_seq_len {max_seq_len}; drop its oldest turns (nano_orion.conversation.fit_history) "
            "or ask for fewer new tokens"
        )
    result = generate_text(
        model,
        tokenizer,
        [ids],
        max_new_tokens,
        sampling,
        stop=STOP,
        on_text=(lambda _, chunk: stream(chunk)) if stream else None,
        device=model.embed.weight.device,
        generator=generator,
        decode_step=decode_step,
    )
    return result.texts[0]
