"""Generation speed: nano_orion vs transformers' MixtralForCausalLM on the same weights, and
nano_orion's batch-1 decoding against the CPU's read bandwidth.

The race: same random weights, same prompt, CPU, float32, greedy. Measures, in one run:
  * batch-1 decode tokens/s (the number a chat user feels), and its ratio;
  * prefill time of a 512-token prompt;
  * batch-8 decode tokens/s.
Decode rate = (N - 1) / (time for N new tokens - time for 1 new token), so the prefill
is not counted. Each timing is the best of a few repeats (the machine may be shared).

The roofline table: batch-1 decoding reads every weight a token needs once, so its speed
is bounded by bandwidth / bytes read per token. For each thread count it measures the read
bandwidth (summing a tensor as big as the float32 model's bytes per token) and, for float32,
bfloat16 and int8 weights (quantize.py), eager and compiled: tokens/s, the bytes of weights
read per token, tokens/s as a share of that bound, and each row's speed against float32 and
against one thread. A thread count's timings take turns, best of --repeats.

    make bench      # or: python -m benchmarks.bench_generate [--config toy] [--threads 1] [--compile]
"""

import os
import platform
import time

import torch

import nano_orion
from benchmarks.bench_gpu import bytes_per_token
from nano_orion import Orion, OrionConfig
from nano_orion.cli import ArgumentParser, HelpFormatter
from nano_orion.fast import accelerate
from nano_orion.hf_mixtral import to_mixtral
from nano_orion.quantize import quantize_model
from nano_orion.sampler import compile_decode_step

# Two shapes, both Orion's architecture (8 experts top-2, GQA, RMSNorm as in Mixtral):
#  * "toy": the model `make demo` trains (4 layers, dim 128; 4.4 M parameters). Its weights
#    stay in the CPU's caches, so per-layer overhead decides the speed;
#  * "orion-67m": 12 layers, dim 256, vocab 16000 (67 M parameters, 270 MB in float32,
#    20 M active per token). Decoding reads ~80 MB of weights per token from DRAM, the same
#    bytes for both libraries, so memory bandwidth bounds both and the ratio shrinks.
CONFIGS = {
    "toy": OrionConfig.preset("toy", norm_type="rmsnorm"),
    "orion-67m": OrionConfig(
        vocab_size=16000,
        dim=256,
        n_layers=12,
        n_heads=8,
        n_kv_heads=2,
        ffn_dim=768,
        n_experts=8,
        top_k=2,
        norm_type="rmsnorm",
        max_seq_len=1024,
    ),
}

# The roofline table's shape: Orion's architecture at 5.9 M parameters read per token (24 MB
# in float32), small enough to stay in the CPU's caches, so the bound is the caches' bandwidth.
ROOFLINE_CONFIG = OrionConfig(
    vocab_size=8192,
    dim=256,
    n_layers=4,
    n_heads=8,
    n_kv_heads=2,
    ffn_dim=512,
    n_experts=8,
    top_k=2,
    norm_type="rmsnorm",
    max_seq_len=512,
)


def best_times(fns: dict, repeats: int) -> dict:
    """Best wall time of each function, the functions taking turns so that a busy spell on a
    shared machine hits all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--config",
        choices=sorted(CONFIGS),
        action="append",
        help="model shape; repeatable (default: all of them, one after another)",
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per decode measurement")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for the decode measurements")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per timing; the best is kept")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time a compiled decode step (compile_decode_step; adds a few minutes of compiling)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch CPU threads (default: torch's choice, %(default)s here)",
    )
    parser.add_argument(
        "--roofline-threads",
        type=int,
        nargs="*",
        default=[1, 2],
        help="thread counts of the roofline table (none: no table); its compiled rows need --compile",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, float32"
    )
    for name in args.config or CONFIGS:
        run(name, CONFIGS[name], args)
    if args.roofline_threads:
        roofline(ROOFLINE_CONFIG, args)


def run(name: str, c: OrionConfig, args):
    torch.manual_seed(0)
    model = accelerate(Orion(c)).eval()
    hf = to_mixtral(model, attn_implementation="sdpa")  # transformers' default attention
    hf.generation_config.eos_token_id = None  # never stop early: both generate exactly N tokens
    N = args.new_tokens
    print(f"\n== {name}: {c}")
    print(
        f"parameters: {c.n_params() / 1e6:.1f} M ({c.n_params() * 4 / 1e6:.0f} MB), active per token "
        f"{c.n_active_params() / 1e6:.1f} M"
    )

    def nano(idx, n):
        return nano_orion.generate(model, idx, n)

    @torch.inference_mode()
    def hf_gen(idx, n):
        return hf.generate(
            idx, max_new_tokens=n, min_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(idx)
        )

    prompt = torch.randint(3, c.vocab_size, (1, args.prompt_tokens))
    same = torch.equal(nano(prompt, 16), hf_gen(prompt, 16))
    print(f"greedy tokens identical to transformers: {same}")

    rows = []
    for batch in (1, 8):
        idx = prompt.expand(batch, -1).contiguous()
        nano(idx, 2), hf_gen(idx, 2)  # warm up
        t = best_times(
            {
                "nano N": lambda: nano(idx, N),
                "hf N": lambda: hf_gen(idx, N),
                "nano 1": lambda: nano(idx, 1),
                "hf 1": lambda: hf_gen(idx, 1),
            },
            args.repeats,
        )
        ours, theirs = (batch * (N - 1) / (t[f"{name} N"] - t[f"{name} 1"]) for name in ("nano", "hf"))
        rows.append((f"decode batch {batch} (tok/s)", ours, theirs, ours / theirs))

    if args.compile:
        t0 = time.perf_counter()
        compiled = compile_decode_step(model)
        print(f"compiling the decode step took {time.perf_counter() - t0:.0f} s")

        def nano_compiled(idx, n):
            return nano_orion.generate(model, idx, n, decode_step=compiled)

        assert torch.equal(nano_compiled(prompt, 16), nano(prompt, 16)), "compiled decode differs from eager"
        t = best_times(
            {
                "nano N": lambda: nano_compiled(prompt, N),
                "hf N": lambda: hf_gen(prompt, N),
                "nano 1": lambda: nano_compiled(prompt, 1),
                "hf 1": lambda: hf_gen(prompt, 1),
            },
            args.repeats,
        )
        ours, theirs = ((N - 1) / (t[f"{name} N"] - t[f"{name} 1"]) for name in ("nano", "hf"))
        rows.append(("decode batch 1, compiled", ours, theirs, ours / theirs))

    long_prompt = torch.randint(3, c.vocab_size, (1, 512))

    @torch.inference_mode()
    def nano_prefill():
        model(long_prompt, cache=model.new_cache(1, 512))

    @torch.inference_mode()
    def hf_prefill():
        hf(long_prompt, use_cache=True)

    nano_prefill(), hf_prefill()
    t = best_times({"nano": nano_prefill, "hf": hf_prefill}, args.repeats)
    rows.append(("prefill 512 tokens (ms)", 1e3 * t["nano"], 1e3 * t["hf"], t["hf"] / t["nano"]))

    print(f"{'':28s}{'nano_orion':>12s}{'transformers':>14s}{'speed-up':>10s}")
    for label, ours, theirs, ratio in rows:
        print(f"{label:28s}{ours:12.1f}{theirs:14.1f}{ratio:9.2f}x")


def read_bandwidth(x: torch.Tensor, repeats: int = 10) -> float:
    """Bytes per second that summing the float32 tensor x reads, best of `repeats` in a row:
    x stays in the caches as far as it fits, as a decoding model's weights do from token to token."""
    x.sum()
    return x.numel() * 4 / best_times({"sum": x.sum}, repeats)["sum"]


def decode_models(c: OrionConfig) -> dict:
    """The roofline table's models: the same random weights in float32, bfloat16 and int8."""
    models = {}
    for dtype in ("float32", "bfloat16", "int8"):
        torch.manual_seed(0)
        model = accelerate(Orion(c)).eval()
        if dtype == "bfloat16":
            model.to(torch.bfloat16)
        if dtype == "int8":
            quantize_model(model)
        models[dtype] = model
    return models


def roofline(c: OrionConfig, args) -> list[dict]:
    """Print (and return) the roofline table (module docstring): one row per thread count,
    weights' dtype and way of running (eager, compiled). At each thread count every row's
    timings take turns (best_times), so that a busy spell on a shared machine slows them alike
    and the ratios between rows hold; the bandwidth is the better of a probe before and after."""
    models = decode_models(c)
    N = args.new_tokens
    prompt = torch.randint(3, c.vocab_size, (1, args.prompt_tokens))
    reference = nano_orion.generate(models["float32"], prompt, 16)  # eager float32's greedy tokens
    x = torch.randn(bytes_per_token(models["float32"]) // 4)  # the bandwidth probe's tensor
    rows = []
    for threads in args.roofline_threads:
        torch.set_num_threads(threads)
        runs = {}  # (dtype, way) -> generate(n)
        for dtype, model in models.items():
            for way in ("eager", "compiled") if args.compile else ("eager",):
                step = compile_decode_step(model) if way == "compiled" else None
                runs[dtype, way] = lambda n, model=model, step=step: nano_orion.generate(
                    model, prompt, n, decode_step=step
                )
        bandwidth = read_bandwidth(x)
        timed = {}
        for key, gen in runs.items():
            gen(2)  # warm up
            timed[(*key, N)] = lambda gen=gen: gen(N)
            timed[(*key, 2)] = lambda gen=gen: gen(2)
        t = best_times(timed, args.repeats)
        bandwidth = max(bandwidth, read_bandwidth(x))
        for (dtype, way), gen in runs.items():
            tok_s = (N - 2) / (t[dtype, way, N] - t[dtype, way, 2])
            same = torch.equal(gen(16), reference)
            read = bytes_per_token(models[dtype])
            rows.append(
                dict(threads=threads, dtype=dtype, way=way, tok_s=tok_s, read=read, bandwidth=bandwidth, same=same)
            )
    torch.set_num_threads(args.threads)
    print_roofline(c, rows)
    return rows


def print_roofline(c: OrionConfig, rows: list[dict]) -> None:
    """The table: each row's tok/s, bytes, share of the bound, and its speed against float32
    (same way, same threads) and against the first thread count (same dtype, same way)."""
    tok_s = {(r["threads"], r["dtype"], r["way"]): r["tok_s"] for r in rows}
    first = rows[0]["threads"]
    print(f"\n== roofline, batch-1 greedy decoding: {c}")
    print(
        "| threads | weights | step | tok/s | MB read/token | read GB/s | share of roofline "
        f"| x float32 | x {first} thread{'s' * (first > 1)} | tokens = eager float32 |"
    )
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        share = r["tok_s"] * r["read"] / r["bandwidth"]
        vs_float32 = r["tok_s"] / tok_s[r["threads"], "float32", r["way"]]
        vs_first = r["tok_s"] / tok_s[first, r["dtype"], r["way"]]
        print(
            f"| {r['threads']} | {r['dtype']} | {r['way']} | {r['tok_s']:,.0f} | {r['read'] / 1e6:.1f} | "
            f"{r['bandwidth'] / 1e9:.1f} | {share:.0%} | {vs_float32:.2f} | {vs_first:.2f} | "
            f"{'yes' if r['same'] else 'no'} |"
        )


if __name__ == "__main__":
    main()
