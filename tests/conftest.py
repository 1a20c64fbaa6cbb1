"""Shared test helpers: the fixture checkpoints and their reference outputs, random small
models, the device the GPU-path tests use (DEVICE; without a GPU, Triton kernels run in its
interpreter), and checks of weights and of one-line usage errors."""

import functools
import importlib.util
import os
from pathlib import Path

import torch

# Without a GPU, Triton kernels (nano_orion/gemv.py) run in Triton's interpreter, on CPU
# tensors. Set before nano_orion is imported: the kernel module reads it when it loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import strategies as st
from safetensors.torch import load_file

from nano_orion import Orion, OrionConfig

ROOT = Path(__file__).parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
FIXTURE_NAMES = ["orion-mini-layernorm", "orion-mini-rmsnorm"]


@functools.cache
def load_script(relative_path: str):
    """A script of the repository (generate.py, convert.py, docs/make_figures.py) imported
    as a module, so that tests can call its functions and main(argv)."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line_error(stderr: str) -> str:
    """The single line of a usage error, checked to be one line and no traceback."""
    assert "Traceback" not in stderr and stderr.count("\n") == 1, stderr
    return stderr.strip()


def usage_error(capsys, main, argv) -> str:
    """The line of the usage error a script's main(argv) exits with (status 2, nothing on stdout)."""
    with pytest.raises(SystemExit) as exit:
        main(list(argv))
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and out == "", out
    return one_line_error(err)


def reference(name: str) -> dict[str, torch.Tensor]:
    """Outputs of an independent implementation (transformers) on the fixture's weights."""
    return load_file(FIXTURES / name / "reference.safetensors")


def assert_same_weights(loaded, model):
    """loaded has model's config and exactly its tensors."""
    original = model.state_dict()
    assert loaded.config == model.config and loaded.state_dict().keys() == original.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


@st.composite
def small_configs(draw, norm_type=None, max_len=32):
    """Random small configurations: MHA, GQA and MQA; 1..6 experts; top_k 1..3."""
    n_kv_heads = draw(st.sampled_from([1, 2, 4]))
    n_heads = n_kv_heads * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    n_experts = draw(st.integers(1, 6))
    return OrionConfig(
        vocab_size=draw(st.integers(8, 300)),
        dim=n_heads * head_dim,
        n_layers=draw(st.integers(1, 3)),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        ffn_dim=draw(st.sampled_from([8, 24, 40])),
        n_experts=n_experts,
        top_k=draw(st.integers(1, min(3, n_experts))),
        rope_theta=draw(st.sampled_from([10_000.0, 1_000_000.0])),
        norm_type=norm_type or draw(st.sampled_from(["layernorm", "rmsnorm"])),
        max_seq_len=max_len,
    )


def random_model(config: OrionConfig, seed: int = 0) -> Orion:
    """A model with random weights; the router weights are wide so that the top-k choice
    is never within float noise of a tie (two implementations could break it differently)."""
    torch.manual_seed(seed)
    model = Orion(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms: not the identity, so that they are really tested
                p.normal_(1.0, 0.2)
        for block in model.layers:
            block.moe.router.weight.normal_(0.0, 1.0)
    return model.eval()


# The device the tests of GPU code paths use: a GPU where there is one, else the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=FIXTURE_NAMES)
def fixture_name(request):
    return request.param


def small_model(norm_type="layernorm", n_layers=3, seed=0) -> Orion:
    """A random 3-layer model of 32 numbers per token and 100 pieces: quick to save, load and place."""
    config = OrionConfig.preset(
        "toy", norm_type=norm_type, vocab_size=100, dim=32, n_layers=n_layers, ffn_dim=16, max_seq_len=32
    )
    return random_model(config, seed)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The Zen of Python (tests/corpus/zen.txt), repeated to the 32 kB a 320-piece tokenizer needs: easy to memorise."""
    zen = (ROOT / "tests" / "corpus" / "zen.txt").read_text().rstrip("\n")
    path = tmp_path_factory.mktemp("corpus") / "zen.txt"
    path.write_text((zen + "\n\n") * 40)
    return path


def assert_same_with_gradients(out, ref, inputs):
    """out equals ref, and so do the gradients of a loss of each with respect to `inputs`."""
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    grads_out = torch.autograd.grad(out.square().sum(), inputs)
    grads_ref = torch.autograd.grad(ref.square().sum(), inputs)
    for a, b in zip(grads_out, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
