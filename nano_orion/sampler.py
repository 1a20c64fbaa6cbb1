"""Turning logits into text, one token at a time.

`generate` runs the model once over the prompt (the "prefill"), which fills the KV cache,
then feeds back one new token per step (the "decode"), each step attending to the cache.
At temperature 0 the next token is the most likely one (greedy decoding); above 0 it is
drawn from softmax(logits / temperature).
"""

import torch


@torch.inference_mode()
def generate(model, idx, max_new_tokens: int, temperature: float = 0.0, generator: torch.Generator | None = None):
    """idx (B, T) prompt ids -> (B, T + max_new_tokens) ids."""
    B, T = idx.shape
    cache = model.new_cache(B, T + max_new_tokens)
    out = [idx]
    logits = model(idx, cache=cache)[:, -1]  # prefill: (B, vocab_size)
    for step in range(max_new_tokens):
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        out.append(next_id)
        if step + 1 < max_new_tokens:
            logits = model(next_id, cache=cache, start_pos=T + step)[:, -1]
    return torch.cat(out, dim=1)
