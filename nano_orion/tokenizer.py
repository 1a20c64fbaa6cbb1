"""Text <-> token ids with Orion's sentencepiece model.

Orion's tokenizer is a sentencepiece BPE model with byte fallback: text is split into
learned sub-word pieces, and any character without a piece of its own is spelled as its
UTF-8 bytes (pieces ``<0x00>`` .. ``<0xFF>``), so no text is ever "unknown".
Special ids: unk 0, bos ``<s>`` 1, eos ``</s>`` 2; padding reuses 0.

Streaming. A generated token is not always a whole character: "中" may arrive as three
byte tokens <0xE4> <0xB8> <0xAD>, and decoding after the first one gives the replacement
character U+FFFD. `StreamDecoder` therefore decodes a short window of recent tokens and
emits only the text that has become final, holding back a trailing U+FFFD until the
character's remaining bytes arrive (or the stream ends).
"""

import json
from pathlib import Path

import sentencepiece as spm

REPLACEMENT_CHAR = "\ufffd"  # what decoding gives for an incomplete or invalid UTF-8 byte sequence


class Tokenizer:
    def __init__(self, model_file, add_bos: bool = False, add_eos: bool = False):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.pad_id = 0

    @classmethod
    def from_dir(cls, folder) -> "Tokenizer":
        """``tokenizer.model`` plus add_bos/add_eos from ``tokenizer_config.json`` (both off if absent)."""
        folder = Path(folder)
        settings = {}
        if (folder / "tokenizer_config.json").exists():
            settings = json.loads((folder / "tokenizer_config.json").read_text())
        return cls(folder / "tokenizer.model", settings.get("add_bos_token", False), settings.get("add_eos_token", False))

    @property
    def n_pieces(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if self.add_bos else []) + ids + ([self.eos_id] if self.add_eos else [])

    def decode(self, ids) -> str:
        """Text of `ids`; special tokens (unk/bos/eos/pad) and ids past the vocabulary are skipped."""
        specials = {self.bos_id, self.eos_id, self.unk_id, self.pad_id}
        return self.sp.decode([i for i in ids if i not in specials and 0 <= i < self.n_pieces])


class StreamDecoder:
    """Turns token ids, pushed one at a time, into text chunks whose concatenation equals
    ``tokenizer.decode(all ids)``, never splitting a multi-byte character.

    It keeps two offsets into the ids: text up to `read` has been emitted; decoding starts
    at `prefix` (the previous emission's first token), so that the leading-space rule of
    sentencepiece (a word's "▁" becomes a space, except at the very start) is applied the
    same way to the text already emitted and to the text with the new token.
    """

    def __init__(self, tokenizer: Tokenizer, context=()):
        """context: ids already shown (the prompt), so the first new word gets its leading space."""
        self.tokenizer = tokenizer
        self.ids: list[int] = [int(i) for i in context]
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
