"""Batching with left padding, and the generate.py CLI (greedy text against the fixtures' reference, bad input)."""

import pytest
import torch

import nano_orion
from nano_orion.sampler import left_pad

from conftest import FIXTURE_NAMES, FIXTURES, load_script, reference, usage_error

generate_cli = load_script("generate.py")


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def fixture(request):
    model, tok = nano_orion.load(FIXTURES / request.param)
    return request.param, model, tok, reference(request.param)


def test_left_padded_batch_equals_one_at_a_time(fixture):
    _, model, tok, ref = fixture
    prompts = [ref["input_ids"][0, :5].tolist(), ref["input_ids"][1, :13].tolist(), ref["input_ids"][0, 20:29].tolist()]
    alone = [nano_orion.generate(model, torch.tensor([p]), 12)[0, len(p) :] for p in prompts]
    idx, pad_mask = left_pad(prompts, tok.pad_id)
    batched = nano_orion.generate(model, idx, 12, pad_mask=pad_mask)[:, idx.shape[1] :]
    for b in range(len(prompts)):
        assert torch.equal(batched[b], alone[b])


def run_cli(capsys, *argv):
    generate_cli.main(list(argv))
    return capsys.readouterr()


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_cli_greedy_reproduces_reference(capsys, name):
    ref = reference(name)
    tok = nano_orion.Tokenizer.from_dir(FIXTURES / name)
    ids = ",".join(str(i) for i in ref["prompt_ids"][0].tolist())
    out = run_cli(
        capsys, "--ckpt", str(FIXTURES / name), "--prompt-ids", ids, "--temperature", "0", "--max-new-tokens", "24"
    )
    assert out.out == tok.decode(ref["greedy_ids"][0].tolist()) + "\n"
    assert "prompt tokens 12" in out.err and "tok/s" in out.err


def test_cli_reads_nano_orion_checkpoints(tmp_path, capsys):
    """The same greedy text from the fixture re-saved in nano_orion's own format."""
    name = "orion-mini-layernorm"
    model, _ = nano_orion.load(FIXTURES / name)
    nano_orion.save(model, tmp_path)
    copy_fixture_files(tmp_path, "tokenizer.model", "tokenizer_config.json")
    ref = reference(name)
    ids = ",".join(str(i) for i in ref["prompt_ids"][0].tolist())
    out = run_cli(capsys, "--ckpt", str(tmp_path), "--prompt-ids", ids, "--temperature", "0", "--max-new-tokens", "24")
    assert out.out == nano_orion.Tokenizer.from_dir(FIXTURES / name).decode(ref["greedy_ids"][0].tolist()) + "\n"


def test_cli_same_seed_same_text(capsys):
    args = [
        "--ckpt",
        str(FIXTURES / "orion-mini-rmsnorm"),
        "--prompt",
        "expert",
        "--max-new-tokens",
        "16",
        "--num-samples",
        "2",
    ]
    first = run_cli(capsys, *args, "--seed", "3").out
    assert first == run_cli(capsys, *args, "--seed", "3").out
    assert first != run_cli(capsys, *args, "--seed", "4").out


def copy_fixture_files(folder, *names, fixture="orion-mini-rmsnorm"):
    for name in names:
        (folder / name).write_bytes((FIXTURES / fixture / name).read_bytes())


def cli_error(capsys, *argv) -> str:
    """The one-line error generate.py exits with (status 2); --help has the usage."""
    return usage_error(capsys, generate_cli.main, argv)


@pytest.mark.parametrize(
    "files, message", [(None, "no such folder"), ((), "no config.json"), (("config.json",), "no tokenizer.model")]
)
def test_cli_bad_checkpoint_gives_one_line_error(tmp_path, capsys, files, message):
    ckpt = tmp_path / "missing" if files is None else tmp_path
    copy_fixture_files(tmp_path, *(files or ()))
    last = cli_error(capsys, "--ckpt", str(ckpt), "--prompt", "hi")
    assert message in last and str(ckpt) in last


def test_cli_checkpoint_without_weights(tmp_path, capsys):
    copy_fixture_files(tmp_path, "config.json", "tokenizer.model")
    assert "no weights found" in cli_error(capsys, "--ckpt", str(tmp_path), "--prompt", "hi")


def test_cli_missing_prompt_file(tmp_path, capsys):
    missing = tmp_path / "prompt.txt"
    last = cli_error(capsys, "--ckpt", str(FIXTURES / "orion-mini-rmsnorm"), "--prompt-file", str(missing))
    assert last.endswith(f"--prompt-file {missing}: no such file; give a text file holding the prompt")


@pytest.mark.parametrize(
    "flag, value, allowed",
    [
        ("--top-p", "0", "in (0, 1]"),
        ("--top-p", "1.5", "in (0, 1]"),
        ("--temperature", "-1", "0 (greedy) or more"),
        ("--top-k", "-1", "0 (off) or more"),
        ("--repetition-penalty", "0", "above 0"),
        ("--max-new-tokens", "0", "at least 1"),
    ],
)
def test_cli_sampling_setting_out_of_range(capsys, flag, value, allowed):
    last = cli_error(capsys, "--ckpt", "unused", "--prompt", "hi", flag, value)  # refused before the checkpoint is read
    assert f"{flag} {value}: must be {allowed}" in last
