"""The model from ids to logits: few functions, and none of them about hardware."""

import ast
import io
import sys
import tokenize
from pathlib import Path

import pytest
import torch

import nano_orion
from nano_orion import Orion, OrionConfig
from nano_orion.fast import accelerate
from nano_orion.sampler import decode_step_of

PACKAGE = Path(nano_orion.__file__).parent
LESSON = ["rope.py", "attention.py", "model.py", "moe.py"]


def functions_run(call) -> set[str]:
    """The distinct nano_orion functions that call() runs, each as "file:first line name" (the
    same on every Python: code objects name their class only from 3.11)."""
    seen = set()

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call" and Path(code.co_filename).is_relative_to(PACKAGE):
            seen.add(f"{Path(code.co_filename).name}:{code.co_firstlineno} {code.co_name}")

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return seen


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@torch.inference_mode()
def test_a_prefill_and_a_decoding_step_run_few_functions(fast):
    """As generate runs them on the CPU (fast: the experts nano_orion.load gives; plain: Orion(config)'s),
    a 16-token prefill into a KV cache and a one-token step each run at most 12 functions."""
    torch.manual_seed(0)
    model = Orion(OrionConfig.preset("toy")).eval()
    if fast:
        accelerate(model)
    idx = torch.randint(0, model.config.vocab_size, (1, 16))
    cache = model.new_cache(1, 32)
    prefill = functions_run(lambda: model(idx, cache=cache, last_only=True))
    step = decode_step_of(model)
    decode = functions_run(lambda: step(idx[:, -1:], cache, torch.tensor(16), None))
    assert len(prefill) <= 12, sorted(prefill)
    assert len(decode) <= 12, sorted(decode)
    forward = f"model.py:{Orion.forward.__code__.co_firstlineno} forward"
    assert forward in prefill and forward in decode


def code_only(path: Path) -> str:
    """The source of path without its comments and docstrings."""
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                docstrings.add((first.lineno, first.col_offset))
    kept = [
        (t.type, t.string)
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type != tokenize.COMMENT and not (t.type == tokenize.STRING and t.start in docstrings)
    ]
    return tokenize.untokenize(kept)


@pytest.mark.parametrize("name", LESSON)
def test_the_lesson_knows_nothing_of_hardware(name):
    """rope, attention, model and moe: no probing of compilers, GPUs or torch versions, no kernels."""
    code = code_only(PACKAGE / name)
    for word in (
        "is_compiling",
        "torch._dynamo",
        "_dynamo",
        "get_device_capability",
        "torch.__version__",
        "__version__",
    ):
        assert word not in code, f"{name} uses {word}"
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        assert not any("triton" in m or "gemv" in m or m.endswith("fast") for m in modules), f"{name} imports {modules}"


def test_code_only_strips_prose_but_keeps_code():
    """The check above can fail: prose is dropped, code is kept."""
    stripped = code_only(PACKAGE / "fast.py")
    assert "is_compiling" in stripped and "get_device_capability" in stripped
    assert "Faster ways to run the experts" not in stripped  # the module docstring


def test_forward_returns_logits_and_loss_is_its_own_method():
    torch.manual_seed(0)
    model = Orion(OrionConfig.preset("toy", n_layers=1))
    idx = torch.randint(0, 4096, (2, 10))
    logits = model(idx)
    assert logits.shape == (2, 10, 4096) and logits.dtype == torch.float32
    assert model(idx, last_only=True).shape == (2, 1, 4096)
    loss = model.loss(idx[:, :-1], idx[:, 1:])
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(
        loss, torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    )
