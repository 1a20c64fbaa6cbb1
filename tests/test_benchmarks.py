"""The benchmark scripts run (tiny shapes, on the CPU): a GPU session's one prepared run
must not be the first time their code executes."""

import argparse
import math
from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from benchmarks import bench_generate, bench_gpu, bench_train
from nano_orion import Orion, OrionConfig

# bench_gpu on the CPU at tiny sizes: the toy shape, one layer beside transformers, short prompts
TINY_RUN = "--device cpu --config toy --hf-layers 1 --prompt-tokens 8 --long 24"


def test_bench_gpu_runs_and_prints_its_table(capsys):
    status = bench_gpu.main(TINY_RUN.split() + ["--layers", "2", "--new-tokens", "6", "--no-compile"])
    out = capsys.readouterr().out
    assert status == 0 and "failed" not in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert (
        table[0].startswith("| model | GB read/token") and len(table) == 2 + 3
    )  # header, rule, int8 + bf16 + bf16 beside transformers
    assert table[2].startswith("| int8, 2 layers |") and table[4].startswith("| bf16, 1 layers |")
    assert "TTFT 8 (s)" in table[0] and "tok/s after 24" in table[0]
    assert "transformers eager decode" in out


def test_bench_gpu_measures_a_compiled_step(capsys):
    """The compiled rows: compile time, decoding after a longer prompt, and compiled against
    eager (greedy tokens, and the logits along them, which must agree closely on the CPU)."""
    config = bench_gpu.PRESETS["toy"]
    torch.manual_seed(6)  # weights whose router, at one step, has two experts within rounding of each other
    model = bench_gpu.build_random(
        bench_gpu.replace(config, n_layers=1, norm_type="rmsnorm"), torch.device("cpu"), torch.bfloat16, quantize=True
    )
    options = argparse.Namespace(new_tokens=6, prompt_tokens=40, long=[48], no_compile=False)
    graphs = counters["stats"]["unique_graphs"]
    row = {"label": "int8, 1 layer"}
    bench_gpu.measure(row, model, options, bandwidth=1e10)
    assert counters["stats"]["unique_graphs"] - graphs == 1  # compiled once: every row replays that step
    # measured (at 6 tokens on a busy machine timing noise can give a rate any sign, so only that)
    assert all(math.isfinite(row[k]) for k in ("compiled", "after 48")) and row["compile s"] > 0
    assert row["dlogit"] < 0.05  # in logit standard deviations, in the median step (measured: 0.017)
    assert "compiled greedy tokens equal eager" in capsys.readouterr().out


def test_a_failing_measurement_costs_only_its_own_cells(monkeypatch, capsys):
    """A GPU run is one shot: when compiling fails, the eager and transformers numbers still
    make the table, the failure is named after it (its traceback before), and the status is 1."""

    def no_compiler(model, ahead_of_time):
        raise RuntimeError("no kernel for this shape\nsecond line")

    monkeypatch.setattr(bench_gpu, "compile_decode_step", no_compiler)
    status = bench_gpu.main(TINY_RUN.split() + ["--layers", "1", "--new-tokens", "4"])
    captured = capsys.readouterr()
    table = [
        line.split(" | ")
        for line in captured.out.splitlines()
        if line.startswith("| int8") or line.startswith("| bf16")
    ]
    # every row's eager tok/s was measured (a number, not the blank of a failed part; at 4 tokens on a
    # busy machine timing noise can make it any number, so its value is not checked)
    assert status == 1 and len(table) == 3 and all(math.isfinite(float(cells[3])) for cells in table)
    assert "failed: int8, 1 layers: compiled (RuntimeError: no kernel for this shape)" in captured.out
    assert captured.out.index("Traceback") < captured.out.index("| model |")  # in order, before the table


def test_bench_gpu_counts_the_bytes_a_token_reads():
    """Everything but the embedding, and top_k of n_experts of the experts: for the real shape in
    bf16, 2 bytes per active parameter (13.28 B of them)."""
    with torch.device("meta"):
        model = Orion(OrionConfig.preset("orion-moe-8x7b", norm_type="rmsnorm")).to(torch.bfloat16)
    active = model.config.n_active_params()
    assert bench_gpu.bytes_per_token(model) == pytest.approx(2 * active, rel=1e-3)


def test_bench_generate_prints_the_roofline_table(capsys):
    """Every dtype, eager and compiled, at each thread count, with the bytes it reads; compiled
    float32 decodes the very tokens of eager float32 (timings are not checked: the machine may be busy)."""
    config = replace(bench_generate.ROOFLINE_CONFIG, vocab_size=256, dim=64, ffn_dim=128, n_layers=1)
    options = argparse.Namespace(
        new_tokens=4, prompt_tokens=8, repeats=1, compile=True, roofline_threads=[1], threads=1
    )
    rows = bench_generate.roofline(config, options)
    assert [(r["dtype"], r["way"]) for r in rows] == [
        (dtype, way) for dtype in ("float32", "bfloat16", "int8") for way in ("eager", "compiled")
    ]
    read = {r["dtype"]: r["read"] for r in rows}
    assert read["bfloat16"] * 2 == pytest.approx(read["float32"], rel=1e-3) and read["int8"] < 0.3 * read["float32"]
    assert rows[0]["same"] and rows[1]["same"]
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |")]
    assert len(table) == 6 and table[1].startswith("| 1 | float32 | compiled |")


def test_bench_train_runs_on_the_cpu(capsys):
    bench_train.main(["--batch-size", "2", "--block-size", "16", "--steps", "2"])
    out = capsys.readouterr().out
    assert "nano_orion / transformers:" in out and "first-batch loss" in out


def test_bench_train_races_transformers_in_bf16_under_autocast():
    """Under bf16 autocast (the GPU run) the transformers twin's experts multiply in bf16, as
    nano_orion's do; its default experts would cast to the float32 weights (grouped_mm is not
    autocast's) and train in float32, making the race unfair."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "mm" in func.__name__ or "linear" in func.__name__:
                self.dtypes.add(args[0].dtype)
            return func(*args, **(kwargs or {}))

    config = OrionConfig.preset("toy", n_layers=1, vocab_size=64, norm_type="rmsnorm")
    torch.manual_seed(0)
    seen = {}
    for bf16_autocast in (True, False):  # the twin for autocast, and transformers' default experts, both under autocast
        hf = bench_train.transformers_twin(Orion(config), bf16_autocast)
        with torch.autocast("cpu", dtype=torch.bfloat16), MatmulDtypes() as mode, torch.no_grad():
            hf.model.layers[0].mlp(torch.randn(2, 16, config.dim))
        seen[bf16_autocast] = mode.dtypes
    assert seen == {
        True: {torch.bfloat16},
        False: {torch.bfloat16, torch.float32},
    }  # the default: router bf16, experts float32
