"""train.py under data parallelism: 2 CPU processes (gloo) train what one process does,
replicated (DDP) or sharded (FSDP2)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import nano_orion
import train

from test_train import one_thread, read_log, tiny_run  # noqa: F401  (one_thread: a fixture)

STEPS = ["--max-iters", "4", "--eval-interval", "4", "--warmup-iters", "2", "--lr", "1e-2", "--peak-tflops", "0.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, argv, result_dir):
    """One torchrun-like process: the environment torchrun would set, then train.main."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    model = train.main(argv)
    if "--fsdp" not in argv:  # a DDP replica; FSDP shards are only whole in rank 0's checkpoint
        torch.save(model.state_dict(), f"{result_dir}/rank{rank}.pt")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, corpus, mode):
    # Reference: one process, 2 micro-batches of 8 per step. (Each micro-batch has its own
    # load-balancing loss, as each rank's batch does, so the comparison is exact in the math.)
    single = tmp_path / "single"
    train.main(tiny_run(tmp_path, corpus, single, *STEPS, "--grad-accum", "2"))
    # Two processes with 8 sequences each: the same 16 sequences per step.
    ddp = tmp_path / "ddp"
    argv = tiny_run(tmp_path, corpus, ddp, *STEPS) + (["--fsdp"] if mode == "fsdp" else [])
    mp.spawn(worker, args=(2, free_port(), argv, str(tmp_path)), nprocs=2)

    if mode == "ddp":
        rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), f"replicas differ in {name}"
    trained, _ = nano_orion.load(ddp)  # the checkpoint rank 0 wrote
    reference, _ = nano_orion.load(single)
    for (name, a), b in zip(trained.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # Rank 0's log holds the mean over both ranks: the single process's numbers.
    for a, b in zip(read_log(ddp), read_log(single), strict=True):
        assert a["step"] == b["step"] and a["kind"] == b["kind"]
        for key in ("loss", "aux_loss", "val_loss", "tokens", "lr"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5), key
        if "expert_load" in a:
            torch.testing.assert_close(torch.tensor(a["expert_load"]), torch.tensor(b["expert_load"]))
    assert [p.name for p in ddp.iterdir() if p.name.startswith(".")] == [train.LOCK]  # a hidden file: the lock
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # every save swapped in, none left beside
