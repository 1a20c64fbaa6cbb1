"""Splitting the layers over several devices (placement.py): the plan, consecutive and in
proportion to each device's memory, on the real model's shape; loading a split model; and
placed modules moving their inputs to their own device. Two CPU "devices", or "meta" for a
device that holds shapes only, stand in for GPUs."""

import pytest
import torch

import nano_orion
from nano_orion import CheckpointError, OrionConfig, checkpoint
from nano_orion.checkpoint import expected_shapes
from nano_orion.placement import place, placement, plan_placement

from conftest import small_model


def test_load_splits_layers_over_a_list_of_devices(tmp_path, monkeypatch):
    """Two CPU "devices" are the same torch.device, so the split is checked on the plan."""
    model = small_model("rmsnorm")
    nano_orion.save(model, tmp_path)
    plans = []
    monkeypatch.setattr(
        "nano_orion.placement.plan_placement",
        lambda sizes, capacities: plans.append(plan_placement(sizes, capacities)) or plans[-1],
    )
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
        return {
            **placement(config, shapes, "cpu", dtype),
            "norm": torch.device("meta"),
            "lm_head": torch.device("meta"),
        }

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
