"""convert.py: released layout <-> nano_orion, parity after conversion, and every bad input refused cleanly."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import nano_orion
from nano_orion import checkpoint, hf_layout

from conftest import FIXTURES, ROOT, load_script

LAYERNORM, RMSNORM = FIXTURES / "orion-mini-layernorm", FIXTURES / "orion-mini-rmsnorm"
SIDE_FILES = ("config.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json")

convert = load_script("convert.py")


# ---- building released-layout folders from the fixtures --------------------------------------


def released_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """A fixture's tensors in their index order, read with torch/safetensors directly."""
    index = next(folder.glob("*.index.json"))
    weight_map = json.loads(index.read_text())["weight_map"]
    tensors = {}
    for file in sorted(set(weight_map.values())):
        if file.endswith(".safetensors"):
            tensors.update(load_file(folder / file))
        else:
            tensors.update(torch.load(folder / file, weights_only=True))
    return {key: tensors[key] for key in weight_map}


def write_released(dst: Path, src: Path, tensors: dict, fmt: str, sharded: bool) -> Path:
    """A released-layout folder: src's config and tokenizer files, `tensors` as .bin or
    .safetensors, in one file or two shards split inside layer 0's experts."""
    dst.mkdir()
    for name in SIDE_FILES:
        (dst / name).write_bytes((src / name).read_bytes())
    write = (lambda t, p: torch.save(t, p)) if fmt == "bin" else (lambda t, p: save_file(t, p))
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    if not sharded:
        write(tensors, dst / f"{stem}.{ext}")
        return dst
    keys = list(tensors)
    cut = keys.index("model.layers.0.block_sparse_moe.experts.3.w2.weight")  # expert 3's w1 | w2, w3
    files = [f"{stem}-00001-of-00002.{ext}", f"{stem}-00002-of-00002.{ext}"]
    weight_map = {}
    for file, part in zip(files, (keys[:cut], keys[cut:])):
        write({k: tensors[k] for k in part}, dst / file)
        weight_map.update(dict.fromkeys(part, file))
    (dst / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def run_main(*args) -> int:
    return convert.main([str(a) for a in args])


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "convert.py"), *map(str, args)], capture_output=True, text=True, env=env)


def assert_nothing_written(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "a temporary folder was left behind"


# ---- conversion gives the reference's outputs ----------------------------------------------------


@pytest.mark.parametrize("fixture", [LAYERNORM, RMSNORM], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
def test_converted_checkpoint_matches_reference(tmp_path, fixture, fmt, sharded):
    src = write_released(tmp_path / "released", fixture, released_tensors(fixture), fmt, sharded)
    out = tmp_path / "nano"
    assert run_main(src, out) == 0
    assert json.loads((out / "config.json").read_text())["config"]["norm_type"] == fixture.name.split("-")[-1]
    for name in SIDE_FILES[1:]:
        assert (out / name).read_bytes() == (fixture / name).read_bytes()

    ref = load_file(fixture / "reference.safetensors")
    for folder in (out, src):  # the converted checkpoint, and the released folder loaded directly
        model, tokenizer = nano_orion.load(folder, dtype=torch.float32)
        assert tokenizer is not None
        with torch.no_grad():
            err = (model(ref["input_ids"]) - ref["logits"]).abs().max().item()
        assert err <= 1e-4, f"{folder}: max |logits - reference| = {err}"
        prompt, greedy = ref["prompt_ids"], ref["greedy_ids"]
        assert torch.equal(nano_orion.generate(model, prompt, greedy.shape[1] - prompt.shape[1]), greedy)


def test_conversion_to_bfloat16_writes_bfloat16_sharded(tmp_path):
    out = tmp_path / "nano"
    assert run_main(RMSNORM, out, "--dtype", "bfloat16", "--shard-gb", "0.0002") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    tensors = {k: v for s in shards for k, v in load_file(out / s).items()}
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    original = released_tensors(RMSNORM)
    w2 = torch.stack([original[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"] for e in range(8)])
    assert torch.equal(tensors["layers.1.moe.experts.w2"], w2.to(torch.bfloat16))  # experts stacked in order


# ---- round trip and export to transformers --------------------------------------------------------


@pytest.mark.parametrize("fixture", [LAYERNORM, RMSNORM], ids=["layernorm", "rmsnorm"])
def test_round_trip_is_bit_for_bit(tmp_path, fixture):
    assert run_main(fixture, tmp_path / "nano") == 0
    assert run_main("--to-hf", tmp_path / "nano", tmp_path / "back", "--shard-gb", "0.0003") == 0
    back = released_tensors(tmp_path / "back")
    original = released_tensors(fixture)
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    released = json.loads((fixture / "config.json").read_text())
    ignored = {"_name_or_path", "transformers_version", "_flash_attn_2_enabled", "_attn_implementation"}
    # the released file says bfloat16 of its float16 weights; the export names the weights' own dtype
    assert exported["torch_dtype"] == "float16" and released["torch_dtype"] == "bfloat16"
    ignored.add("torch_dtype")
    if fixture == RMSNORM:  # so that transformers loads it as Mixtral
        assert exported.pop("model_type") == "mixtral"
        ignored.add("model_type")
    for key in released.keys() - ignored:
        assert exported[key] == released[key], key
    # and the exported folder loads back to the same model
    model, _ = nano_orion.load(tmp_path / "back")
    ref = load_file(fixture / "reference.safetensors")
    with torch.no_grad():
        assert (model(ref["input_ids"]) - ref["logits"]).abs().max().item() <= 1e-4


def test_export_of_a_trained_rmsnorm_model_loads_in_transformers(tmp_path):
    from transformers import MixtralForCausalLM

    config = nano_orion.OrionConfig.preset("toy", norm_type="rmsnorm", vocab_size=300, dim=64, n_layers=2, ffn_dim=48, max_seq_len=64)
    torch.manual_seed(0)
    model = nano_orion.Orion(config).eval()
    with torch.no_grad():
        for block in model.layers:  # wide router weights: no near-ties in the top-k choice
            block.moe.router.weight.normal_(0.0, 1.0)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    nano_orion.save(model, tmp_path / "nano")
    assert run_main("--to-hf", tmp_path / "nano", tmp_path / "hf") == 0

    hf = MixtralForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager").eval()
    idx = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (hf(idx).logits - model(idx)).abs().max().item()
    assert err <= 1e-4, f"max |transformers - nano_orion| = {err}"


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
        f"convert.py: error: {src / 'config.json'}: missing; a checkpoint folder needs the config.json that came with its weights"
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
    assert result.stderr.strip().splitlines() == [f"convert.py: error: {out}: already exists; choose another OUT_DIR or pass --force to replace it"]
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
    assert len(lines) == 1 and f"{src / 'pytorch_model.bin'}: refused" in lines[0] and "could run code" in lines[0], lines
    assert_nothing_written(tmp_path / "out")
    with pytest.raises(nano_orion.CheckpointError, match="refused"):
        nano_orion.load(src)
    assert not marker.exists(), "the pickle's command ran"
    torch.load(src / "pytorch_model.bin", weights_only=False)  # the payload is live: unpickling it unguarded runs it
    assert marker.exists()


def test_shard_named_in_index_is_missing(tmp_path, capsys):
    src = mutated(tmp_path)
    (src / "model-00002-of-00002.safetensors").unlink()
    expect_error(capsys, tmp_path, src, f"{src / 'model-00002-of-00002.safetensors'}: missing, but model.safetensors.index.json lists it", "download")


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
    expect_error(capsys, tmp_path, src, f"{key} has shape (95, 64), config.json implies (96, 64)", "check that config.json belongs")


def test_missing_keys(tmp_path, capsys):
    key = "model.layers.1.block_sparse_moe.experts.7.w1.weight"
    src = mutated(tmp_path, lambda t: t.pop(key), sharded=False)
    expect_error(capsys, tmp_path, src, f"{src}: 1 tensors missing, e.g. {key}", "fetch the weights again")


def test_unexpected_keys(tmp_path, capsys):
    key = "model.layers.2.self_attn.q_proj.weight"  # the config has 2 layers
    src = mutated(tmp_path, lambda t: t.update({key: t["model.layers.1.self_attn.q_proj.weight"].clone()}), sharded=False)
    expect_error(capsys, tmp_path, src, f"unexpected tensor {key} for the 2 layers and 8 experts of config.json")


def test_stray_rotary_buffers_are_ignored(tmp_path):
    src = mutated(tmp_path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}), fmt="bin")
    assert run_main(src, tmp_path / "out") == 0


def test_pickle_of_non_tensors(tmp_path, capsys):
    src = mutated(tmp_path, lambda t: t.update({"model.norm.weight": "not a tensor"}), fmt="bin", sharded=False)
    expect_error(capsys, tmp_path, src, f"{src / 'pytorch_model.bin'}: expected a dict of name -> tensor", "save a plain state_dict")


def test_unsupported_dtypes(tmp_path, capsys):
    expect_error(capsys, tmp_path, RMSNORM, "--dtype int8: unsupported; choose one of bfloat16, float16, float32", args=["--dtype", "int8"])
    key = "model.layers.0.self_attn.q_proj.weight"
    src = mutated(tmp_path, lambda t: t.update({key: t[key].to(torch.int32)}))
    expect_error(capsys, tmp_path, src, f"{key} has unsupported dtype torch.int32")


def test_not_enough_disk_space(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    expect_error(capsys, tmp_path, RMSNORM, f"{tmp_path / 'out'}: the checkpoint needs about 2.2 MB and the disk has "
                 "0.0 MB free; free some space")


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
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - needed, needed))
        check(folder, needed)

    monkeypatch.setattr(hf_layout, "check_free_space", free_just_enough)
    args = ("--to-hf",) if to_hf else ()
    assert run_main(*args, src, tmp_path / "out", "--shard-gb", "0.0003") == 0
    written = sum(f.stat().st_size for f in (tmp_path / "out").iterdir())
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 2 and written <= estimates[0]


def test_a_write_error_from_safetensors_is_one_line(tmp_path, capsys, monkeypatch):
    """A disk that fills up after the check: safetensors' own error, as one line, and nothing left."""
    def disk_full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    expect_error(capsys, tmp_path, RMSNORM, f"{tmp_path / 'out'}: writing failed (Error while serializing", "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_export_labels_the_weights_dtype(tmp_path):
    """transformers loads an export in its config's torch_dtype: it must be the weights' own."""
    for dtype in ("float32", "bfloat16"):
        assert run_main(RMSNORM, tmp_path / dtype, "--dtype", dtype) == 0
        assert run_main("--to-hf", tmp_path / dtype, tmp_path / f"hf-{dtype}", "--shard-gb", "0.0003") == 0
        assert json.loads((tmp_path / f"hf-{dtype}" / "config.json").read_text())["torch_dtype"] == dtype
        assert {t.dtype for t in released_tensors(tmp_path / f"hf-{dtype}").values()} == {getattr(torch, dtype)}


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
    expect_error(capsys, tmp_path, src, f"{src / 'config.json'}: config.json lacks the keys ['num_local_experts']; restore the original")
    expect_error(capsys, tmp_path, tmp_path / "nowhere", f"{tmp_path / 'nowhere'}: no such folder")


def test_a_conversion_killed_outright_is_cleaned_up_by_the_next(tmp_path):
    """SIGKILL (what the out-of-memory killer sends) runs no cleanup: the temporary folder stays
    until the next conversion beside it removes it."""
    out = tmp_path / "out"
    # convert.py itself, made to stop for good just before it writes config.json
    stuck = ("import runpy, sys, time\n"
             "import nano_orion.hf_layout\n"
             "nano_orion.hf_layout.write_config = lambda *args: print('writing', flush=True) or time.sleep(600)\n"
             f"sys.argv = ['convert.py', {str(RMSNORM)!r}, {str(out)!r}]\n"
             f"runpy.run_path({str(ROOT / 'convert.py')!r}, run_name='__main__')\n")
    child = subprocess.Popen([sys.executable, "-c", stuck], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert child.stdout.readline() == "writing\n"
    finally:
        child.kill()  # SIGKILL
        child.wait()
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".out.partial-") and (leftover / "model.safetensors").exists()
    assert run_main(RMSNORM, out) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
