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

The five settings travel together as a `SamplingConfig`; `ORION_DEMO` holds the demo's.

Decoding is a loop of one-token steps, each with the same shapes: the KV cache has a fixed
size and the position to write is a tensor on the device, advanced in place. So the step
can be compiled once (`compile_decode_step`) and, on a GPU, replayed as one CUDA graph per
token, without Python or the host in the way. `generate` works on token tensors;
streaming.generate_text adds the tokenizer: prompts in, text out.
"""

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .aot import aot_decode_step
from .fast import accelerate, accelerate_linears


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the logits (the module docstring's steps 1-5);
    the defaults switch every processor off: greedy decoding."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0  # 1: all tokens
    repetition_penalty: float = 1.0  # 1: off
    no_repeat_ngram_size: int = 0  # 0: off


GREEDY = SamplingConfig()
ORION_DEMO = SamplingConfig(temperature=0.7, top_k=40, top_p=0.85, repetition_penalty=1.05, no_repeat_ngram_size=5)


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


def process_logits(logits, ids, sampling: SamplingConfig, mask=None):
    """Steps 1-5 of the module docstring; temperature 0 skips the (then irrelevant) 3-5."""
    logits = apply_repetition_penalty(logits, ids, sampling.repetition_penalty, mask)
    logits = apply_no_repeat_ngram(logits, ids, sampling.no_repeat_ngram_size, mask)
    if sampling.temperature == 0:
        return logits
    return apply_top_p(apply_top_k(logits / sampling.temperature, sampling.top_k), sampling.top_p)


def sample(logits, temperature: float = 0.0, generator: torch.Generator | None = None):
    """(B, V) processed logits -> (B, 1) next ids: argmax at temperature 0, else a draw."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


def decode_step_of(model):
    """The one-token decode step, step(next_id, cache, pos, pad_mask) -> logits (B, 1, V), as a
    plain function of tensors: what `generate_tokens` calls each step, compiled or not."""

    def step(next_id, cache, pos, pad_mask):
        return model(next_id, cache=cache, start_pos=pos, pad_mask=pad_mask)

    return step


def decoding_cache(model, batch_size: int, max_len: int):
    """model.new_cache(batch_size, max_len), made ready for a compiled decoding step: its
    buffers stay where they are, so a CUDA graph may update them in place, and their length
    may differ from one generation to the next without compiling again."""
    cache = model.new_cache(batch_size, max_len)
    for layer in cache:
        for t in (layer.k, layer.v):
            torch._dynamo.mark_static_address(t, guard=False)
            torch._dynamo.maybe_mark_dynamic(t, 2)
    return cache


def compile_decode_step(model, batch_size: int = 1, padded: bool = False, ahead_of_time: bool | None = None):
    """decode_step_of(model) compiled for speed: the whole step one graph of generated loops,
    its shapes fixed but for the cache's length. Compiling takes a while; it happens here, on a
    short dummy generation of `batch_size` rows (left-padded if `padded`), not on the first
    real tokens. A batch of another size, or with padding where the warm-up had none, compiles
    once more when it first runs. The model's experts are made fast first, in place
    (fast.accelerate): the plain ones ask the host for their block sizes, which a compiled
    graph cannot; and its linears too (fast.accelerate_linears: one-row matmuls compiled as
    fused loops on the CPU).

    Two ways, one per kind of device (ahead_of_time None picks the device's; True or False
    forces one, as the tests do on the CPU):
      * ahead of time, the CPU's (aot.aot_decode_step): exported and compiled into a library
        whose loops run from C++, and which each token calls with only the tensors that
        change, so that between one token's loops and the next's stand only the sampler and
        that one call;
      * torch.compile, the GPU's: captured as a CUDA graph (the option of
        mode="reduce-overhead"), so that a token costs one launch; coordinate-descent tuning
        tunes each generated kernel's block sizes (bandwidth-bound GEMVs gain).
    Both multiply and add in one instruction in the CPU's loops (a fused multiply-add, which
    rounds once where a product and a sum round twice).

    Before each call a function compiled by torch.compile checks its guards: that every tensor
    it reads (the model's parameters among them) still has the dtype, shape and place it was
    compiled for, a few percent of a small model's token. Within one generation nothing they
    check changes, so a call that passes the same `pos` tensor as the call before
    (generate_tokens advances one in place, and makes a new one for each generation) skips them
    and runs the graph the call before ran; the first step of every generation checks them all,
    and compiles anew if the model has changed. Skipping is switched on for the whole process
    while such a step runs, so run one compiled generation at a time, not several from Python
    threads at once; and code that consumes the tokens should leave torch's global settings
    (its thread count, say) as they are until the generation ends: a step that finds them
    changed raises rather than compile anew. The ahead-of-time step checks the same once per
    generation, at its first step (aot.py)."""
    accelerate_linears(accelerate(model))
    device = model.embed.weight.device
    if ahead_of_time is None:
        ahead_of_time = device.type == "cpu"
    if ahead_of_time and device.type != "cpu":
        raise ValueError(f"the ahead-of-time step runs on the CPU; the model is on {device}")
    step = aot_decode_step(model) if ahead_of_time else torch_compiled_step(model, device)
    idx = torch.zeros(batch_size, 2, dtype=torch.long, device=device)
    pad_mask = torch.ones_like(idx, dtype=torch.bool)
    pad_mask[0, 0] = False  # row 0 is one token shorter
    generate(model, idx, 3, pad_mask=pad_mask if padded else None, decode_step=step)
    return step


def torch_compiled_step(model, device):
    """decode_step_of(model) under torch.compile, skipping the guards after a generation's
    first step (compile_decode_step's docstring)."""
    options = {
        "triton.cudagraphs": device.type == "cuda",
        "cpp_wrapper": device.type == "cpu",  # the loops called from C++, not from Python
        "coordinate_descent_tuning": True,
        # C++ loops: a product and the sum it joins in one fused multiply-add instruction
        "cpp.enable_floating_point_contract_flag": "fast",
        # no checks of the inputs' sizes and strides at every call: the guards make them (at
        # each generation's first step), and in C++ each check builds its error message first
        "size_asserts": False,
    }
    compiled = torch.compile(decode_step_of(model), fullgraph=True, options=options)
    last_pos = None  # a weak reference to the last call's pos: the step keeps no generation's tensors alive

    def step(next_id, cache, pos, pad_mask):
        nonlocal last_pos
        if last_pos is not None and last_pos() is pos:  # the same generation's next step
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return compiled(next_id, cache, pos, pad_mask)
        logits = compiled(next_id, cache, pos, pad_mask)
        last_pos = weakref.ref(pos)
        return logits

    return step


@torch.inference_mode()
def generate_tokens(
    model,
    idx,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    pad_mask=None,
    generator: torch.Generator | None = None,
    decode_step=None,
):
    """Yield the next ids (B, 1) one step at a time; the caller stops when it wants.

    idx (B, T) prompts, left-padded when of different lengths, with pad_mask (B, T) True
    at real tokens. decode_step(next_id, cache, pos, pad_mask) -> logits (B, 1, V)
    replaces the model call for one-token steps (e.g. compile_decode_step(model)); its
    default is `decode_step_of(model)`, the model itself.
    """
    B, T = idx.shape
    if max_new_tokens <= 0:
        return
    decode_step = decode_step or decode_step_of(model)
    cache = decoding_cache(model, B, T + max_new_tokens)
    logits = model(idx, cache=cache, pad_mask=pad_mask, last_only=True)[:, -1]  # prefill: (B, vocab_size)
    if pad_mask is not None:
        pad_mask = F.pad(pad_mask, (0, max_new_tokens), value=True)  # (B, T + max_new_tokens): new tokens are real
        torch._dynamo.maybe_mark_dynamic(pad_mask, 1)  # its length, the cache's, may vary (decoding_cache)
    pos = torch.tensor(T, device=idx.device)  # where the next token goes: on the device, advanced in place
    ids = idx
    for step in range(max_new_tokens):
        logits = process_logits(logits, ids, sampling, None if pad_mask is None else pad_mask[:, : ids.shape[1]])
        next_id = sample(logits, sampling.temperature, generator)  # (B, 1)
        yield next_id
        if step + 1 == max_new_tokens:
            return
        ids = torch.cat([ids, next_id], dim=1)
        logits = decode_step(next_id, cache, pos, pad_mask)[:, -1]
        pos += 1


def generate(model, idx, max_new_tokens: int, sampling: SamplingConfig = GREEDY, **kwargs):
    """idx (B, T) prompt ids -> (B, T + max_new_tokens) ids, greedy unless `sampling` says
    otherwise. kwargs: generate_tokens' pad_mask, generator, decode_step."""
    return torch.cat([idx, *generate_tokens(model, idx, max_new_tokens, sampling, **kwargs)], dim=1)


def left_pad(prompts: list[list[int]], pad_id: int, device=None):
    """Token lists of different lengths -> idx (B, T) left-padded with pad_id, pad_mask (B, T)."""
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts], device=device)
    pad_mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device)
    return idx, pad_mask
