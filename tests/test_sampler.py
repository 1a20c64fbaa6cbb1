"""Logits processors and sampling: properties (hypothesis) and agreement with transformers' processors."""

import functools

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import nano_orion
from nano_orion.sampler import (
    ORION_DEMO,
    SamplingConfig,
    apply_no_repeat_ngram,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    sample,
)

from conftest import FIXTURES, reference

FIXTURE = FIXTURES / "orion-mini-rmsnorm"
SETTINGS = settings(max_examples=40, deadline=None)


@pytest.fixture(scope="module")
def model_and_tok():
    return fixture_model()


@pytest.fixture(scope="module")
def ref():
    return reference(FIXTURE.name)


def random_logits(seed, B=3, V=50):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3  # distinct values: no ties


@SETTINGS
@given(st.integers(0, 2**16), st.integers(1, 49))
def test_top_k_never_picks_outside_the_k_most_likely(seed, k):
    logits = random_logits(seed)
    top = logits.topk(k, dim=-1).indices
    processed = apply_top_k(logits, k)
    assert torch.equal(processed.isfinite().sum(-1), torch.full((3,), k))
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        picked = sample(processed, temperature=1.0, generator=g)  # (B, 1)
        assert (top == picked).any(-1).all()
    assert torch.equal(processed, TopKLogitsWarper(k)(None, logits.clone()))


@SETTINGS
@given(st.integers(0, 2**16), st.floats(0.05, 0.95))
def test_top_p_keeps_the_smallest_prefix_with_mass_p(seed, p):
    logits = random_logits(seed)
    probs = logits.double().softmax(-1)
    kept = apply_top_p(logits, p).isfinite()
    for b in range(logits.shape[0]):
        order = probs[b].argsort(descending=True).tolist()
        mass, n = 0.0, 0
        while mass < p:  # the smallest prefix of the most likely tokens holding >= p
            mass += probs[b, order[n]].item()
            n += 1
        assume(abs(mass - p) > 1e-5 and abs(mass - probs[b, order[n - 1]].item() - p) > 1e-5)  # not a float tie
        assert set(torch.nonzero(kept[b]).flatten().tolist()) == set(order[:n])
    assert torch.equal(kept, TopPLogitsWarper(p)(None, logits.clone()).isfinite())


@SETTINGS
@given(st.integers(0, 2**16), st.floats(1.01, 3.0))
def test_repetition_penalty_lowers_repeated_tokens(seed, penalty):
    logits = random_logits(seed)
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(seed))
    out = apply_repetition_penalty(logits, ids, penalty)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[torch.arange(3)[:, None], ids] = True
    assert (out[seen] < logits[seen]).all()  # every repeated token becomes less likely ...
    assert torch.equal(out[~seen], logits[~seen])  # ... and nothing else changes
    assert torch.allclose(out, RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()))


@SETTINGS
@given(st.integers(0, 2**16), st.integers(1, 4), st.integers(0, 20))
def test_no_repeat_ngram_matches_transformers(seed, n, length):
    ids = torch.randint(0, 4, (3, length), generator=torch.Generator().manual_seed(seed))  # small vocab: many repeats
    logits = random_logits(seed, V=6)
    ours = apply_no_repeat_ngram(logits, ids, n)
    theirs = NoRepeatNGramLogitsProcessor(n)(ids, logits.clone())
    assert torch.equal(ours, theirs)


@functools.cache
def fixture_model():
    return nano_orion.load(FIXTURE)


@settings(max_examples=4, deadline=None)
@given(st.integers(2, 4), st.integers(0, 2**16))
def test_generation_never_repeats_an_ngram(n, seed):
    model, tok = fixture_model()
    prompt = torch.tensor([tok.encode("expert expert expert")])
    g = torch.Generator().manual_seed(seed)
    sampling = SamplingConfig(temperature=1.5, top_k=4, no_repeat_ngram_size=n)
    out = nano_orion.generate(model, prompt, 20, sampling, generator=g)[0].tolist()
    ngrams = [tuple(out[i : i + n]) for i in range(len(out) - n + 1)]
    new = ngrams[len(prompt[0]) - n + 1 :]  # n-grams ending in a generated token
    assert all(ngrams.count(g) == 1 for g in new)


def test_low_temperature_matches_greedy(model_and_tok, ref):
    model, _ = model_and_tok
    g = torch.Generator().manual_seed(0)
    out = nano_orion.generate(model, ref["prompt_ids"], 24, SamplingConfig(temperature=1e-4), generator=g)
    assert torch.equal(out, ref["greedy_ids"])


def test_same_seed_same_tokens(model_and_tok, ref):
    model, _ = model_and_tok
    runs = [
        nano_orion.generate(model, ref["prompt_ids"], 20, ORION_DEMO, generator=torch.Generator().manual_seed(seed))
        for seed in (7, 7, 8)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # and the seed does matter
