"""The chunked cross-entropy (nano_orion/loss.py) against torch's own F.cross_entropy of the logits."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from nano_orion import Orion, OrionConfig
from nano_orion.loss import cross_entropy
from nano_orion.quantize import quantize_model


def problem(N, dim, vocab, seed, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, dim, generator=g, dtype=dtype) * scale).requires_grad_()
    w = torch.randn(vocab, dim, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, vocab, (N,), generator=g)
    return h, w, y


def plain_loss(h, w, y):
    """The reference: torch's cross-entropy of all the logits."""
    return F.cross_entropy(F.linear(h, w), y)


def value_and_grads(loss_fn, h, w, y, upstream=1.0):
    loss = loss_fn(h, w, y)
    grads = torch.autograd.grad(loss * upstream, (h, w))
    return loss.detach(), grads


@settings(max_examples=60, deadline=None)
@given(
    N=st.integers(1, 40),
    dim=st.integers(1, 12),
    vocab=st.integers(1, 50),
    chunk=st.integers(1, 17),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.1, 1.0, 30.0]),
    upstream=st.sampled_from([1.0, -2.5]),
)
def test_value_and_gradients_equal_cross_entropy_of_the_logits(N, dim, vocab, chunk, seed, scale, upstream):
    """Any number of positions, chunk sizes that do and do not divide it, logits from small to
    large (30 x: rows whose exp would overflow without the max shift), and a backward pass
    that does not start at 1 (the loss inside a bigger expression)."""
    h, w, y = problem(N, dim, vocab, seed, scale=scale)
    got, got_grads = value_and_grads(lambda h, w, y: cross_entropy(h, w, y, chunk), h, w, y, upstream)
    want, want_grads = value_and_grads(plain_loss, h, w, y, upstream)
    # The softmax runs in float32, as under autocast: float32's rounding of logits as large as
    # L moves each probability by about 1e-7 L relative, and the gradients by that times |w|, |h|.
    assert got.dtype == torch.float32
    L = max(1.0, F.linear(h, w).abs().max().item())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6 * L)
    for a, b, other in zip(got_grads, want_grads, (w, h)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * L * max(1.0, other.abs().max().item()))


def test_without_gradients_only_the_value_is_computed():
    h, w, y = problem(37, 8, 30, seed=1)
    with torch.no_grad():
        got = cross_entropy(h, w, y, chunk_size=5)
    assert got.grad_fn is None
    torch.testing.assert_close(got.double(), plain_loss(h, w, y).detach(), rtol=1e-6, atol=0)
    got = cross_entropy(h.detach(), w.detach(), y, chunk_size=5)  # nothing requires a gradient
    assert got.grad_fn is None


@pytest.mark.parametrize(
    "device, N, vocab, chunk",
    [
        ("cpu", 300, 500, 64),
        # a GPU's chunks (4096 positions), the second one partial
        pytest.param(
            "cuda", 5000, 3000, None, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
        ),
    ],
)
def test_under_bf16_autocast_it_matches_autocasts_own_linear_and_cross_entropy(device, N, vocab, chunk):
    """Matmuls in bf16, softmax in float32, gradients in the inputs' dtype, as autocast does
    for F.linear followed by F.cross_entropy."""
    h, w, y = (t.to(device) for t in problem(N, 64, vocab, seed=2, dtype=torch.float32))
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        got, got_grads = value_and_grads(lambda h, w, y: cross_entropy(h, w, y, chunk), h, w, y)
        want, want_grads = value_and_grads(plain_loss, h, w, y)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=0)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0.02 * b.abs().max().item())


class Recorder(TorchDispatchMode):
    """Records every operation run (its name) and the largest number of elements of any tensor
    an operation returns."""

    def __init__(self):
        super().__init__()
        self.ops, self.largest = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_all_the_logits_is_ever_made():
    """The point of the chunks, checked on every tensor the forward and backward produce:
    none is as large as N x vocab_size; the plain way makes several."""
    N, vocab, chunk = 64, 1000, 16
    h, w, y = problem(N, 8, vocab, seed=3, dtype=torch.float32)
    with Recorder() as chunked:
        cross_entropy(h, w, y, chunk).backward()
    with Recorder() as plain:
        plain_loss(h, w, y).backward()
    assert plain.largest == N * vocab
    assert chunked.largest == chunk * vocab


@pytest.mark.parametrize(
    "needs, mm_per_chunk", [((False, False), 1), ((True, False), 2), ((False, True), 2), ((True, True), 3)]
)
def test_only_the_gradients_asked_for_are_computed(needs, mm_per_chunk):
    """One matmul per chunk for the logits, and one more for each gradient wanted: evaluation
    (no gradients) and a frozen output layer (no gradient for w) do no wasted work."""
    h, w, y = problem(40, 8, 30, seed=6, dtype=torch.float32)
    h, w = h.detach().requires_grad_(needs[0]), w.detach().requires_grad_(needs[1])
    with Recorder() as rec:
        loss = cross_entropy(h, w, y, chunk_size=10)  # 4 chunks
    assert rec.ops.count("mm") == 4 * mm_per_chunk
    if any(needs):
        got = torch.autograd.grad(loss, [t for t in (h, w) if t.requires_grad])
        want = torch.autograd.grad(plain_loss(h, w, y), [t for t in (h, w) if t.requires_grad])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_under_fp16_autocast_the_small_gradients_survive():
    """float16 flushes (softmax - onehot) / N's small entries to zero when N is large; the
    gradient is kept in float32 then. A GradScaler-like factor scales the loss, as fp16 training does."""
    h, w, y = problem(8192, 32, 2048, seed=7, dtype=torch.float32)
    w = (w.detach() * 0.1).requires_grad_()
    exact = torch.autograd.grad(plain_loss(h, w, y), (h, w))
    with torch.autocast("cpu", dtype=torch.float16):
        got = torch.autograd.grad(cross_entropy(h, w, y) * 65536, (h, w))
    for a, b in zip(got, exact):
        assert ((a / 65536 - b).norm() / b.norm()).item() < 1e-3  # measured 2e-5 and 2e-4; kept in fp16, 2-3%


def test_mismatched_targets_and_second_derivatives_are_refused():
    h, w, y = problem(37, 8, 30, seed=8)
    with pytest.raises(ValueError, match="one target per row"):
        cross_entropy(h, w, y[:1])
    (grad_h,) = torch.autograd.grad(cross_entropy(h, w, y), h, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):  # first derivatives only: no silent zero
        grad_h.sum().backward()


def test_a_compiled_loss_is_one_graph_with_the_same_value_and_gradients():
    h, w, y = problem(50, 16, 40, seed=4, dtype=torch.float32)
    compiled = torch.compile(lambda h, w, y: cross_entropy(h, w, y, 16), fullgraph=True)  # fullgraph: no graph breaks
    got, got_grads = value_and_grads(compiled, h, w, y)
    want, want_grads = value_and_grads(plain_loss, h, w, y)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_the_models_loss_is_the_loss_of_its_logits():
    torch.manual_seed(0)
    model = Orion(OrionConfig.preset("toy", n_layers=2))
    x, y = torch.randint(0, 4096, (3, 40)), torch.randint(0, 4096, (3, 40))
    got = model.loss(x, y)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    want = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_a_quantized_models_loss_refuses_instead_of_reading_int8_as_weights():
    model = quantize_model(Orion(OrionConfig.preset("toy", n_layers=1)))
    x = torch.randint(0, 4096, (1, 8))
    with pytest.raises(ValueError, match="float output layer"):
        model.loss(x, x)
