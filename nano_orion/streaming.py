"""Text in, text out: generation streamed to the screen as it is decided.

A generated token is not always a whole character: "中" may arrive as three byte tokens
<0xE4> <0xB8> <0xAD>, and decoding after the first one gives the replacement character
U+FFFD. `StreamDecoder` therefore decodes a short window of recent tokens and emits only
the text that has become final, holding back a trailing U+FFFD until the character's
remaining bytes arrive (or the stream ends).

`generate_text` runs sampler.generate_tokens on prompts given as text, stops each row at
eos or at a stop string (`TextStop` holds back text that may be the start of one), and
reports its timing.
"""

import time
from dataclasses import dataclass

from .sampler import GREEDY, SamplingConfig, generate_tokens, left_pad
from .tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"  # what decoding gives for an incomplete or invalid UTF-8 byte sequence


class StreamDecoder:
    """Turns token ids, pushed one at a time, into text chunks whose concatenation equals
    ``tokenizer.decode(all ids)``, never splitting a multi-byte character.

    It keeps two offsets into the ids: text up to `read` has been emitted; decoding starts
    at `prefix` (the previous emission's first token), so that the leading-space rule of
    sentencepiece (a word's "▁" becomes a space, except at the very start) is applied the
    same way to the text already emitted and to the text with the new token.
    """

    def __init__(self, tokenizer: Tokenizer, context=()):
        """context: ids already shown (the prompt), so the first new word gets its leading space.
        An eos ends a text: only the context after its last eos counts, so that the new ids
        after an eos (a chat reply, conversation.py) decode as a text of their own, as
        sentencepiece encoded them, without a leading space."""
        self.tokenizer = tokenizer
        self.ids: list[int] = [int(i) for i in context]
        if tokenizer.eos_id in self.ids:
            self.ids = self.ids[len(self.ids) - self.ids[::-1].index(tokenizer.eos_id) :]
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly final text ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """The text still held back at the end of the stream (an incomplete character decodes to U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        emitted = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) <= len(emitted) or (text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(emitted) :]


class TextStop:
    """One row's text: streams decoded chunks, holding back what may be the start of a stop string."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...]):
        self.decoder = StreamDecoder(tokenizer, context=prompt_ids)
        self.stop = stop
        self.pending = ""  # decoded, not yet released
        self.text = ""  # released
        self.done = False

    def push(self, token_id: int) -> str:
        return self._release(self.decoder.push(token_id), final=False)

    def finish(self) -> str:
        return self._release(self.decoder.flush(), final=True)

    def _release(self, chunk: str, final: bool) -> str:
        self.pending += chunk
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.done = self.pending[: min(hits)], True
        elif final:
            out = self.pending
        else:  # hold back the longest ending that could still grow into a stop string
            hold = max((n for s in self.stop for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
            out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        self.text += out
        return out


@dataclass
class Generation:
    texts: list[str]  # one completion per prompt, without the prompt
    prompt_tokens: list[int]
    new_tokens: list[int]  # generated per prompt, eos included
    time_to_first_token: float  # seconds: encoding, prefill and the first sample
    decode_time: float  # seconds from the first token to the last


def generate_text(
    model,
    tokenizer: Tokenizer,
    prompts,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    stop=(),
    on_text=None,
    device=None,
    generator=None,
    decode_step=None,
) -> Generation:
    """Complete each prompt (a string, or a list of token ids) and time it.

    Rows stop at eos, at the first stop string (which is not included), or after
    max_new_tokens. on_text(row, chunk) is called as text becomes final, for streaming.
    Several prompts run as one left-padded batch. generator, decode_step: as in generate_tokens.
    """
    start = time.perf_counter()
    encoded = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("empty prompt: give at least one token of text")
    idx, pad_mask = left_pad(encoded, tokenizer.pad_id, device)
    if pad_mask.all():
        pad_mask = None  # equal lengths: no padding to hide
    rows = [TextStop(tokenizer, e, tuple(stop)) for e in encoded]
    new_tokens = [0] * len(prompts)
    first = None

    def emit(b, chunk):
        if chunk and on_text:
            on_text(b, chunk)

    for next_id in generate_tokens(model, idx, max_new_tokens, sampling, pad_mask, generator, decode_step):
        tokens = next_id[:, 0].tolist()  # waits for the device
        first = first or time.perf_counter()
        for b, token in enumerate(tokens):
            if rows[b].done:
                continue
            new_tokens[b] += 1
            is_eos = token == tokenizer.eos_id
            emit(b, rows[b].finish() if is_eos else rows[b].push(token))
            rows[b].done |= is_eos
        if all(r.done for r in rows):
            break
    end = time.perf_counter()
    for b, row in enumerate(rows):
        if not row.done:
            emit(b, row.finish())
    first = first or end
    return Generation([r.text for r in rows], [len(e) for e in encoded], new_tokens, first - start, end - first)
