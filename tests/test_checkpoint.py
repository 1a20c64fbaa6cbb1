"""nano_orion's checkpoint format: save/load round trip, atomic saves, zero-copy loading
(placement across devices: test_placement.py)."""

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nano_orion
from nano_orion import CheckpointError, checkpoint
from nano_orion.hf_layout import convert_hf

from conftest import FIXTURES, assert_same_weights, small_model


def test_save_load_round_trip_sharded(tmp_path):
    model = small_model()
    nano_orion.save(model, tmp_path, max_shard_bytes=20_000)
    assert (
        len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
        and (tmp_path / "model.safetensors.index.json").exists()
    )
    loaded, tokenizer = nano_orion.load(tmp_path)
    assert tokenizer is None
    assert_same_weights(loaded, model)
    idx = torch.randint(0, 100, (2, 9))
    with torch.no_grad():  # same weights; kernels may round differently on differently aligned memory
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=1e-6)


def test_a_checkpoint_of_nano_orion_0_1_loads(tmp_path):
    """0.1 named a layer's stacked experts layers.N.moe.w1 (now layers.N.moe.experts.w1)."""
    model = small_model()
    nano_orion.save(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    old = {name.replace(".moe.experts.", ".moe."): t for name, t in tensors.items()}
    assert "layers.0.moe.w1" in old and len(old) == len(tensors)
    save_file(old, tmp_path / "model.safetensors")
    assert_same_weights(nano_orion.load(tmp_path)[0], model)


def test_saving_again_replaces_the_weights_and_keeps_other_files(tmp_path):
    folder = tmp_path / "ckpt"
    nano_orion.save(small_model(n_layers=3), folder, max_shard_bytes=20_000)  # sharded, with an index
    assert (folder / "model.safetensors.index.json").exists()
    (folder / "notes.txt").write_bytes(b"not ours")
    (folder / "log.jsonl").write_text("{}\n")
    smaller = small_model(n_layers=1, seed=1)
    nano_orion.save(smaller, folder)  # one file: the old shards and index must go
    assert_same_weights(nano_orion.load(folder)[0], smaller)
    assert sorted(f.name for f in folder.iterdir()) == ["config.json", "log.jsonl", "model.safetensors", "notes.txt"]
    assert (folder / "notes.txt").read_bytes() == b"not ours"
    assert [f.name for f in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left beside it


def test_failed_save_changes_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    model = small_model()
    nano_orion.save(model, folder)
    before = {f.name: f.read_bytes() for f in folder.iterdir()}

    def disk_full(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr("nano_orion.checkpoint.write_config", disk_full)
    with pytest.raises(
        CheckpointError,
        match="writing the checkpoint failed .No space left on device.; the previous checkpoint is unchanged",
    ):
        nano_orion.save(small_model(n_layers=1, seed=1), folder)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    assert [f.name for f in tmp_path.iterdir()] == ["ckpt"]


def test_saving_where_there_are_no_hard_links(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError(1, "Operation not permitted")  # as on FAT or some network drives

    monkeypatch.setattr(os, "link", no_links)
    folder = tmp_path / "ckpt"
    nano_orion.save(small_model(), folder)
    (folder / "log.jsonl").write_text("{}\n")
    model = small_model(seed=1)
    nano_orion.save(model, folder)  # the log is copied into the new folder instead
    assert_same_weights(nano_orion.load(folder)[0], model)
    assert sorted(f.name for f in folder.iterdir()) == ["config.json", "log.jsonl", "model.safetensors"]
    assert (folder / "log.jsonl").read_text() == "{}\n"


def test_a_save_checks_the_free_space_first(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    model = small_model()
    nano_orion.save(model, folder)
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil_usage(free=10**5))
    with pytest.raises(
        CheckpointError,
        match=f"{folder}: the checkpoint needs about 1.4 MB and the disk has 0.1 MB free; "
        "free some space or choose another folder",
    ):
        nano_orion.save(small_model(seed=1), folder)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    assert [f.name for f in tmp_path.iterdir()] == ["ckpt"]


def shutil_usage(free: int):
    return checkpoint.shutil._ntuple_diskusage(10**12, 10**12 - free, free)


@pytest.mark.parametrize("origin", ["trained", "saved", "released"])
def test_a_damaged_weight_file_gets_advice_that_fits_its_folder(tmp_path, origin):
    """Download again fits a released folder, not one written here."""
    folder = tmp_path / "ckpt"
    nano_orion.save(small_model(), folder)
    if origin == "trained":
        (folder / "train_state.pt").write_bytes(b"")  # train.py's file beside the weights
    if origin == "released":
        (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    advice = {
        "trained": "train.py wrote this folder: resume from an earlier copy of it, or train again",
        "saved": "write the checkpoint again (convert.py, or nano_orion.save)",
        "released": "download this file again",
    }[origin]
    with pytest.raises(CheckpointError, match=f"{weights}: truncated or corrupt .*; {re.escape(advice)}$"):
        checkpoint.read_weight_file(weights)


def _mapped_files(tensor: torch.Tensor) -> set[str]:
    """The files whose memory mapping holds this tensor's data (from /proc/self/maps)."""
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    files = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= start and end <= hi and len(fields) == 6:
            files.add(fields[5])
    return files


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_load_does_not_copy_weights(tmp_path):
    """Loaded in the stored dtype on the CPU, every parameter *is* the memory-mapped file."""
    convert_hf(FIXTURES / "orion-mini-rmsnorm", tmp_path / "nano", max_shard_bytes=300_000)  # fp16, sharded
    shards = {str(p) for p in (tmp_path / "nano").glob("model-*.safetensors")}
    assert len(shards) > 1
    model, _ = nano_orion.load(tmp_path / "nano", dtype=torch.float16)
    for name, p in model.named_parameters():
        assert _mapped_files(p) & shards, f"{name} was copied out of the file"
    # the counter-check can fail: a float32 load must copy (and then lives in anonymous memory)
    model32, _ = nano_orion.load(tmp_path / "nano", dtype=torch.float32)
    assert not _mapped_files(model32.lm_head.weight) & shards
