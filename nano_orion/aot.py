"""The decoding step compiled ahead of time for the CPU: a library called with a few tensors.

torch.compile runs its compiled step from Python, and each call passes through layers of it:
the guards find the compiled code for these inputs, every parameter of the model is gathered as
an input, one by one, and the outputs are unpacked after. On a GPU that time hides behind the
kernels, which the host only queues; on the CPU the same thread that computes the step spends it,
once per token, however small the model.

Here torch.export traces the step once into a graph of tensor operations, AOTInductor
(`torch._inductor.aoti_compile_and_package`) compiles the graph into a shared library, the same
generated loops torch.compile would make, and each token calls the library with only the
tensors that change: the new token, its position, the padding mask and the KV cache. The weights
are the model's own tensors, lent to the library once (`load_constants(user_managed=True)`),
not copied. The cache's length is a dynamic dimension, so one library serves every generation
length.

What torch.compile's guards check before each call is checked here once per generation, at its
first step: the library was compiled for a batch size, with or without padding, for torch's
thread count and for the model's parameters as they were (their names, dtypes, shapes and
memory). A generation that finds any of them changed compiles a library for what it finds (a
model quantized in place, say); weights changed in place are read as they now are.
"""

import tempfile
import warnings
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

# Inductor's options for the library: the loops multiply and add in one instruction (a fused
# multiply-add), and the weights stay out of it (they are the model's, lent at load time)
OPTIONS = {"cpp.enable_floating_point_contract_flag": "fast", "aot_inductor.package_constants_in_so": False}


class FlatStep(nn.Module):
    """The model's one-token step with flat tensor arguments, as torch.export takes them:
    (next_id (B, 1), pos (), pad_mask (B, n_keys) or None, k0, v0, k1, v1, ...) ->
    (logits (B, 1, vocab_size), probs0, experts0, probs1, experts1, ...): the logits, and each
    layer's routing, which the step puts back on the model (Orion.routing) as an eager step would."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, next_id, pos, pad_mask, *kv):
        cache = [SimpleNamespace(k=k, v=v) for k, v in zip(kv[0::2], kv[1::2])]  # a KVCache is its k and v
        logits = self.model(next_id, cache=cache, start_pos=pos, pad_mask=pad_mask)
        return logits, *(t for routing in self.model.routing() for t in routing)


def compile_library(model, batch_size: int, padded: bool):
    """The model's one-token step exported and compiled for `batch_size` rows, with a padding
    mask if `padded`, and loaded with the model's own weights: an AOTICompiledModel."""
    c = model.config
    n_keys = min(16, c.max_seq_len)  # the example cache's length; any length from 2 to max_seq_len will do
    with torch.no_grad(), warnings.catch_warnings():  # export traces the step as generation runs it: no gradients
        # MoE.forward keeps its routing on the module; FlatStep returns it, so export's warning
        # that module attributes are set while tracing is moot, and torch's own packaging trips
        # a deprecation of torch's (pytree's LeafSpec)
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)", category=FutureWarning)
        cache = model.new_cache(batch_size, n_keys)
        pad_mask = torch.ones(batch_size, n_keys, dtype=torch.bool) if padded else None
        example = (torch.zeros(batch_size, 1, dtype=torch.long), torch.tensor(n_keys - 1), pad_mask)
        example += tuple(t for layer in cache for t in (layer.k, layer.v))
        length = torch.export.Dim("n_keys", min=2, max=c.max_seq_len)
        dynamic = (None, None, {1: length} if padded else None, tuple({2: length} for _ in range(2 * len(cache))))
        program = torch.export.export(FlatStep(model), example, dynamic_shapes=dynamic)
        for block in model.layers:
            block.moe.routing = None  # tracing left its placeholders there
        with tempfile.TemporaryDirectory() as folder:
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=str(Path(folder) / "step.pt2"), inductor_configs=OPTIONS
            )
            library = torch._inductor.aoti_load_package(package)
    weights = dict(model.named_parameters()) | dict(model.named_buffers())
    library.load_constants(
        {name: weights[name.removeprefix("model.")] for name in library.get_constant_fqns()},
        check_full_update=True,
        user_managed=True,
    )
    return library


def parameters_of(model) -> tuple:
    """What a library was compiled for, of the model: each parameter's and buffer's name, dtype,
    shape and memory (a tensor replaced by another, or converted, changes it)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return tuple((name, t.dtype, t.shape, t.data_ptr()) for name, t in tensors)


def aot_decode_step(model):
    """step(next_id, cache, pos, pad_mask) -> logits (B, 1, V), like sampler.decode_step_of(model),
    each call one call of a library compiled ahead of time (module docstring). The libraries are
    compiled as generations need them: one per batch size, padding, thread count and state of
    the model's parameters."""
    libraries = {}  # (batch_size, padded, threads, parameters_of(model)) -> library
    library = None  # the library of the generation under way
    last_pos = None  # a weak reference to that generation's pos, which it advances in place

    def step(next_id, cache, pos, pad_mask):
        nonlocal library, last_pos
        if last_pos is None or last_pos() is not pos:  # a generation's first step: which library fits it
            batch_size, padded = next_id.shape[0], pad_mask is not None
            key = (batch_size, padded, torch.get_num_threads(), parameters_of(model))
            if key not in libraries:
                libraries[key] = compile_library(model, batch_size, padded)
            library, last_pos = libraries[key], weakref.ref(pos)
        inputs = [next_id, pos, *([] if pad_mask is None else [pad_mask])]
        inputs += [t for layer in cache for t in (layer.k, layer.v)]
        logits, *routing = library.loader.boxed_run(inputs)  # the flat inputs straight to the library
        for block, probs, experts in zip(model.layers, routing[0::2], routing[1::2]):
            block.moe.routing = (probs, experts)
        return logits

    return step
