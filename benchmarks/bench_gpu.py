"""Orion-MoE8x7B on one GPU: batch-1 decoding against the card's memory bandwidth, and against transformers.

Random weights of the real shape (RMSNorm, so that transformers' MixtralForCausalLM runs
the same model) are built straight on the GPU, one layer at a time: the host never holds
the model. Greedy decoding through generate.py's own path (sampler.generate_tokens, with
compile_decode_step's CUDA graph for the compiled rows). One table:

  * int8, every layer: decode tok/s eager and compiled, the share of the bandwidth
    ceiling (the card's measured GEMV bandwidth / bytes read per token), time to first
    token of a 512-token prompt, decode speed after a 4k- and an 8k-token prompt (the model
    card's long-input case), compile time, whether compiled greedy tokens equal eager, and
    the largest difference of their logits along the same tokens;
  * bf16 at every layer where it fits (e.g. one H200), else only the rows below;
  * bf16 at a depth that fits beside a transformers copy of the same weights: nano_orion
    eager and compiled against transformers eager.

    make bench-gpu PY=python3          # or: python3 -m benchmarks.bench_gpu [--hf-layers 8] [--new-tokens 128]
    python3 -m benchmarks.bench_gpu --device cpu --config toy --layers 2 --long 64 --prompt-tokens 16   # a smoke run
"""

import gc
import sys
import time
import traceback
from dataclasses import replace

import torch
from torch import nn

from nano_orion import Orion, OrionConfig
from nano_orion.cli import ArgumentParser, HelpFormatter
from nano_orion.config import PRESETS
from nano_orion.fast import accelerate
from nano_orion.hf_mixtral import to_mixtral
from nano_orion.model import Block, make_norm
from nano_orion.placement import free_bytes, gb
from nano_orion.quantize import Int8Linear, quantize_block
from nano_orion.sampler import compile_decode_step, decode_step_of, decoding_cache, generate


def main(argv=None):
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter, epilog=__doc__.split("\n\n", 1)[1]
    )
    p.add_argument("--device", default="cuda", help="the GPU; cpu for a smoke run of this script")
    p.add_argument("--config", default="orion-moe-8x7b", choices=sorted(PRESETS), help="model shape")
    p.add_argument(
        "--layers", type=int, default=None, help="layers of the int8 and full-depth bf16 models (default: the config's)"
    )
    p.add_argument("--hf-layers", type=int, default=8, help="layers of the bf16 model raced against transformers")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for time to first token and decoding")
    p.add_argument("--long", type=int, nargs="*", default=[4096, 8192], help="longer prompts to decode after")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per decode measurement")
    p.add_argument("--no-compile", action="store_true", help="eager rows only")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    config = PRESETS[args.config]
    config = replace(config, norm_type="rmsnorm", n_layers=args.layers or config.n_layers)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # A long prompt plus the generated tokens must fit the context: "8192" is 8192 - new tokens.
    longest = config.max_seq_len - args.new_tokens
    if any(length > longest for length in args.long):
        print(
            f"note: --long prompts cut to {longest} tokens, so that {args.new_tokens} new tokens still fit "
            f"{config.max_seq_len}"
        )
        args.long = [min(length, longest) for length in args.long]
    bandwidth = gemv_bandwidth(device)
    print(f"device: {name}; torch {torch.__version__}; bf16 GEMV reads {bandwidth / 1e12:.2f} TB/s (measured)")
    print(
        f"model: {args.config}, {config.n_layers} layers, batch 1, greedy; decode = (N - 2) / (time of N tokens - "
        "time of 2), "
        f"N = {args.new_tokens}, so that neither the prefill nor the first step (which records a CUDA graph) counts"
    )
    rows = [bench(config, True, args, bandwidth)]
    if fits(config, torch.bfloat16, device):
        rows.append(bench(config, False, args, bandwidth))
    else:
        print(
            f"\nbf16 with {config.n_layers} layers needs {gb(weight_bytes(config, torch.bfloat16))}: more than this "
            "device has"
        )
    rows.append(bench(replace(config, n_layers=args.hf_layers), False, args, bandwidth, with_transformers=True))
    print_table(rows, args)
    failures = [f"{row['label']}: {what}" for row in rows for what in row.get("failed", [])]
    for failure in failures:
        print(f"failed: {failure} (its traceback is above)")
    return 1 if failures else 0


def bench(config: OrionConfig, quantize: bool, args, bandwidth: float, with_transformers: bool = False) -> dict:
    """Build a model, measure it, and let its memory go before the next."""
    row = {"label": f"{'int8' if quantize else 'bf16'}, {config.n_layers} layers"}
    model = attempt(
        row, "building the model", lambda: build_random(config, torch.device(args.device), torch.bfloat16, quantize)
    )
    if model is not None:
        measure(row, model, args, bandwidth, with_transformers)
        del model
    release_memory()
    return row


# ---- a model of random weights, built on the device one layer at a time --------------------


@torch.no_grad()
def build_random(config: OrionConfig, device, dtype, quantize: bool) -> Orion:
    """Orion of random N(0, 0.02) weights (norms 1) in `dtype` on `device`, int8 if `quantize`;
    each layer is drawn on the device and (if asked) quantized before the next is made. Its
    experts are the fast ones (nano_orion/fast.py), as nano_orion.load gives them."""
    with torch.device("meta"):
        model = Orion(config)
    model.embed = random_(nn.Embedding(config.vocab_size, config.dim, device=device, dtype=dtype))
    for i in range(config.n_layers):
        with torch.device(device):
            block = random_(Block(config)).to(dtype)
        if quantize:
            quantize_block(block)
        model.layers[i] = block
    model.norm = make_norm(config).to(device, dtype)
    model.lm_head = random_(nn.Linear(config.dim, config.vocab_size, bias=False, device=device, dtype=dtype))
    if quantize:
        model.lm_head = Int8Linear(model.lm_head)
    model.init_rope(device)
    return accelerate(model).eval()


def random_(module: nn.Module) -> nn.Module:
    for name, p in module.named_parameters():
        if "norm" in name:
            nn.init.ones_(p)
        else:
            nn.init.normal_(p, std=0.02)
    return module


def weight_bytes(config: OrionConfig, dtype) -> int:
    return config.n_params() * dtype.itemsize


def fits(config: OrionConfig, dtype, device) -> bool:
    return device.type != "cuda" or weight_bytes(config, dtype) < free_bytes(device)


def release_memory() -> None:
    """Free what dropped models held: compiled graphs keep references to them too."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bytes_per_token(model: Orion) -> int:
    """Bytes of weights one decoding step reads: all but the embedding table (one row of it
    is read) and, of the stacked experts, top_k of n_experts."""
    c = model.config
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith(("embed", "rope")):
            continue
        share = (
            c.top_k / c.n_experts
            if name.split(".")[-1] in ("w1", "w2", "w3", "scale_w1", "scale_w2", "scale_w3")
            else 1
        )
        total += int(t.numel() * t.element_size() * share)
    return total


# ---- measurements ----------------------------------------------------------------------------


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int = 2) -> float:
    """Best wall time of fn() over a few runs (the first run may warm caches)."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def gemv_bandwidth(device) -> float:
    """Bytes per second a bf16 matrix-vector product reads: one Orion expert's w1 (14592 x 4096)
    times a vector, as decoding does (on the CPU, a smaller matrix)."""
    shape = (14592, 4096) if device.type == "cuda" else (2048, 1024)
    w = torch.randn(*shape, device=device, dtype=torch.bfloat16)
    x = torch.randn(1, shape[1], device=device, dtype=torch.bfloat16)
    torch.nn.functional.linear(x, w)
    t = timed(lambda: [torch.nn.functional.linear(x, w) for _ in range(20)], device, repeats=3) / 20
    return w.numel() * w.element_size() / t


def decode_rate(generate_k, n: int, device) -> float:
    """Tokens per second of decoding alone, generate_k(k) generating k tokens: (n - 2) / (time of
    n tokens - time of 2). Both include the prefill, and the first decoding step, where a
    compiled step records a CUDA graph for the generation's new KV cache."""
    return (n - 2) / (timed(lambda: generate_k(n), device) - timed(lambda: generate_k(2), device))


@torch.inference_mode()
def stepwise_logits(model, ids, prompt_len: int, decode_step) -> torch.Tensor:
    """The logits (steps, vocab) of each decoding step after a prefill of ids[:, :prompt_len],
    fed the tokens of `ids` whatever the step would have chosen (teacher forcing)."""
    cache = decoding_cache(model, 1, ids.shape[1])  # as generate makes it
    model(ids[:, :prompt_len], cache=cache)
    pos = torch.tensor(prompt_len, device=ids.device)
    logits = []
    for t in range(prompt_len, ids.shape[1]):
        # A contiguous (1, 1) id, as generation feeds the step: a slice of ids keeps its row
        # stride, and the step, compiled for contiguous ids, would compile a second graph.
        next_id = ids[:, t : t + 1].clone(memory_format=torch.contiguous_format)
        logits.append(decode_step(next_id, cache, pos, None)[:, -1].clone())  # clone: a CUDA graph reuses its output
        pos += 1
    return torch.cat(logits)


def measure(row: dict, model: Orion, args, bandwidth: float, with_transformers: bool = False) -> None:
    """Fill row (its "label" given) with the model's measurements; a failed part leaves its cells out."""
    device, c = model.embed.weight.device, model.config
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, c.vocab_size, (1, args.prompt_tokens), generator=g).to(device)
    read = bytes_per_token(model)
    row.update({"GB/token": read / 1e9, "ceiling": bandwidth / read})
    print(
        f"\n{row['label']}: {gb(sum(t.numel() * t.element_size() for t in model.state_dict().values()))} of weights, "
        f"{row['GB/token']:.2f} GB read per token: ceiling {row['ceiling']:.0f} tok/s"
    )
    attempt(row, "eager", lambda: measure_eager(row, model, prompt, args))
    if not args.no_compile:
        attempt(row, "compiled", lambda: measure_compiled(row, model, prompt, args, g))
        release_memory()
    if with_transformers:
        attempt(row, "transformers", lambda: measure_transformers(row, model, prompt, args))


def attempt(row: dict, what: str, measurement):
    """measurement()'s value; if it fails, its traceback is printed, the row notes the failure,
    and the value is None: one failure (out of memory at 8k tokens, say) should not cost a GPU
    run the rest of its table. main() lists the failures after the table and exits with 1."""
    try:
        return measurement()
    except Exception as e:
        traceback.print_exc(file=sys.stdout)  # with the table, in order, also when both go to one file
        message = (str(e).strip().splitlines() or [""])[0]
        row.setdefault("failed", []).append(f"{what} ({type(e).__name__}: {message})")
        return None


def measure_eager(row: dict, model: Orion, prompt, args) -> None:
    device = prompt.device
    row["eager"] = decode_rate(lambda k: generate(model, prompt, k), args.new_tokens, device)
    print(f"  eager decode {row['eager']:.1f} tok/s")
    row["ttft"] = timed(lambda: generate(model, prompt, 1), device)


def measure_compiled(row: dict, model: Orion, prompt, args, g: torch.Generator) -> None:
    device, n = prompt.device, args.new_tokens
    t0 = time.perf_counter()
    step = compile_decode_step(model, ahead_of_time=False)  # the GPU's way, also where the tests run it on a CPU
    row["compile s"] = time.perf_counter() - t0
    row["compiled"] = decode_rate(lambda k: generate(model, prompt, k, decode_step=step), n, device)
    eager_ids = generate(model, prompt[:, :32], 32)
    row["same tokens"] = torch.equal(generate(model, prompt[:, :32], 32, decode_step=step), eager_ids)
    # Random weights give near-flat logits, where rounding alone can flip a greedy choice, and
    # near-flat router scores, where it can flip a choice of expert (which moves that step's
    # logits a lot): so also compare the logits of every step, both fed the eager tokens, by
    # the median over steps of each step's largest difference. A real fault moves most steps.
    eager_logits, compiled_logits = (stepwise_logits(model, eager_ids, 32, s) for s in (decode_step_of(model), step))
    per_step = (compiled_logits - eager_logits).abs().amax(dim=-1) / eager_logits.std()
    row["dlogit"] = per_step.median().item()
    print(
        f"  compiled decode {row['compiled']:.1f} tok/s (compiling took {row['compile s']:.0f} s); "
        f"compiled greedy tokens equal eager: {row['same tokens']}; logit difference along them, in logit "
        f"standard deviations: {row['dlogit']:.3f} in the median step, {per_step.max().item():.3f} at most"
    )
    for length in args.long:
        long_prompt = torch.randint(3, model.config.vocab_size, (1, length), generator=g).to(device)
        attempt(row, f"decoding after {length} tokens", lambda: measure_after(row, model, long_prompt, step, n))


def measure_after(row: dict, model: Orion, long_prompt, step, n: int) -> None:
    length = long_prompt.shape[1]
    row[f"after {length}"] = decode_rate(
        lambda k: generate(model, long_prompt, k, decode_step=step), n, long_prompt.device
    )
    print(f"  compiled decode after a {length}-token prompt: {row[f'after {length}']:.1f} tok/s")


def measure_transformers(row: dict, model: Orion, prompt, args) -> None:
    hf = to_mixtral(model, attn_implementation="sdpa")
    hf.generation_config.eos_token_id = None

    @torch.inference_mode()
    def hf_generate(k):
        return hf.generate(
            prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False, attention_mask=torch.ones_like(prompt)
        )

    hf_generate(2)
    row["transformers"] = decode_rate(hf_generate, args.new_tokens, prompt.device)
    print(f"  transformers eager decode {row['transformers']:.1f} tok/s")


def print_table(rows: list[dict], args) -> None:
    columns = [
        ("GB/token", "GB read/token", "{:.2f}"),
        ("ceiling", "ceiling tok/s", "{:.0f}"),
        ("eager", "eager tok/s", "{:.1f}"),
        ("compiled", "compiled tok/s", "{:.1f}"),
        ("share", "% of ceiling", "{:.0%}"),
        ("ttft", f"TTFT {args.prompt_tokens} (s)", "{:.3f}"),
        *[(f"after {n}", f"tok/s after {n}", "{:.1f}") for n in args.long],
        ("compile s", "compile (s)", "{:.0f}"),
        ("same tokens", "compiled = eager", "{}"),
        ("dlogit", "median step's max |Δlogit| / std", "{:.3f}"),
        ("transformers", "transformers eager tok/s", "{:.1f}"),
        ("speed-up", "compiled / transformers", "{:.2f}x"),
    ]
    for row in rows:
        if "compiled" in row:
            row["share"] = row["compiled"] / row["ceiling"]
            if "transformers" in row:
                row["speed-up"] = row["compiled"] / row["transformers"]
    print("\n| model | " + " | ".join(title for _, title, _ in columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for row in rows:
        print(
            f"| {row['label']} | " + " | ".join(fmt.format(row[k]) if k in row else "" for k, _, fmt in columns) + " |"
        )


if __name__ == "__main__":
    sys.exit(main())
