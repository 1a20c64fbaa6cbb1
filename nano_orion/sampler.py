"""Turning logits into text, one token at a time.

`generate` runs the model once over the prompt (the "prefill"), which fills the KV cache,
then feeds back one new token per step (the "decode"), each step attending to the cache.

Each step the next-token logits (B, vocab_size) pass through "logits processors", in the
order Hugging Face's `generate` applies them (the official Orion demo's settings in brackets):

  1. repetition penalty [1.05]: a token already in the sequence has its logit divided by
     the penalty if positive, multiplied if negative, so it becomes less likely;
  2. no-repeat n-gram [5]: a token that would complete an n-gram already in the sequence
     is forbidden (logit -inf);
  3. temperature [0.7]: logits / temperature; below 1 sharpens, above 1 flattens;
  4. top-k [40]: only the k most likely tokens stay;
  5. top-p [0.85] ("nucleus"): only the smallest set of most likely tokens whose
     probabilities sum to at least p stays;

and the next token is drawn from softmax(logits). At temperature 0 it is the most likely
one instead (greedy decoding). The neutral settings (penalty 1, n-gram 0, top_k 0,
top_p 1) switch a processor off. Sampling draws from a torch.Generator, so a seed fixes
the tokens.

`generate` works on token tensors; `generate_text` adds the tokenizer: prompts in, text
out, streamed through a callback, with stops on eos and on stop strings.
"""

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tokenizer import StreamDecoder


def apply_repetition_penalty(logits, ids, penalty: float, mask=None):
    """logits (B, V); ids (B, L) the tokens so far; mask (B, L) True where ids are real (not padding)."""
    if penalty == 1.0:
        return logits
    real = torch.ones_like(ids, dtype=logits.dtype) if mask is None else mask.to(logits.dtype)
    seen = torch.zeros_like(logits).scatter_add_(1, ids, real) > 0  # (B, V): token occurs in the row
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_no_repeat_ngram(logits, ids, n: int, mask=None):
    """Forbid every token that would complete an n-gram already present in ids (B, L)."""
    L = ids.shape[1]
    if n <= 0 or L < n:
        return logits
    windows = ids.unfold(1, n, 1)  # (B, L - n + 1, n): every n-gram so far
    last = ids[:, L - n + 1 :]  # (B, n - 1): the n-1 tokens the next one would extend
    match = (windows[:, :, :-1] == last[:, None, :]).all(-1)  # (B, L - n + 1): n-grams starting like that
    if mask is not None:
        match &= mask.unfold(1, n, 1).all(-1) & mask[:, L - n + 1 :].all(-1, keepdim=True)
    banned = torch.zeros_like(logits).scatter_add_(1, windows[:, :, -1], match.to(logits.dtype)) > 0
    return logits.masked_fill(banned, float("-inf"))


def apply_top_k(logits, k: int):
    """Keep the k largest logits of each row (ties with the k-th kept too); -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits, p: float):
    """Keep the smallest set of most likely tokens whose probabilities sum to >= p; -inf elsewhere."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    drop_sorted = mass_before >= p  # already enough mass without this token (never drops the first)
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits, ids, mask=None, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0):
    """Steps 1-5 of the module docstring; temperature 0 skips the (then irrelevant) 3-5."""
    logits = apply_repetition_penalty(logits, ids, repetition_penalty, mask)
    logits = apply_no_repeat_ngram(logits, ids, no_repeat_ngram_size, mask)
    if temperature == 0:
        return logits
    return apply_top_p(apply_top_k(logits / temperature, top_k), top_p)


def sample(logits, temperature: float = 0.0, generator: torch.Generator | None = None):
    """(B, V) processed logits -> (B, 1) next ids: argmax at temperature 0, else a draw."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


def decode_step_of(model):
    """The one-token decode step, step(next_id, cache, start_pos, pad_mask) -> logits (B, 1, V),
    as a plain function of tensors: what `generate_tokens` calls each step, and what the
    callers wrap in torch.compile."""

    def step(next_id, cache, start_pos, pad_mask):
        return model(next_id, cache=cache, start_pos=start_pos, pad_mask=pad_mask)

    return step


@torch.inference_mode()
def generate_tokens(
    model,
    idx,
    max_new_tokens: int,
    pad_mask=None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    generator: torch.Generator | None = None,
    decode_step=None,
):
    """Yield the next ids (B, 1) one step at a time; the caller stops when it wants.

    idx (B, T) prompts, left-padded when of different lengths, with pad_mask (B, T) True
    at real tokens. decode_step(next_id, cache, start_pos, pad_mask) -> logits (B, 1, V)
    replaces the model call for one-token steps (e.g. a torch.compile'd one); its default
    is `decode_step_of(model)`, the model itself.
    """
    B, T = idx.shape
    if max_new_tokens <= 0:
        return
    decode_step = decode_step or decode_step_of(model)
    cache = model.new_cache(B, T + max_new_tokens)
    ids = idx
    logits = model(idx, cache=cache, pad_mask=pad_mask, last_only=True)[:, -1]  # prefill: (B, vocab_size)
    for step in range(max_new_tokens):
        logits = process_logits(logits, ids, pad_mask, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size)
        next_id = sample(logits, temperature, generator)  # (B, 1)
        yield next_id
        if step + 1 == max_new_tokens:
            return
        ids = torch.cat([ids, next_id], dim=1)
        if pad_mask is not None:
            pad_mask = F.pad(pad_mask, (0, 1), value=True)
        logits = decode_step(next_id, cache, T + step, pad_mask)[:, -1]


def generate(model, idx, max_new_tokens: int, temperature: float = 0.0, generator: torch.Generator | None = None, **sampling):
    """idx (B, T) prompt ids -> (B, T + max_new_tokens) ids. `sampling`: the keyword
    arguments of generate_tokens (pad_mask, top_k, top_p, repetition_penalty, ...)."""
    steps = generate_tokens(model, idx, max_new_tokens, temperature=temperature, generator=generator, **sampling)
    return torch.cat([idx, *steps], dim=1)


def left_pad(prompts: list[list[int]], pad_id: int, device=None):
    """Token lists of different lengths -> idx (B, T) left-padded with pad_id, pad_mask (B, T)."""
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts], device=device)
    pad_mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device)
    return idx, pad_mask


class _TextStop:
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


def generate_text(model, tokenizer, prompts, max_new_tokens: int, stop=(), on_text=None, device=None, **sampling) -> Generation:
    """Complete each prompt (a string, or a list of token ids) and time it.

    Rows stop at eos, at the first stop string (which is not included), or after
    max_new_tokens. on_text(row, chunk) is called as text becomes final, for streaming.
    Several prompts run as one left-padded batch. `sampling`: generate_tokens' keywords.
    """
    start = time.perf_counter()
    encoded = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("empty prompt: give at least one token of text")
    idx, pad_mask = left_pad(encoded, tokenizer.pad_id, device)
    if pad_mask.all():
        pad_mask = None  # equal lengths: no padding to hide
    rows = [_TextStop(tokenizer, e, tuple(stop)) for e in encoded]
    new_tokens = [0] * len(prompts)
    first = None

    def emit(b, chunk):
        if chunk and on_text:
            on_text(b, chunk)

    for next_id in generate_tokens(model, idx, max_new_tokens, pad_mask=pad_mask, **sampling):
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
