"""What a newcomer types gets a result or a one-line error, and the numbers printed are true.
A few cases run the scripts as real processes, to see the whole stderr; the rest
call main(argv) in the test process, which costs no second torch import. Also: each tool's
--help, the Makefile's promises (the torch pin and the supported range the README states, a
venv kept to its torch, make gpu-check going on after a failing step) and pyproject.toml's
build configuration."""

import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import train

from conftest import FIXTURES, ROOT, load_script, one_line_error, usage_error

generate = load_script("generate.py")
convert = load_script("convert.py")
CKPT = str(FIXTURES / "orion-mini-rmsnorm")  # vocab_size 576, max_seq_len 256


def run_script(*argv) -> tuple[int, str, str]:
    """python SCRIPT ARGS in a fresh process without a GPU: (exit status, stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
    )
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["generate.py", "--ckpt", CKPT, "--prompt-ids", "1,2,99999"],  # refused after loading the checkpoint
            "generate.py: error: --prompt-ids: 99999 is not a token id; the vocabulary has 576 (ids 0 to 575)",
        ),
        (
            ["generate.py", "--ckpt", CKPT, "--device", "cuda"],
            "generate.py: error: --device cuda: no CUDA device here; use --device cpu",
        ),
        (["train.py", "--device", "cuda"], "train.py: error: --device cuda: no CUDA device here; use --device cpu"),
    ],
)
def test_scripts_exit_with_one_line(argv, message):
    status, out, err = run_script(*argv)
    assert status == 2 and out == "" and one_line_error(err) == message


def generate_error(capsys, *argv) -> str:
    """generate.py's one-line usage error for the fixture checkpoint and these arguments."""
    return usage_error(capsys, generate.main, ["--ckpt", CKPT, *argv])


@pytest.mark.parametrize("ids", ["a,b", "1,,2", "-1", "1.5", "", "506 449"])
def test_prompt_ids_not_integers(capsys, ids):
    assert generate_error(capsys, "--prompt-ids", ids).endswith(
        f"--prompt-ids {ids}: give token ids as comma-separated integers, e.g. 506,449,232"
    )


def test_prompt_ids_beyond_the_vocabulary(capsys):
    assert "the vocabulary has 576 (ids 0 to 575)" in generate_error(capsys, "--prompt-ids", "5,576")


def test_prompts_that_cannot_run(capsys, tmp_path):
    assert generate_error(capsys, "--prompt", "").endswith("--prompt: an empty prompt; give at least one token of text")
    latin1 = tmp_path / "prompt.txt"
    latin1.write_bytes("café".encode("latin-1"))
    assert generate_error(capsys, "--prompt-file", str(latin1)).endswith(
        f"--prompt-file {latin1}: not UTF-8 text (byte 3); save it as UTF-8"
    )


def test_cuda_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert generate_error(capsys, "--device", "cuda").endswith("--device cuda: no CUDA device here; use --device cpu")


def test_auto_device_and_dtype_follow_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _, args = generate.parse_args(["--ckpt", CKPT])
    assert args.device == torch.device("cuda", 0) and args.dtype == torch.bfloat16  # what Generator(device=) gets
    _, args = generate.parse_args(["--ckpt", CKPT, "--device", "cpu"])
    assert args.device == torch.device("cpu") and args.dtype == torch.float32


def test_max_new_tokens_checked_before_printing(capsys):
    """The longest prompt (here 4 tokens) plus --max-new-tokens must fit in max_seq_len 256."""
    prompts = ["--prompt", "expert", "--prompt", "位置 x"]
    assert generate_error(capsys, *prompts, "--max-new-tokens", "100000").endswith(
        "--max-new-tokens 100000: the longest prompt takes 4 of the model's 256 positions (max_seq_len), "
        "so at most 252 new tokens fit"
    )
    assert "at most 252 new tokens fit" in generate_error(capsys, *prompts, "--max-new-tokens", "253")
    generate.main(["--ckpt", CKPT, *prompts, "--max-new-tokens", "252", "--temperature", "0"])  # the most that fits
    assert capsys.readouterr().out.count("────") == 4  # two headed completions


def test_stop_escapes_and_the_empty_stop(capsys):
    assert generate.unescape(r"\n\n") == "\n\n" and generate.unescape(r"a\tb\\n\q") == "a\tb\\n\\q"
    _, args = generate.parse_args(["--ckpt", CKPT, "--stop", r"\n\n", "--stop", "end"])
    assert args.stop == ["\n\n", "end"]
    assert generate_error(capsys, "--stop", "").endswith(
        "--stop '': an empty stop text matches before the first token; give some text"
    )
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    assert r"--stop '\n\n' stops at a blank line" in re.sub(r"\s+", " ", capsys.readouterr().out)


def test_no_rate_for_zero_decoded_tokens(capsys):
    generate.main(
        ["--ckpt", CKPT, "--prompt", "expert", "--max-new-tokens", "1"]
    )  # the one token comes from the prefill
    err = capsys.readouterr().err
    assert err.rstrip().endswith("decode 0 tokens]") and "nan" not in err


def test_several_completions_are_headed(capsys):
    """Each of several completions follows a heading line and ends with one newline; one alone is printed bare."""
    common = ["--ckpt", CKPT, "--max-new-tokens", "12", "--seed", "0"]
    generate.main([*common, "--prompt", "expert", "--num-samples", "2"])
    out = capsys.readouterr().out
    parts = re.split(r"^──── (.*) ────\n", out, flags=re.M)
    assert parts[0] == "" and parts[1::2] == ["sample 1 of 2", "sample 2 of 2"]
    assert all(p.startswith("expert") and p.endswith("\n") for p in parts[2::2])
    generate.main([*common, "--prompt", "expert", "--prompt", "位置", "--num-samples", "2"])
    headings = re.findall(r"^──── (.*) ────$", capsys.readouterr().out, flags=re.M)
    assert headings == [f"prompt {p} of 2, sample {s} of 2" for s in (1, 2) for p in (1, 2)]


@pytest.mark.parametrize("tool", ["train", "generate", "convert", "bench_gpu"])
def test_help_states_each_default_once(tool, capsys):
    """Every tool's --help ends a flag's help with its default, once, in one way; a default that
    says nothing (None, a switch's False, an empty list) is left out; a list reads as typed."""
    from benchmarks import bench_gpu

    parse = {
        "train": train.parse_args,
        "generate": generate.parse_args,
        "convert": convert.main,
        "bench_gpu": bench_gpu.main,
    }[tool]
    with pytest.raises(SystemExit):
        parse(["--help"])
    options = capsys.readouterr().out.split("\noptions:\n")[1]
    flags = [re.sub(r"\s+", " ", f).strip() for f in re.split(r"\n(?=  -)", options)]  # an entry starts at column 2
    assert not any(re.search(r"\(default: (None|False|\[\])\)", flag) for flag in flags)
    assert all(flag.count("default") <= 1 for flag in flags), [f for f in flags if f.count("default") > 1]
    expected = {
        "train": ["--lr-decay-iters LR_DECAY_ITERS", "(default: --max-iters)"],
        "generate": ["--max-new-tokens MAX_NEW_TOKENS", "(default: 256)"],
        "convert": ["--shard-gb SHARD_GB", "(default: 5.0)"],
        "bench_gpu": ["--long [LONG ...]", "(default: 4096 8192)"],
    }[tool]
    assert expected[1] in next(flag for flag in flags if flag.startswith(expected[0]))


def test_train_device_under_torchrun(monkeypatch, capsys):
    """Every process takes the GPU of its LOCAL_RANK; an index of one's own is refused, one line."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert train.parse_args(["--device", "cuda"])[1].device == "cuda:1"
    assert train.parse_args([])[1].device == "cuda:1"
    assert usage_error(capsys, train.parse_args, ["--device", "cuda:0"]).endswith("use --device cuda")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train.parse_args(["--device", "cuda"])[1].device == "cuda:0"


def test_pyproject_gives_setuptools_nothing_to_warn_about():
    setuptools = pytest.importorskip("setuptools", minversion="77")  # what the build asks for
    from setuptools.config.pyprojecttoml import apply_configuration

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_configuration(setuptools.Distribution(), ROOT / "pyproject.toml")


def test_makefile_and_readme_agree_on_the_torch_build():
    makefile = (ROOT / "Makefile").read_text()
    readme = re.sub(r"\s+", " ", (ROOT / "README.md").read_text())
    pin = re.search(r"^TORCH \?= (\S+)$", makefile, re.M).group(1)
    assert f"The Makefile pins `{pin}`" in readme
    for text in (re.sub(r"\s*\n#\s*", " ", makefile), readme):
        assert "on Linux, PyPI's default is the CUDA build" in text and "CPU index" in text


def test_readme_and_ci_state_the_supported_range_that_pyproject_declares():
    pyproject = (ROOT / "pyproject.toml").read_text()
    python = re.search(r'^requires-python = ">=(3\.\d+)"$', pyproject, re.M).group(1)
    newest = max(re.findall(r'"Programming Language :: Python :: (3\.\d+)"', pyproject), key=lambda v: int(v[2:]))
    torch_floor = re.search(r'"torch>=(\d+\.\d+)"', pyproject).group(1)
    readme = re.sub(r"\s+", " ", (ROOT / "README.md").read_text())
    assert (
        f"Python {python} or newer" in readme
        and f"supports Python {python} to {newest} and torch {torch_floor} or newer" in readme
    )
    assert f"make test TORCH=torch=={torch_floor}.0 VENV=" in (ROOT / ".ci" / "run").read_text()  # the floor is tested


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_refuses_a_venv_made_with_another_torch(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").write_text("torch==2.11.0\n")
    later = (ROOT / "pyproject.toml").stat().st_mtime + 60
    os.utime(venv / ".installed", (later, later))  # up to date: make goes straight to the check
    done = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "install", f"VENV={venv}", "TORCH=torch==2.13.0"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert (
        f"make: {venv} was made with torch==2.11.0, not torch==2.13.0: give this torch a venv of its own" in done.stderr
    )
    assert (venv / ".installed").read_text() == "torch==2.11.0\n"  # nothing reinstalled


def test_readmes_resume_command_continues_make_demos_run():
    """The README's `train.py --resume` line, typed after make demo, finds its run and trains on."""
    makefile = (ROOT / "Makefile").read_text()
    demo_out = re.search(r"^DEMO_OUT \?= (\S+)$", makefile, re.M).group(1)
    demo_iters = int(re.search(r"^DEMO_TRAIN_ARGS = .*--max-iters (\d+)", makefile, re.M).group(1))
    command = re.search(r"^python train.py --resume .*?(?=  #)", (ROOT / "README.md").read_text(), re.M).group(0)
    _, args, given = train.parse_args(command.split()[2:] + ["--device", "cpu"])
    assert args.resume and args.out_dir == demo_out and args.max_iters > demo_iters and "max_iters" in given


def test_readme_python_api_runs_from_any_folder(tmp_path, monkeypatch, capsys):
    refresh = load_script("scripts/refresh_docs.py")
    readme = (ROOT / "README.md").read_text()
    first_block = refresh.parse(readme[readme.index("## Python API") :])[0]
    monkeypatch.chdir(tmp_path)
    with refresh.one_thread():
        exec(compile(first_block.source, "README.md: Python API", "exec"), {})
    assert capsys.readouterr().out.strip()  # it printed the generated text


def test_gpu_check_runs_every_step_and_names_the_failed_ones(tmp_path):
    """make gpu-check goes on after a failing step (a GPU session is short) and ends naming the
    failed ones, and make fails. A stand-in python fails train.py (so generate.py, which needs
    its checkpoint, is skipped), then only the tests."""
    stand_in = tmp_path / "python"
    for failing, expected_runs, expected_failed in [
        ("train.py", ["-m", "train.py", "-m"], "train.py (so generate.py was skipped)"),
        ("pytest", ["-m", "train.py", "generate.py", "-m"], "tests"),
    ]:
        log = tmp_path / f"{failing}.log"
        stand_in.write_text(f'#!/bin/sh\necho "$1" >> {log}\ncase "$*" in *{failing}*) exit 1;; esac\n')
        stand_in.chmod(0o755)
        done = subprocess.run(
            ["make", "--no-print-directory", "gpu-check", f"PY={stand_in}"], cwd=ROOT, capture_output=True, text=True
        )
        assert log.read_text().split() == expected_runs  # pytest (-m), train.py, [generate.py], bench_train (-m)
        assert f"gpu-check: failed: {expected_failed}\n" in done.stdout and done.returncode == 2


def test_generate_threads_sets_torchs_threads(capsys):
    n = torch.get_num_threads()
    try:
        generate.main(["--ckpt", CKPT, "--prompt", "a", "--max-new-tokens", "1", "--device", "cpu", "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)
    capsys.readouterr()
    assert usage_error(capsys, generate.main, ["--ckpt", CKPT, "--threads", "0"]).endswith(
        ": error: --threads 0: must be at least 1"
    )
