"""nano_orion's checkpoint format: save/load round trip, atomic saves, zero-copy loading; layer placement across devices."""

import os
import re
from pathlib import Path

import pytest
import torch

import nano_orion
from nano_orion import CheckpointError, OrionConfig, checkpoint
from nano_orion.checkpoint import expected_shapes
from nano_orion.hf_layout import convert_hf, export_hf
from nano_orion.placement import place, placement, plan_placement

from conftest import FIXTURES, assert_same_weights, random_model


def small_model(norm_type="layernorm", n_layers=3, seed=0) -> nano_orion.Orion:
    config = OrionConfig.preset("toy", norm_type=norm_type, vocab_size=100, dim=32, n_layers=n_layers, ffn_dim=16, max_seq_len=32)
    return random_model(config, seed)


def test_save_load_round_trip_sharded(tmp_path):
    model = small_model()
    nano_orion.save(model, tmp_path, max_shard_bytes=20_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    loaded, tokenizer = nano_orion.load(tmp_path)
    assert tokenizer is None
    assert_same_weights(loaded, model)
    idx = torch.randint(0, 100, (2, 9))
    with torch.no_grad():  # same weights; kernels may round differently on differently aligned memory
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=1e-6)


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
    with pytest.raises(CheckpointError, match="writing the checkpoint failed .No space left on device.; the previous checkpoint is unchanged"):
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
    with pytest.raises(CheckpointError, match=f"{folder}: the checkpoint needs about 1.4 MB and the disk has 0.1 MB free; "
                                              "free some space or choose another folder"):
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
    advice = {"trained": "train.py wrote this folder: resume from an earlier copy of it, or train again",
              "saved": "write the checkpoint again (convert.py, or nano_orion.save)",
              "released": "download this file again"}[origin]
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


def test_load_splits_layers_over_a_list_of_devices(tmp_path, monkeypatch):
    """Two CPU "devices" are the same torch.device, so the split is checked on the plan."""
    model = small_model("rmsnorm")
    nano_orion.save(model, tmp_path)
    plans = []
    monkeypatch.setattr("nano_orion.placement.plan_placement", lambda sizes, capacities: plans.append(plan_placement(sizes, capacities)) or plans[-1])
    split, _ = nano_orion.load(tmp_path, device=["cpu", "cpu"])
    assert plans == [[0, 0, 0, 1, 1]]  # embed, layers 0-2, norm + head: first half on device 0
    idx = torch.randint(0, 100, (1, 7))
    out = nano_orion.generate(split, idx, max_new_tokens=5)
    assert torch.equal(out, nano_orion.generate(model, idx, max_new_tokens=5))


def test_load_places_a_split_model_with_hooks(tmp_path, monkeypatch):
    """Hooks only when the modules really are on several devices: here the head on "meta"."""
    nano_orion.save(small_model(), tmp_path)
    plain, _ = nano_orion.load(tmp_path, device=["cpu", "cpu"])  # one device after all
    assert not any(m._forward_pre_hooks for m in plain.modules())

    def head_on_meta(config, shapes, device, dtype):
        return {**placement(config, shapes, "cpu", dtype), "norm": torch.device("meta"), "lm_head": torch.device("meta")}

    monkeypatch.setattr(checkpoint, "placement", head_on_meta)
    split, _ = nano_orion.load(tmp_path)
    assert split.layers[2].moe.experts.w1.device.type == "cpu" and split.lm_head.weight.is_meta
    assert all(len(m._forward_pre_hooks) == 1 for m in (split, split.embed, *split.layers, split.norm, split.lm_head))
    logits = split(torch.randint(0, 100, (2, 7)))
    assert logits.is_meta and logits.shape == (2, 7, 100)


def test_load_says_when_the_devices_are_too_small(tmp_path, monkeypatch):
    nano_orion.save(small_model(), tmp_path)
    monkeypatch.setattr("nano_orion.placement.free_bytes", lambda device: 1000)
    with pytest.raises(CheckpointError, match="the model needs .* use more or larger GPUs"):
        nano_orion.load(tmp_path, device=["cpu", "cpu"])


# ---- the placement plan, on the real model's shape -----------------------------------------------


def _loads(sizes, plan, n):
    return [sum(s for s, d in zip(sizes, plan) if d == i) for i in range(n)]


def test_plan_is_consecutive_proportional_and_fits():
    sizes = [3, 10, 10, 10, 10, 10, 10, 4]
    plan = plan_placement(sizes, [40, 40])
    assert plan == sorted(plan) and plan[0] == 0 and plan[-1] == 1
    assert _loads(sizes, plan, 2) == [33, 34]
    plan = plan_placement(sizes, [60, 20])  # 3:1 -> about 50 : 17
    assert _loads(sizes, plan, 2) == [53, 14]
    assert plan_placement(sizes, [100]) == [0] * len(sizes)


def test_plan_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="the model needs 9.0 MB, the devices offer 8.0 MB"):
        plan_placement([3_000_000] * 3, [4_000_000, 4_000_000])
    with pytest.raises(ValueError, match="device 0 would need 7.0 MB"):
        plan_placement([7_000_000, 1_000_000], [5_000_000, 5_000_000])  # the embedding alone is too big


def test_released_model_in_bf16_fits_two_80gb_gpus(monkeypatch):
    """The 96 GB of bf16 weights over two 80 GB GPUs (72 GB usable each), built on meta: no GPU needed."""
    config = OrionConfig.preset("orion-moe-8x7b")
    monkeypatch.setattr("nano_orion.placement.free_bytes", lambda device: 72 * 10**9)
    where = placement(config, expected_shapes(config), ["cuda:0", "cuda:1"], torch.bfloat16)
    layer_devices = [where[f"layers.{i}"].index for i in range(config.n_layers)]
    assert layer_devices == [0] * 16 + [1] * 16
    assert where["embed"].index == 0 and where["norm"].index == where["lm_head"].index == 1
    with pytest.raises(ValueError, match="the model needs 96.4 GB"):
        placement(config, expected_shapes(config), ["cuda:0"], torch.bfloat16)


# ---- placing modules: each moves its inputs to its own device ----------------------------------------


def test_placed_modules_move_their_inputs_to_their_device():
    model = small_model()
    idx = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        expected = model(idx)
    where = placement(model.config, expected_shapes(model.config), ["cpu", "cpu"], torch.float32)
    place(model, where)
    assert all(len(model.get_submodule(name)._forward_pre_hooks) == 1 for name in where)
    with torch.no_grad():
        assert torch.equal(model(idx), expected)  # all on the CPU: the hooks move nothing
    other = small_model()
    place(other, {**where, "lm_head": torch.device("meta")})  # the head on another device (meta: shapes only)
    x = torch.randn(2, 9, 32)
    assert other.lm_head(x).is_meta and other.lm_head(input=x).is_meta  # positional and keyword inputs moved
