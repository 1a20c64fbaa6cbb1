"""convert.py: its command line, and every bad input refused cleanly: one line naming the file, the
problem and the fix, exit status 1, nothing written. (The conversions themselves: test_hf_layout.py.)"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import nano_orion
from nano_orion import checkpoint, hf_layout

from conftest import ROOT, load_script
from test_hf_layout import RMSNORM, released_tensors, write_released

convert = load_script("convert.py")


def run_main(*args) -> int:
    return convert.main([str(a) for a in args])


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), *map(str, args)], capture_output=True, text=True, env=env
    )


def assert_nothing_written(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "a temporary folder was left behind"


# ---- bad input: one line naming file, problem and fix; exit 1; nothing written ----------------------


def mutated(tmp_path, change=None, fmt="safetensors", sharded=True, fixture=RMSNORM) -> Path:
    tensors = released_tensors(fixture)
    if change:
        change(tensors)
    return write_released(tmp_path / "released", fixture, tensors, fmt, sharded)


def expect_error(capsys, tmp_path, src, *needles, args=()):
    out = tmp_path / "out"
    assert run_main(src, out, *args) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("convert.py: error: "), err
    for needle in needles:
        assert needle in err, err
    assert_nothing_written(out)


def test_cli_missing_config(tmp_path):
    src = mutated(tmp_path)
    (src / "config.json").unlink()
    result = run_cli(src, tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"convert.py: error: {src / 'config.json'}: missing; a checkpoint folder needs the config.json that came "
        "with its weights"
    ]
    assert_nothing_written(tmp_path / "out")


def test_cli_truncated_pickle_shard(tmp_path):
    src = mutated(tmp_path, fmt="bin")
    shard = src / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:5000])
    result = run_cli(src, tmp_path / "out")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{shard}: truncated or corrupt" in lines[0] and "download this file again" in lines[0]
    assert_nothing_written(tmp_path / "out")


def test_cli_refuses_existing_output_unless_forced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_cli(RMSNORM, out)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"convert.py: error: {out}: already exists; choose another OUT_DIR or pass --force to replace it"
    ]
    assert (out / "keep.txt").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert run_main(RMSNORM, out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not list(tmp_path.glob(".out*"))


def test_cli_hostile_pickle_never_runs(tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = mutated(tmp_path, lambda t: t.update({"model.norm.weight": Payload()}), fmt="bin", sharded=False)
    result = run_cli(src, tmp_path / "out")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{src / 'pytorch_model.bin'}: refused" in lines[0] and "could run code" in lines[0], (
        lines
    )
    assert_nothing_written(tmp_path / "out")
    with pytest.raises(nano_orion.CheckpointError, match="refused"):
        nano_orion.load(src)
    assert not marker.exists(), "the pickle's command ran"
    torch.load(src / "pytorch_model.bin", weights_only=False)  # the payload is live: unpickling it unguarded runs it
    assert marker.exists()


def test_shard_named_in_index_is_missing(tmp_path, capsys):
    src = mutated(tmp_path)
    (src / "model-00002-of-00002.safetensors").unlink()
    expect_error(
        capsys,
        tmp_path,
        src,
        f"{src / 'model-00002-of-00002.safetensors'}: missing, but model.safetensors.index.json lists it",
        "download",
    )


def test_corrupt_safetensors(tmp_path, capsys):
    src = mutated(tmp_path)
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    expect_error(capsys, tmp_path, src, f"{shard}: truncated or corrupt", "download this file again")
    shard.write_bytes(b"\xff" * 64)  # garbage header
    expect_error(capsys, tmp_path, src, f"{shard}: truncated or corrupt")


def test_shape_disagrees_with_config(tmp_path, capsys):
    key = "model.layers.1.block_sparse_moe.experts.5.w3.weight"
    src = mutated(tmp_path, lambda t: t.update({key: t[key][:-1]}))
    expect_error(
        capsys,
        tmp_path,
        src,
        f"{key} has shape (95, 64), config.json implies (96, 64)",
        "check that config.json belongs",
    )


def test_missing_keys(tmp_path, capsys):
    key = "model.layers.1.block_sparse_moe.experts.7.w1.weight"
    src = mutated(tmp_path, lambda t: t.pop(key), sharded=False)
    expect_error(capsys, tmp_path, src, f"{src}: 1 tensors missing, e.g. {key}", "fetch the weights again")


def test_unexpected_keys(tmp_path, capsys):
    key = "model.layers.2.self_attn.q_proj.weight"  # the config has 2 layers
    src = mutated(
        tmp_path, lambda t: t.update({key: t["model.layers.1.self_attn.q_proj.weight"].clone()}), sharded=False
    )
    expect_error(capsys, tmp_path, src, f"unexpected tensor {key} for the 2 layers and 8 experts of config.json")


def test_stray_rotary_buffers_are_ignored(tmp_path):
    src = mutated(
        tmp_path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}), fmt="bin"
    )
    assert run_main(src, tmp_path / "out") == 0


def test_pickle_of_non_tensors(tmp_path, capsys):
    src = mutated(tmp_path, lambda t: t.update({"model.norm.weight": "not a tensor"}), fmt="bin", sharded=False)
    expect_error(
        capsys,
        tmp_path,
        src,
        f"{src / 'pytorch_model.bin'}: expected a dict of name -> tensor",
        "save a plain state_dict",
    )


def test_unsupported_dtypes(tmp_path, capsys):
    expect_error(
        capsys,
        tmp_path,
        RMSNORM,
        "--dtype int8: unsupported; choose one of bfloat16, float16, float32",
        args=["--dtype", "int8"],
    )
    key = "model.layers.0.self_attn.q_proj.weight"
    src = mutated(tmp_path, lambda t: t.update({key: t[key].to(torch.int32)}))
    expect_error(capsys, tmp_path, src, f"{key} has unsupported dtype torch.int32")


def test_not_enough_disk_space(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    expect_error(
        capsys,
        tmp_path,
        RMSNORM,
        f"{tmp_path / 'out'}: the checkpoint needs about 2.2 MB and the disk has 0.0 MB free; free some space",
    )


@pytest.mark.parametrize("to_hf", [False, True], ids=["convert", "export"])
def test_the_space_estimate_covers_all_that_is_written(tmp_path, monkeypatch, to_hf):
    """With exactly the estimated space free the conversion passes, and it writes no more than that."""
    src = RMSNORM
    if to_hf:
        src = tmp_path / "nano"
        assert run_main(RMSNORM, src) == 0
    estimates = []
    check = hf_layout.check_free_space

    def free_just_enough(folder, needed):
        estimates.append(needed)
        monkeypatch.setattr(
            shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - needed, needed)
        )
        check(folder, needed)

    monkeypatch.setattr(hf_layout, "check_free_space", free_just_enough)
    args = ("--to-hf",) if to_hf else ()
    assert run_main(*args, src, tmp_path / "out", "--shard-gb", "0.0003") == 0
    written = sum(f.stat().st_size for f in (tmp_path / "out").iterdir())
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 2 and written <= estimates[0]


def test_a_write_error_from_safetensors_is_one_line(tmp_path, capsys, monkeypatch):
    """A disk that fills up after the check: safetensors' own error, as one line, and nothing left."""

    def disk_full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    expect_error(
        capsys,
        tmp_path,
        RMSNORM,
        f"{tmp_path / 'out'}: writing failed (Error while serializing",
        "No space left on device",
    )
    assert [p.name for p in tmp_path.iterdir()] == []


def test_output_is_not_the_input(tmp_path, capsys):
    src = mutated(tmp_path)
    assert run_main(src, src, "--force") == 1
    assert "the output folder is the input folder" in capsys.readouterr().err
    assert (src / "model-00001-of-00002.safetensors").exists()


def test_failure_mid_write_leaves_nothing(tmp_path, capsys):
    """The missing tensor is noticed only after every shard was written: the partial output goes."""
    src = mutated(tmp_path, lambda t: t.pop("lm_head.weight"))
    expect_error(capsys, tmp_path, src, "lm_head.weight", args=["--shard-gb", "0.0001"])


def test_config_that_does_not_parse(tmp_path, capsys):
    src = mutated(tmp_path)
    config = json.loads((src / "config.json").read_text())
    del config["num_local_experts"]
    (src / "config.json").write_text(json.dumps(config))
    expect_error(
        capsys,
        tmp_path,
        src,
        f"{src / 'config.json'}: config.json lacks the keys ['num_local_experts']; restore the original",
    )
    expect_error(capsys, tmp_path, tmp_path / "nowhere", f"{tmp_path / 'nowhere'}: no such folder")


def test_a_conversion_killed_outright_is_cleaned_up_by_the_next(tmp_path):
    """SIGKILL (what the out-of-memory killer sends) runs no cleanup: the temporary folder stays
    until the next conversion beside it removes it."""
    out = tmp_path / "out"
    # convert.py itself, made to stop for good just before it writes config.json
    stuck = (
        "import runpy, sys, time\n"
        "import nano_orion.hf_layout\n"
        "nano_orion.hf_layout.write_config = lambda *args: print('writing', flush=True) or time.sleep(600)\n"
        f"sys.argv = ['convert.py', {str(RMSNORM)!r}, {str(out)!r}]\n"
        f"runpy.run_path({str(ROOT / 'convert.py')!r}, run_name='__main__')\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", stuck], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    try:
        assert child.stdout.readline() == "writing\n"
    finally:
        child.kill()  # SIGKILL
        child.wait()
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".out.partial-") and (leftover / "model.safetensors").exists()
    assert run_main(RMSNORM, out) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
