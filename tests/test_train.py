"""train.py: the recipe's pieces, overfitting a tiny corpus, exact resume, the log."""

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nano_orion
import train
from nano_orion import Orion, OrionConfig, atomic
from nano_orion.moe import load_balancing_loss
from nano_orion.sampler import ORION_DEMO

from conftest import FIXTURES, ROOT, assert_same_weights, load_script, one_line_error, usage_error

generate_cli = load_script("generate.py")
TOKENIZER = FIXTURES / "orion-mini-rmsnorm" / "tokenizer.model"  # a real one: load() and generate.py read it

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, n_experts=4, top_k=2, max_seq_len=64)


def tiny_run(tmp_path, corpus, out, *extra):
    """Command line for a tiny model (TINY, 320-piece vocabulary) on `corpus`, logging every step."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    return [
        "--config",
        str(config),
        "--data",
        str(corpus),
        "--data-dir",
        str(tmp_path / "data"),
        "--out-dir",
        str(out),
        "--vocab-size",
        "320",
        "--batch-size",
        "8",
        "--block-size",
        "32",
        "--log-interval",
        "1",
        "--eval-iters",
        "2",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine extra threads only wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_lr_schedule_warmup_peak_cosine_floor():
    lr, warmup, decay = 1e-3, 10, 111  # steps 0..110
    assert train.lr_at(0, lr, warmup, decay) == pytest.approx(1e-4)  # 1/10 of the way up
    assert train.lr_at(4, lr, warmup, decay) == pytest.approx(5e-4)
    assert train.lr_at(9, lr, warmup, decay) == pytest.approx(1e-3)  # peak reached at the end of warm-up
    assert train.lr_at(10, lr, warmup, decay) == pytest.approx(1e-3)  # cosine starts at the peak
    assert train.lr_at(60, lr, warmup, decay) == pytest.approx(0.55e-3)  # half way: (1 + 0.1) / 2
    assert train.lr_at(35, lr, warmup, decay) == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert train.lr_at(110, lr, warmup, decay) == pytest.approx(1e-4)  # 10% of the peak at the last step
    assert train.lr_at(500, lr, warmup, decay) == pytest.approx(1e-4)  # and flat after it


def test_weight_decay_on_matrices_and_stacked_experts_only():
    model = Orion(OrionConfig.preset("toy", **TINY))
    decay, no_decay = train.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    expected = {"embed.weight", "lm_head.weight"} | {
        f"layers.{i}.{w}"
        for i in range(2)
        for w in (
            "attn.wq.weight",
            "attn.wk.weight",
            "attn.wv.weight",
            "attn.wo.weight",
            "moe.router.weight",
            "moe.experts.w1",
            "moe.experts.w2",
            "moe.experts.w3",
        )
    }
    assert names == expected
    no_decay_names = {n for n, p in model.named_parameters() if id(p) not in ids}
    assert no_decay_names and all("norm" in n for n in no_decay_names)


def test_aux_loss_reaches_the_router_only():
    torch.manual_seed(0)
    model = Orion(OrionConfig.preset("toy", **TINY, vocab_size=64))
    x = torch.randint(0, 64, (2, 16))
    ce, aux, counts = train.losses(train.NextTokenLoss(model), model, x, x)
    aux.backward()
    for layer in model.layers:
        assert layer.moe.router.weight.grad.abs().sum() > 0  # the aux loss's gradient reaches every router
    # ... and only what feeds a router: not the last layer's experts, not the head
    assert model.layers[-1].moe.experts.w1.grad is None and model.lm_head.weight.grad is None
    # counts: routed slots per expert, each layer's row sums to tokens x top_k
    assert counts.shape == (2, 4) and counts.sum(-1).tolist() == [2 * 16 * 2] * 2
    # the mean of the layers' load-balancing losses
    model(x)
    routers = model.routing()
    assert aux.item() == pytest.approx(sum(load_balancing_loss(p, e).item() for p, e in routers) / 2)


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, corpus):
    """A tiny model trained (120 steps, one thread) until it has memorised the corpus: its
    checkpoint folder and what train.py printed (tqdm.write's lines, above the bar)."""
    tmp_path = tmp_path_factory.mktemp("overfit")
    out, said, threads = tmp_path / "out", io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(said):
            train.main(
                tiny_run(
                    tmp_path,
                    corpus,
                    out,
                    "--max-iters",
                    "120",
                    "--eval-interval",
                    "60",
                    "--lr",
                    "1e-2",
                    "--warmup-iters",
                    "10",
                )
            )
    finally:
        torch.set_num_threads(threads)
    return out, said.getvalue()


def test_tiny_model_overfits_tiny_corpus_and_logs(overfit):
    out, said = overfit
    log = read_log(out)
    steps = [r for r in log if r["kind"] == "train"]
    evals = [r for r in log if r["kind"] == "eval"]
    saves = [r for r in log if r["kind"] == "save"]
    assert [r["step"] for r in steps] == list(range(1, 121))
    assert [r["step"] for r in evals] == [60, 120]
    assert [(r["step"], r["folder"]) for r in saves] == [(60, str(out)), (120, str(out))]
    for r in saves:
        assert r["seconds"] > 0 and f"step {r['step']}: saved the checkpoint to {out} in {r['seconds']:.1f} s" in said
    assert steps[0]["loss"] > 5.0  # starts near ln(vocab) ~ ln(320) = 5.8
    assert steps[-1]["loss"] < 1.0 and evals[-1]["val_loss"] < 1.0  # memorised (val is more of the same text)
    assert steps[-1]["tokens"] == 120 * 8 * 32
    for r in steps:
        assert set(r) == {"kind", "step", "tokens", "loss", "aux_loss", "lr", "tokens_per_s", "mfu", "expert_load"}
        # about top_k = 2, its value at an even load; not a lower bound: within one batch the
        # routed shares and the mean router probabilities need not line up
        assert 1.9 < r["aux_loss"] < 3
        assert r["tokens_per_s"] > 0 and r["mfu"] is None  # a CPU has no known peak, and none was given
        assert len(r["expert_load"]) == 2 and all(
            len(row) == 4 and abs(sum(row) - 1) < 1e-5 for row in r["expert_load"]
        )
    assert steps[-1]["lr"] == pytest.approx(1e-3)  # the cosine ends at 10% of --lr
    assert "MFU n/a: no known peak for cpu; pass --peak-tflops" in said


def test_chat_with_the_trained_model(overfit):
    """generate.py --chat on the checkpoint, in a subprocess fed a script on stdin: two turns (the
    second drops the first: max_seq_len is 64), /reset, one more, /exit. Each reply is chat()'s
    on the history that fits, with the same draws."""
    out, _ = overfit
    script = "Beautiful is\nExplicit is\n/reset\nSimple is\n/exit\nnever read\n"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "generate.py"),
            "--ckpt",
            str(out),
            "--chat",
            "--device",
            "cpu",
            "--max-new-tokens",
            "16",
            "--seed",
            "0",
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == (
        "[dropped the oldest turn to fit the model's max_seq_len 64 with room for 16 new tokens]\n"
        "[conversation reset]\n"
    )
    model, tokenizer = nano_orion.load(out)
    generator = torch.Generator().manual_seed(0)
    first, second, third = (
        nano_orion.chat(
            model, tokenizer, [{"role": "user", "content": text}], ORION_DEMO, max_new_tokens=16, generator=generator
        )
        for text in ("Beautiful is", "Explicit is", "Simple is")
    )  # alone: the first turn was dropped
    assert all(reply.strip() for reply in (first, second, third))  # the toy model's words, however loosely strung
    assert run.stdout == f"you> {first}\nyou> {second}\nyou> you> {third}\nyou> "


def test_resume_continues_exactly(tmp_path, corpus):
    common = ["--max-iters", "6", "--eval-interval", "3", "--warmup-iters", "2", "--peak-tflops", "0.1"]
    whole = tmp_path / "whole"
    train.main(tiny_run(tmp_path, corpus, whole, *common))
    # Same run, stopped after step 3 (the schedule still ends at 6), then resumed.
    split = tmp_path / "split"
    train.main(tiny_run(tmp_path, corpus, split, *common[2:], "--max-iters", "3", "--lr-decay-iters", "6"))
    # --resume takes the run's settings from the checkpoint: only the longer --max-iters is given
    model = train.main(
        ["--resume", "--out-dir", str(split), "--max-iters", "6", "--device", "cpu", "--peak-tflops", "0.1"]
    )

    def without_timing(log):  # nor the folder, which differs
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "seconds", "folder")} for r in log]

    assert len(read_log(whole)) == 6 + 2 + 2  # train, eval and save lines
    assert without_timing(read_log(split)) == without_timing(read_log(whole))  # losses, aux, load, lr: bit for bit
    reference, _ = nano_orion.load(whole)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_bad_data_path_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(
            ["--data", str(tmp_path / "missing.txt"), "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path)]
        )
    assert "missing.txt: no such file or folder" in capsys.readouterr().err


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, corpus, capsys):
    with pytest.raises(SystemExit):
        train.main(tiny_run(tmp_path, corpus, tmp_path / "nothing", "--resume"))
    assert "no checkpoint" in capsys.readouterr().err


def save_at(out, model, step):
    optimizer = torch.optim.AdamW(train.param_groups(model, 0.1))
    train.save_checkpoint(out, model, optimizer, TOKENIZER, {"step": step, "tokens": 0}, rank=0)


def load_at(out, model, optimizer) -> int:
    """--resume's reading of OUT_DIR into model and optimizer -> the step it saved."""
    state = train.read_train_state(out)
    train.load_checkpoint(out, state, model, optimizer)
    return state["step"]


def assert_readers_see(out, model, step):
    """nano_orion.load(), generate.py and --resume read `model`'s weights (and --resume its step)."""
    loaded, tokenizer = nano_orion.load(out)
    assert tokenizer is not None
    assert_same_weights(loaded, model)
    parser, args = generate_cli.parse_args(["--ckpt", str(out), "--device", "cpu"])
    assert torch.equal(generate_cli.load(parser, args)[0].lm_head.weight, model.lm_head.weight)
    fresh = Orion(model.config)
    assert load_at(out, fresh, torch.optim.AdamW(train.param_groups(fresh, 0.1))) == step
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_a_save_swaps_whole_checkpoints_and_keeps_the_log(tmp_path, monkeypatch):
    """Up to the instant a save swaps its folder in, every reader finds the previous checkpoint,
    whole, and from then on the new one; killed while writing, the save leaves the previous one
    and nothing else. The log and the lock file move into the new folder as the same files.
    (KeyboardInterrupt stands in for a SIGKILL: nothing catches it on the way out.)"""
    torch.manual_seed(0)
    config = OrionConfig.preset("toy", **TINY, vocab_size=64)
    first, second = Orion(config), Orion(config)
    out = tmp_path / "out"
    save_at(out, first, 1)
    (out / "log.jsonl").write_text('{"step": 1}\n')
    (out / train.LOCK).touch()
    log_inode = (out / "log.jsonl").stat().st_ino

    def killed_while_writing(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # the second save, killed while writing train_state.pt
        m.setattr(torch, "save", killed_while_writing)
        with pytest.raises(KeyboardInterrupt):
            save_at(out, second, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    assert_readers_see(out, first, 1)

    exchange, swapped = atomic._exchange, []

    def watched_exchange(new, target):
        assert_readers_see(target, first, 1)  # the last instant before the swap: the previous checkpoint
        swapped.append(exchange(new, target))
        return swapped[-1]

    monkeypatch.setattr(atomic, "_exchange", watched_exchange)
    save_at(out, second, 2)
    assert swapped == [True]  # one system call on Linux: the folder was never missing
    assert_readers_see(out, second, 2)
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n' and (out / "log.jsonl").stat().st_ino == log_inode
    assert sorted(p.name for p in out.iterdir()) == [
        train.LOCK,
        "config.json",
        "log.jsonl",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
        "train_state.pt",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_resume_reads_sharded_checkpoints(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = OrionConfig.preset("toy", **TINY, vocab_size=64)
    model = Orion(config)
    optimizer = torch.optim.AdamW(train.param_groups(model, 0.1))
    train.losses(train.NextTokenLoss(model), model, torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))[
        0
    ].backward()
    optimizer.step()
    (tmp_path / "tok.model").write_bytes(b"any")
    monkeypatch.setattr(train, "MAX_SHARD_BYTES", 100_000)  # what a model over 5 GB gets: shards + index
    train.save_checkpoint(tmp_path, model, optimizer, tmp_path / "tok.model", {"step": 7, "tokens": 0}, rank=0)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    fresh = Orion(config)
    fresh_optimizer = torch.optim.AdamW(train.param_groups(fresh, 0.1))
    assert load_at(tmp_path, fresh, fresh_optimizer) == 7
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    moments = [s["exp_avg"] for s in fresh_optimizer.state.values()]
    assert len(moments) == len(list(model.parameters())) and all(m.abs().sum() > 0 for m in moments)


def test_a_plain_save_over_a_training_checkpoint_drops_its_optimizer_state(tmp_path):
    """train_state.pt belongs to the weights saved with it: nano_orion.save writing other weights
    into the folder removes it, so --resume cannot pair them with the old optimizer state."""
    model = Orion(OrionConfig.preset("toy", **TINY, vocab_size=64))
    save_at(tmp_path, model, 3)
    assert (tmp_path / "train_state.pt").exists()
    nano_orion.save(model, tmp_path)
    assert not (tmp_path / "train_state.pt").exists() and (tmp_path / "tokenizer.model").exists()


def test_a_new_checkpoint_leaves_no_stale_shards(tmp_path):
    """A sharded save followed by a single-file one: the old index must not outlive its shards."""
    torch.manual_seed(0)
    config = OrionConfig.preset("toy", **TINY, vocab_size=64)
    model = Orion(config)
    optimizer = torch.optim.AdamW(train.param_groups(model, 0.1))
    (tmp_path / "tok.model").write_bytes(b"any")
    nano_orion.save(model, tmp_path, max_shard_bytes=100_000)  # an earlier, sharded save
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    train.save_checkpoint(tmp_path, model, optimizer, tmp_path / "tok.model", {"step": 1, "tokens": 0}, rank=0)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    loaded = nano_orion.checkpoint.load_nano(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_resume_drops_a_half_written_log_line(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"kind": "train", "step": s, "loss": 1.0}) for s in (1, 2, 3)]
    log.write_text("\n".join(lines) + "\n" + '{"kind": "train", "st')  # killed mid-write
    train.truncate_log(log, 2)
    assert log.read_text() == lines[0] + "\n" + lines[1] + "\n"


def test_gpu_peak_flops_by_whole_name():
    assert train.spec_peak_flops("NVIDIA L4") == 121e12
    assert train.spec_peak_flops("NVIDIA L40S") == 362e12  # not the L4's
    assert train.spec_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert train.spec_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert train.spec_peak_flops("NVIDIA A10G") is None  # not the A10's: no MFU without --peak-tflops


def test_fsdp_without_torchrun_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        train.main(["--fsdp"])
    err = capsys.readouterr().err
    assert "--fsdp shards across processes" in err and "torchrun" in err


# ---- a protected output folder, a --resume that remembers, one line for every fault ------------


def test_a_second_run_on_a_live_folder_is_refused_and_a_killed_run_holds_nothing(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = (
        "import fcntl, os, sys, time\n"  # what a live train.py does with OUT_DIR/.lock
        f"fd = os.open({str(out / train.LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'process 4242 on elsewhere')\n"
        "print('holding', flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "holding\n"
        run = tiny_run(tmp_path, corpus, out, "--max-iters", "2", "--eval-interval", "2")
        assert usage_error(capsys, train.main, run) == (
            f"train.py: error: --out-dir {out} is in use by a running train.py (process 4242 on elsewhere); "
            "wait for it to end, or choose another --out-dir"
        )
        assert usage_error(capsys, train.main, run + ["--resume"]).startswith(
            f"train.py: error: --out-dir {out} is in use"
        )
    finally:
        child.kill()  # SIGKILL: no cleanup runs, and the system releases the lock
        child.wait()
    assert [p.name for p in out.iterdir()] == [train.LOCK]  # the refused runs wrote nothing
    train.main(run)
    assert train.read_train_state(out)["step"] == 2


def test_a_new_run_refuses_another_runs_folder_unless_told(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    run = tiny_run(tmp_path, corpus, out, "--max-iters", "2", "--eval-interval", "2")
    train.main(run)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    capsys.readouterr()
    assert usage_error(capsys, train.main, run) == (
        f"train.py: error: --out-dir {out} holds a checkpoint and log.jsonl of another run; continue it with --resume, "
        "start over with --overwrite (deletes them), or choose another --out-dir"
    )
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    train.main(run + ["--overwrite", "--seed", "1"])
    assert f"--overwrite: deleted a checkpoint and log.jsonl of the run in {out}" in capsys.readouterr().out
    assert [r["step"] for r in read_log(out)] == [1, 2, 2, 2]  # the new run's lines only
    assert train.read_train_state(out)["args"]["seed"] == 1


def test_resume_takes_the_runs_settings_refuses_changes_and_says_what_a_longer_run_does(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    train.main(tiny_run(tmp_path, corpus, out, "--max-iters", "4", "--eval-interval", "2", "--warmup-iters", "2"))
    capsys.readouterr()
    resume = ["--resume", "--out-dir", str(out), "--device", "cpu"]
    for flag, value, saved in [
        ("--lr", "1e-2", "0.003"),
        ("--seed", "1", "0"),
        ("--batch-size", "4", "8"),
        ("--warmup-iters", "3", "2"),
    ]:
        assert usage_error(capsys, train.main, resume + ["--max-iters", "6", flag, value]) == (
            f"train.py: error: --resume: {flag} {float(value) if '.' in saved else value} differs from the run's "
            f"{saved}, "
            f"and a resumed run keeps its data, model and schedule; leave out {flag}, or start a new run "
            "(--overwrite, or another --out-dir)"
        )
    assert usage_error(capsys, train.main, resume) == (
        f"train.py: error: --resume: the run in {out} already reached step 4 of --max-iters 4; "
        "pass a larger --max-iters to train on"
    )
    train.main(resume + ["--max-iters", "6", "--batch-size", "8"])  # a flag given with the run's own value is fine
    said = capsys.readouterr().out
    assert (
        "--resume: --max-iters 6 (the run had 4): the learning rate's cosine ends at step 4 (--lr-decay-iters), "
        "so the steps after it run at its floor, 10% of --lr"
    ) in said
    lrs = {r["step"]: r["lr"] for r in read_log(out) if r["kind"] == "train"}
    assert list(lrs) == [1, 2, 3, 4, 5, 6] and lrs[4] == lrs[5] == lrs[6] == pytest.approx(3e-4)
    assert lrs[2] == pytest.approx(3e-3)  # the run's own 2 warm-up steps, not the default 50


def test_ctrl_c_saves_the_step_reached_and_resume_continues_exactly(tmp_path, corpus, capsys, monkeypatch):
    """Ctrl-C during step 3 ends the run after it, with that step saved; a second Ctrl-C during
    the save changes nothing. Resumed, the run ends as the uninterrupted one, bit for bit."""
    common = ("--max-iters", "6", "--eval-interval", "4", "--warmup-iters", "2")
    whole = tmp_path / "whole"
    train.main(tiny_run(tmp_path, corpus, whole, *common))
    step, save = train.train_step, train.save_checkpoint

    def ctrl_c_in_step_3(*args):
        result = step(*args)
        if args[5] == 2:  # the 0-based step: during the third
            signal.raise_signal(signal.SIGINT)
        return result

    def ctrl_c_again(*args):
        signal.raise_signal(signal.SIGINT)
        save(*args)

    out = tmp_path / "out"
    handler = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN in a job started in the background
    with monkeypatch.context() as m:
        m.setattr(train, "train_step", ctrl_c_in_step_3)
        m.setattr(train, "save_checkpoint", ctrl_c_again)
        with pytest.raises(SystemExit) as exit:
            train.main(tiny_run(tmp_path, corpus, out, *common))
    assert exit.value.code == 130
    assert one_line_error(capsys.readouterr().err) == (
        f"train.py: interrupted at step 3; saved step 3 in {out}; to continue: python train.py --resume --out-dir {out}"
    )
    assert train.read_train_state(out)["step"] == 3 and [r["step"] for r in read_log(out)] == [1, 2, 3, 3]
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C is itself again
    model = train.main(["--resume", "--out-dir", str(out), "--device", "cpu"])
    assert_same_weights(model, nano_orion.load(whole)[0])

    def train_lines(log):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log if r["kind"] == "train"]

    assert train_lines(read_log(out)) == train_lines(read_log(whole))


def test_ctrl_c_before_training_is_one_line(tmp_path, corpus, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "prepare", interrupted)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit:
        train.main(tiny_run(tmp_path, corpus, out))
    assert exit.value.code == 130 and one_line_error(capsys.readouterr().err) == (
        f"train.py: interrupted; {out} keeps its last checkpoint, if any "
        f"(to continue from it: python train.py --resume --out-dir {out})"
    )


@pytest.mark.parametrize("fault", ["no room", "write error"])
def test_a_full_disk_at_a_save_is_one_line_and_loses_neither_checkpoint_nor_log(
    tmp_path, corpus, capsys, monkeypatch, fault
):
    out = tmp_path / "out"
    train.main(tiny_run(tmp_path, corpus, out, "--max-iters", "2", "--eval-interval", "2"))
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.name != "log.jsonl"}
    capsys.readouterr()
    if fault == "no room":  # the check before a save
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
        problem = (
            r"the checkpoint needs about \d+\.\d MB and the disk has 0\.0 MB free; free some space or choose "
            r"another folder"
        )
    else:  # a disk that fills up during the save: torch.save's error says nothing of space

        def disk_full(*args):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3072 vs 2966")

        monkeypatch.setattr(torch, "save", disk_full)
        problem = (
            r"writing the checkpoint failed \(\[enforce fail at inline_container.cc:672\] . unexpected pos 3072 "
            r"vs 2966\); the previous checkpoint is unchanged"
        )
    with pytest.raises(SystemExit) as exit:
        train.main(["--resume", "--out-dir", str(out), "--max-iters", "4", "--device", "cpu"])
    assert exit.value.code == 1
    assert re.fullmatch(
        f"train.py: error: {re.escape(str(out))}: {problem}; {re.escape(str(out))} keeps its last "
        rf"checkpoint, if any \(to continue from it: python train.py --resume --out-dir {re.escape(str(out))}\)",
        one_line_error(capsys.readouterr().err),
    )
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.name != "log.jsonl"} == before
    assert [(r["kind"], r["step"]) for r in read_log(out)] == [
        ("train", 1),
        ("train", 2),
        ("eval", 2),
        ("save", 2),
        ("train", 3),
        ("train", 4),
        ("eval", 4),
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
        (["--lr", "nan"], "--lr must be a positive number, got nan"),
        (["--weight-decay", "-1"], "--weight-decay must be 0 or more, got -1.0"),
        (
            ["--lr-decay-iters", "5", "--warmup-iters", "10"],
            "--lr-decay-iters 5 is below --warmup-iters 10: the cosine would end before the warm-up does; "
            "give it at least the warm-up's length (default: --max-iters)",
        ),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
        (["--peak-tflops", "0"], "--peak-tflops must be a positive number, got 0.0"),
        (["--resume", "--overwrite"], "--resume continues the run in --out-dir and --overwrite deletes it; choose one"),
    ],
)
def test_bad_values_are_one_line_usage_errors(capsys, flags, message):
    assert usage_error(capsys, train.main, flags) == f"train.py: error: {message}"


def test_unusable_folders_are_one_line_usage_errors(tmp_path, corpus, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert usage_error(capsys, train.main, tiny_run(tmp_path, corpus, a_file)) == (
        f"train.py: error: --out-dir {a_file}: a file, not a folder; choose another --out-dir"
    )
    assert usage_error(capsys, train.main, tiny_run(tmp_path, corpus, a_file / "out")) == (
        f"train.py: error: --out-dir {a_file / 'out'}: cannot create it (Not a directory); choose another --out-dir"
    )
    out = tmp_path / "out"
    assert usage_error(capsys, train.main, tiny_run(tmp_path, corpus, out) + ["--data-dir", str(a_file / "data")]) == (
        f"train.py: error: --data-dir {a_file / 'data'}: cannot write the prepared data there (Not a directory); "
        "choose another --data-dir"
    )
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    access = os.access  # the tests may run as root, whom permissions do not stop: the check is what is tested
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != read_only and access(path, mode))
    assert usage_error(capsys, train.main, tiny_run(tmp_path, corpus, read_only)) == (
        f"train.py: error: --out-dir {read_only}: not writable; choose another --out-dir, or make it writable"
    )


@pytest.mark.parametrize("damaged", ["train_state.pt", "model.safetensors"])
def test_resume_from_a_truncated_checkpoint_is_one_line(tmp_path, corpus, capsys, damaged):
    out = tmp_path / "out"
    train.main(tiny_run(tmp_path, corpus, out, "--max-iters", "2", "--eval-interval", "2"))
    capsys.readouterr()
    path = out / damaged
    path.write_bytes(path.read_bytes()[:2000])
    err = usage_error(capsys, train.main, ["--resume", "--out-dir", str(out), "--max-iters", "4"])
    advice = {
        "train_state.pt": f"resume from an earlier copy of {out}, or start over with --overwrite",
        "model.safetensors": "train.py wrote this folder: resume from an earlier copy of it, or train again",
    }
    assert err.startswith(f"train.py: error: --resume: {path}") and "truncated or corrupt (" in err
    assert err.endswith(advice[damaged])


def test_threads_sets_torchs_threads(tmp_path, corpus):
    train.main(tiny_run(tmp_path, corpus, tmp_path / "out", "--max-iters", "1", "--threads", "2"))
    assert torch.get_num_threads() == 2  # the one_thread fixture set 1
    assert 1 <= train.default_threads() <= 4


def test_mfu_is_relative_to_a_stated_peak():
    assert train.peak_flops(torch.device("cpu"), 0.5) == (0.5e12, "--peak-tflops 0.5")
    assert train.peak_flops(torch.device("cpu"), None) == (None, "MFU n/a: no known peak for cpu; pass --peak-tflops")
