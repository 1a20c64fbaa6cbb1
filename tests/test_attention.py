"""Masking, padding, the KV cache and grouped-query attention, on whole models."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import nano_orion.attention
from nano_orion import Orion, OrionConfig, generate
from nano_orion.attention import attention_mask
from nano_orion.sampler import left_pad

from conftest import random_model, small_configs

ATOL = 1e-4


def ids(config, shape, seed):
    return torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=15, deadline=None)
@given(small_configs(), st.integers(0, 2**16), st.data())
def test_future_tokens_never_change_past_logits(config, seed, data):
    model = random_model(config, seed)
    T = data.draw(st.integers(2, 20))
    t = data.draw(st.integers(0, T - 2))
    idx = ids(config, (1, T), seed)
    changed = idx.clone()
    changed[:, t + 1 :] = ids(config, (1, T - t - 1), seed + 1)
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=ATOL, rtol=0)
    # ...and the check can fail: some later logit does change (tokens differ somewhere after t).
    if not torch.equal(idx, changed):
        assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=ATOL)


@settings(max_examples=15, deadline=None)
@given(small_configs(), st.integers(0, 2**16), st.lists(st.integers(1, 12), min_size=1, max_size=4))
def test_batch_with_left_padding_equals_rows_one_by_one(config, seed, lengths):
    model = random_model(config, seed)
    rows = [ids(config, (1, n), seed + i) for i, n in enumerate(lengths)]
    T = max(lengths)
    batch = torch.full((len(rows), T), config.pad_id)
    pad_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, row in enumerate(rows):
        batch[i, T - row.shape[1] :] = row[0]
        pad_mask[i, T - row.shape[1] :] = True
    with torch.no_grad():
        batched = model(batch, pad_mask=pad_mask)
        for i, row in enumerate(rows):
            alone = model(row)
            torch.testing.assert_close(batched[i, T - row.shape[1] :], alone[0], atol=ATOL, rtol=0)


@settings(max_examples=10, deadline=None)
@given(small_configs(), st.integers(0, 2**16))
def test_batch_equals_rows_one_by_one(config, seed):
    model = random_model(config, seed)
    batch = ids(config, (3, 9), seed)
    with torch.no_grad():
        together = model(batch)
        for i in range(3):
            torch.testing.assert_close(together[i], model(batch[i : i + 1])[0], atol=ATOL, rtol=0)


@settings(max_examples=15, deadline=None)
@given(small_configs(), st.integers(0, 2**16), st.data())
def test_prefill_then_decode_equals_one_full_pass(config, seed, data):
    model = random_model(config, seed)
    T = data.draw(st.integers(2, 24))
    prefill = data.draw(st.integers(1, T - 1))
    chunk = data.draw(st.integers(1, 3))  # decode in chunks of 1..3 tokens
    idx = ids(config, (2, T), seed)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, T)
        pieces = [model(idx[:, :prefill], cache=cache)]
        for start in range(prefill, T, chunk):
            pieces.append(model(idx[:, start : start + chunk], cache=cache, start_pos=start))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


@settings(max_examples=10, deadline=None)
@given(small_configs(), st.integers(0, 2**16))
def test_cached_decode_with_left_padding_equals_unpadded(config, seed):
    """Prefill a left-padded batch, decode with the cache: the padded row's logits equal its own run."""
    model = random_model(config, seed)
    short, long = ids(config, (1, 3), seed), ids(config, (1, 7), seed + 1)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    pad_mask = torch.ones(2, 12, dtype=torch.bool)
    pad_mask[0, :4] = False
    nxt = ids(config, (2, 5), seed + 2)
    with torch.no_grad():
        cache = model.new_cache(2, 12)
        model(batch, cache=cache, pad_mask=pad_mask[:, :7])
        steps = [
            model(nxt[:, i : i + 1], cache=cache, start_pos=7 + i, pad_mask=pad_mask[:, : 8 + i]) for i in range(5)
        ]
        alone = model(torch.cat([short, nxt[:1]], 1))
    torch.testing.assert_close(torch.cat(steps, 1)[0], alone[0, 3:], atol=ATOL, rtol=0)


def test_last_only_gives_the_last_positions_logits():
    model = random_model(OrionConfig.preset("toy", n_layers=2, vocab_size=97, max_seq_len=64), seed=2)
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, last_only=True), model(idx)[:, -1:], atol=ATOL, rtol=0)


def test_greedy_generate_equals_argmax_of_full_passes():
    model = random_model(OrionConfig.preset("toy", n_layers=2, vocab_size=97, max_seq_len=64), seed=1)
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    out = generate(model, idx, max_new_tokens=8)
    expected = idx
    with torch.no_grad():
        for _ in range(8):
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, expected)


@settings(max_examples=12, deadline=None)
@given(small_configs(), st.integers(0, 2**16))
def test_gqa_equals_multi_head_attention_with_repeated_kv_heads(config, seed):
    gqa = random_model(config, seed)
    group = config.n_heads // config.n_kv_heads
    mha = Orion(OrionConfig(**{**config.to_dict(), "n_kv_heads": config.n_heads})).eval()
    state = gqa.state_dict()
    for key, w in list(state.items()):
        if key.endswith(("attn.wk.weight", "attn.wv.weight")):  # (n_kv_heads * head_dim, dim)
            heads = w.view(config.n_kv_heads, config.head_dim, config.dim)
            state[key] = heads.repeat_interleave(group, dim=0).reshape(-1, config.dim)
    mha.load_state_dict(state)
    idx = ids(config, (2, 11), seed)
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx), atol=ATOL, rtol=0)


def test_no_attention_call_combines_a_mask_with_shared_kv_heads(monkeypatch):
    """CUDA's fused attention kernels take a mask, or share kv heads (enable_gqa), not both:
    given both, SDPA falls back to the math kernel, which holds every query's scores (a padded
    batch of 8k-token prompts: gigabytes per layer). No call may ask for that; the padded,
    masked calls must occur, or the test would pass on nothing."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.shape[2], attn_mask is not None, kwargs.get("enable_gqa", False)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(nano_orion.attention.F, "scaled_dot_product_attention", recording)
    config = OrionConfig.preset("toy", n_layers=1, vocab_size=64, max_seq_len=32)
    model = random_model(config, 0)
    idx, pad_mask = left_pad([[5, 6, 7], [8, 9, 10, 11, 12]], config.pad_id)
    generate(model, idx, 3, pad_mask=pad_mask)  # a padded prefill, then padded decoding steps
    generate(model, idx[1:], 3)  # a plain prefill and decoding
    model(idx)  # training's call: causal, no mask
    assert not any(masked and gqa for _, masked, gqa in calls)
    assert any(T == idx.shape[1] and masked for T, masked, _ in calls)  # the padded prefill


def test_attention_mask_by_hand():
    causal = attention_mask(torch.arange(2, 5), 5)[0, 0]  # queries at slots 2, 3, 4; keys 0..4
    assert causal.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]
    pad_mask = torch.tensor([[False, False, True, True]])
    padded = attention_mask(torch.arange(4), 4, pad_mask)[0, 0]
    assert padded.tolist() == [
        [True, False, False, False],  # a pad query sees only itself
        [False, True, False, False],
        [False, False, True, False],  # real tokens never see pads
        [False, False, True, True],
    ]
    # One query over a cache of 6 slots: the slots not yet written stay hidden, and a
    # pad_mask shorter than the cache (covering the tokens so far) is enough.
    decode = attention_mask(torch.tensor([3]), 6, pad_mask)[0, 0]
    assert decode.tolist() == [[False, False, True, True, False, False]]


def test_inconsistent_cache_arguments_are_refused_with_a_reason():
    model = random_model(OrionConfig.preset("toy", n_layers=1, vocab_size=64, max_seq_len=32))
    idx = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="needs the KV cache"):
        model(idx, start_pos=4)
    with pytest.raises(ValueError, match="pad_mask must cover"):
        model(idx, cache=model.new_cache(2, 10), start_pos=4, pad_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="KV cache holds 6 positions"):
        model(idx, cache=model.new_cache(2, 6), start_pos=4)
