"""The released Hugging Face layout (hf_layout.py): read directly or converted, it gives the
reference's logits and greedy tokens, for both norm types, from .bin and safetensors, sharded
or not; the way back is bit for bit; an RMSNorm export loads in transformers as Mixtral; an
export names its weights' own dtype. (convert.py's command line and bad input: test_convert.py.)"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nano_orion
from nano_orion.hf_layout import convert_hf, export_hf

from conftest import FIXTURES

LAYERNORM, RMSNORM = FIXTURES / "orion-mini-layernorm", FIXTURES / "orion-mini-rmsnorm"
SIDE_FILES = ("config.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json")


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


@pytest.mark.parametrize("fixture", [LAYERNORM, RMSNORM], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
def test_converted_checkpoint_matches_reference(tmp_path, fixture, fmt, sharded):
    src = write_released(tmp_path / "released", fixture, released_tensors(fixture), fmt, sharded)
    out = tmp_path / "nano"
    convert_hf(src, out)
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
    convert_hf(RMSNORM, out, torch.bfloat16, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    tensors = {k: v for s in shards for k, v in load_file(out / s).items()}
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    original = released_tensors(RMSNORM)
    w2 = torch.stack([original[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"] for e in range(8)])
    assert torch.equal(tensors["layers.1.moe.experts.w2"], w2.to(torch.bfloat16))  # experts stacked in order


@pytest.mark.parametrize("fixture", [LAYERNORM, RMSNORM], ids=["layernorm", "rmsnorm"])
def test_round_trip_is_bit_for_bit(tmp_path, fixture):
    convert_hf(fixture, tmp_path / "nano")
    export_hf(tmp_path / "nano", tmp_path / "back", max_shard_bytes=300_000)
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
    if fixture == RMSNORM:  # exactly Mixtral, and said so for every tool that reads the file
        assert exported["model_type"] == "mixtral" and exported["architectures"] == ["MixtralForCausalLM"]
        assert "auto_map" not in exported and released["architectures"] == ["OrionMOECausalLM"]
        ignored |= {"model_type", "architectures", "auto_map"}
    else:  # LayerNorm is not Mixtral's: Orion's names stay
        assert exported["architectures"] == released["architectures"] and exported["auto_map"] == released["auto_map"]
    for key in released.keys() - ignored:
        assert exported[key] == released[key], key
    # and the exported folder loads back to the same model
    model, _ = nano_orion.load(tmp_path / "back")
    ref = load_file(fixture / "reference.safetensors")
    with torch.no_grad():
        assert (model(ref["input_ids"]) - ref["logits"]).abs().max().item() <= 1e-4


def test_export_of_a_trained_rmsnorm_model_loads_in_transformers(tmp_path):
    """As Mixtral, through AutoModelForCausalLM and without remote code."""
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    config = nano_orion.OrionConfig.preset(
        "toy", norm_type="rmsnorm", vocab_size=300, dim=64, n_layers=2, ffn_dim=48, max_seq_len=64
    )
    torch.manual_seed(0)
    model = nano_orion.Orion(config).eval()
    with torch.no_grad():
        for block in model.layers:  # wide router weights: no near-ties in the top-k choice
            block.moe.router.weight.normal_(0.0, 1.0)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    nano_orion.save(model, tmp_path / "nano")
    export_hf(tmp_path / "nano", tmp_path / "hf")

    hf = AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager", trust_remote_code=False
    ).eval()
    assert type(hf) is MixtralForCausalLM
    idx = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (hf(idx).logits - model(idx)).abs().max().item()
    assert err <= 1e-4, f"max |transformers - nano_orion| = {err}"


def test_export_labels_the_weights_dtype(tmp_path):
    """transformers loads an export in its config's torch_dtype: it must be the weights' own."""
    for dtype in ("float32", "bfloat16"):
        convert_hf(RMSNORM, tmp_path / dtype, getattr(torch, dtype))
        export_hf(tmp_path / dtype, tmp_path / f"hf-{dtype}", max_shard_bytes=300_000)
        assert json.loads((tmp_path / f"hf-{dtype}" / "config.json").read_text())["torch_dtype"] == dtype
        assert {t.dtype for t in released_tensors(tmp_path / f"hf-{dtype}").values()} == {getattr(torch, dtype)}
