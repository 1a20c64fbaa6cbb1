"""Text <-> token ids with Orion's sentencepiece model.

Orion's tokenizer is a sentencepiece BPE model with byte fallback: text is split into
learned sub-word pieces, and any character without a piece of its own is spelled as its
UTF-8 bytes (pieces ``<0x00>`` .. ``<0xFF>``), so no text is ever "unknown".
Special ids: unk 0, bos ``<s>`` 1, eos ``</s>`` 2; padding reuses 0. Turning generated
tokens into text as they arrive is streaming.py's job.
"""

import json
from pathlib import Path

import sentencepiece as spm


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
        return cls(
            folder / "tokenizer.model", settings.get("add_bos_token", False), settings.get("add_eos_token", False)
        )

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
