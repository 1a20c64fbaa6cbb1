"""Routing and expert dispatch."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nano_orion import OrionConfig
from nano_orion.moe import MoE, expert_counts, load_balancing_loss, moe_grouped, moe_reference, route

from conftest import assert_same_with_gradients


@st.composite
def routing_problems(draw):
    n_experts = draw(st.integers(1, 8))
    top_k = draw(st.integers(1, n_experts))
    N = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, n_experts, generator=g) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    return logits, top_k, g


@settings(max_examples=60, deadline=None)
@given(routing_problems())
def test_route_weights_are_a_distribution_over_top_k_distinct_experts(problem):
    logits, top_k, _ = problem
    probs, weights, experts = route(logits, top_k)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(logits)))
    for row in experts.tolist():
        assert len(set(row)) == top_k
    # The chosen experts are the top_k of the router probabilities: none left out is larger.
    chosen = probs.gather(1, experts)
    left_out = probs.scatter(1, experts, float("-inf"))
    assert (chosen.min(-1).values >= left_out.max(-1).values).all()


@settings(max_examples=60, deadline=None)
@given(routing_problems())
def test_renormalised_top_k_equals_softmax_over_chosen_logits(problem):
    logits, top_k, _ = problem
    _, weights, experts = route(logits, top_k)
    torch.testing.assert_close(weights, F.softmax(logits.gather(1, experts), dim=-1))


def random_experts(g, E, dim, ffn_dim, requires_grad=False):
    w1, w3 = (torch.randn(E, ffn_dim, dim, generator=g, requires_grad=requires_grad) for _ in range(2))
    w2 = torch.randn(E, dim, ffn_dim, generator=g, requires_grad=requires_grad)
    return w1, w3, w2


@settings(max_examples=40, deadline=None)
@given(routing_problems(), st.sampled_from([4, 16]), st.sampled_from([8, 20]))
def test_grouped_experts_equal_reference_loop(problem, dim, ffn_dim):
    """moe_grouped (the Experts module's way: tokens sorted into one block per expert) against
    the reference loop, values and gradients."""
    logits, top_k, g = problem
    N, E = logits.shape
    x = torch.randn(N, dim, generator=g, requires_grad=True)
    w1, w3, w2 = random_experts(g, E, dim, ffn_dim, requires_grad=True)
    _, weights, experts = route(logits, top_k)
    grouped = moe_grouped(x, weights, experts, w1, w3, w2)
    slow = moe_reference(x, weights, experts, w1, w3, w2)
    assert_same_with_gradients(grouped, slow, (x, w1, w3, w2))  # so training may use it


def test_expert_counts_equal_bincount():
    experts = torch.randint(0, 6, (50, 2), generator=torch.Generator().manual_seed(0))
    counts = expert_counts(experts, 8)
    assert counts.dtype == torch.int32
    assert counts.tolist() == experts.flatten().bincount(minlength=8).tolist()


def test_reference_loop_matches_a_per_token_formula():
    """The reference itself, against the formula y = sum_j w_j expert_{e_j}(x) token by token."""
    g = torch.Generator().manual_seed(0)
    E, D, F_, N, k = 4, 6, 10, 7, 2
    x = torch.randn(N, D, generator=g)
    w1, w3 = torch.randn(E, F_, D, generator=g), torch.randn(E, F_, D, generator=g)
    w2 = torch.randn(E, D, F_, generator=g)
    _, weights, experts = route(torch.randn(N, E, generator=g), k)
    y = moe_reference(x, weights, experts, w1, w3, w2)
    for n in range(N):
        expected = sum(
            weights[n, j] * (w2[e] @ (F.silu(w1[e] @ x[n]) * (w3[e] @ x[n]))) for j, e in enumerate(experts[n].tolist())
        )
        torch.testing.assert_close(y[n], expected, atol=1e-4, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**16), st.integers(2, 30))
def test_permuting_tokens_permutes_outputs(seed, N):
    torch.manual_seed(seed)
    moe = MoE(OrionConfig(dim=16, ffn_dim=24, n_experts=5, top_k=2, n_heads=2, n_kv_heads=1, vocab_size=10))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, N, 16)
    perm = torch.randperm(N)
    with torch.no_grad():
        y, y_perm = moe(x), moe(x[:, perm])
    torch.testing.assert_close(y_perm, y[:, perm], atol=1e-4, rtol=1e-4)


def test_load_balancing_loss_is_top_k_when_balanced_and_grows_when_collapsed():
    E, k, N = 8, 2, 64
    # Perfect balance: uniform probabilities, every expert chosen by N * k / E tokens.
    uniform = torch.full((N, E), 1 / E)
    balanced = torch.stack([torch.arange(k) + 2 * (n % (E // k)) for n in range(N)])
    assert torch.isclose(load_balancing_loss(uniform, balanced), torch.tensor(float(k)))
    # Collapse: every token sends everything to experts 0 and 1.
    collapsed_probs = torch.zeros(N, E)
    collapsed_probs[:, :2] = 0.5
    collapsed = torch.tensor([[0, 1]] * N)
    loss = load_balancing_loss(collapsed_probs, collapsed)
    assert loss > k
    assert torch.isclose(loss, torch.tensor(E * (1.0 * 0.5 + 1.0 * 0.5)))  # E * sum f_e P_e by hand
    # Partial concentration lies in between.
    logits = torch.randn(N, E, generator=torch.Generator().manual_seed(0)) + torch.tensor([3.0] + [0.0] * (E - 1))
    probs, _, experts = route(logits, k)
    assert k < load_balancing_loss(probs, experts) < loss


def test_load_balancing_loss_reaches_the_router():
    torch.manual_seed(0)
    moe = MoE(OrionConfig(dim=8, ffn_dim=8, n_experts=4, top_k=2, n_heads=2, n_kv_heads=1, vocab_size=10))
    for p in moe.parameters():
        torch.nn.init.normal_(p)
    moe(torch.randn(1, 12, 8))
    probs, experts = moe.routing
    load_balancing_loss(probs, experts).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
