"""nano_orion computes the same function as independent implementations: the fixtures' reference
logits, and transformers' MixtralForCausalLM holding the same weights (hf_mixtral.to_mixtral,
tested here)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nano_orion
from nano_orion.hf_mixtral import to_mixtral

from conftest import FIXTURES, random_model, reference, small_configs


def test_fixture_logits_match_reference(fixture_name):
    model, _ = nano_orion.load(FIXTURES / fixture_name)
    ref = reference(fixture_name)
    with torch.no_grad():
        logits = model(ref["input_ids"])
    assert logits.dtype == torch.float32
    assert logits.shape == ref["logits"].shape
    err = (logits - ref["logits"]).abs().max().item()
    assert err <= 1e-4, f"max |logits - reference| = {err}"


def test_fixture_greedy_matches_reference(fixture_name):
    model, _ = nano_orion.load(FIXTURES / fixture_name)
    ref = reference(fixture_name)
    prompt, expected = ref["prompt_ids"], ref["greedy_ids"]
    out = nano_orion.generate(model, prompt, max_new_tokens=expected.shape[1] - prompt.shape[1])
    assert torch.equal(out, expected)


def test_norm_type_is_read_from_the_weights():
    assert nano_orion.load(FIXTURES / "orion-mini-layernorm")[0].config.norm_type == "layernorm"
    assert nano_orion.load(FIXTURES / "orion-mini-rmsnorm")[0].config.norm_type == "rmsnorm"


@settings(max_examples=12, deadline=None, derandomize=True)
@given(config=small_configs(), seed=st.integers(0, 2**16), batch=st.integers(1, 2), T=st.integers(1, 20))
def test_random_models_match_transformers_mixtral(config, seed, batch, T):
    """Live parity on configurations the fixtures do not cover (both norm types)."""
    model = random_model(config, seed)
    hf = to_mixtral(model)
    idx = torch.randint(0, config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
