"""Fault injection: every failure ends the run with one clear message and a non-zero status, resume
refuses what it must, and no fault loses the previous checkpoint.

Upstream behaviours pinned (Megatron-LM core_v0.16.1, megatron/training/checkpointing.py and
megatron/core/optimizer_param_scheduler.py): --load without a checkpoint starts from scratch;
--finetune loads weights only with iteration 0; --no-load-optim keeps the iteration but not the
optimizer or schedule; a changed schedule value is refused unless --override-opt-param-scheduler
or --use-checkpoint-opt-param-scheduler; consumed_valid_samples is checkpointed.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from training_utils import micro_batches, run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "pretrain_spiral.py")
SEQ, VOCAB = 32, 16
BASE = ["--preset", "tiny", "--mock-data", "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "3e-3", "--log-interval", "100", "--eval-interval", "0", "--seed", "3"]
CLI = ["--preset", "tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
       "--log-interval", "1"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _train(argv, iters, hook=None, tokenizer=None):
    """Build, resume (per the flags), train ``iters`` steps in this process; returns the trainer."""
    from megatron.core import parallel_state as ps

    from megatron_spiral.parallel import initialize_parallel
    from megatron_spiral.training.loop import Trainer
    from megatron_spiral.training.setup import build_training_state

    run = run_config(BASE + ["--train-iters", str(iters)] + argv)
    initialize_parallel(run.parallel.tensor_model_parallel_size, run.parallel.seed)
    state = build_training_state(run.model, run.parallel, run.train, run.optim)
    trainer = Trainer(run, state, tokenizer)
    trainer.resume()
    if hook is not None:
        hook(trainer)
    data = micro_batches(SEQ, VOCAB, 2, 4, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                         state.consumed_train_samples)
    trainer.reason = trainer.train(data, None)
    return trainer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A save dir with iter 2 and iter 4 of a 6-iteration run (exited at 4), and its final weights."""
    out = tmp_path_factory.mktemp("saved")

    def advance_rng(trainer):  # so the saved RNG state differs from a freshly seeded one
        original = trainer.logger.record

        def record(*args, **kwargs):
            torch.rand(7)
            original(*args, **kwargs)
        trainer.logger.record = record

    trainer = _train(["--save", str(out), "--save-interval", "2", "--exit-interval", "4"], 6, hook=advance_rng)
    weights = [p.detach().clone() for p in trainer.state.model.module.parameters()]
    return out, weights, torch.get_rng_state()


@pytest.fixture
def ckpt(saved, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(saved[0], out)
    return out


# ------------------------------------------------------------------ failures end the process
def test_failure_under_torchrun_with_loader_workers_exits_within_seconds(tmp_path):
    """Loader workers used to ignore SIGTERM, and Python's exit joins them: every error hung."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node=2", SCRIPT, *CLI, "--train-iters", "50", "--lr", "1e6", "--nan-policy",
           "stop", "--num-workers", "2", "--eval-interval", "0"]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "pretrain_spiral.py: error: iteration" in output and "--nan-policy stop" in output, output[-3000:]
    assert "Traceback" not in output.split("pretrain_spiral.py: error")[0][-2000:]
    assert time.time() - start < 120, "the failing job did not end promptly"


@pytest.mark.parametrize("handler", [True, False], ids=["exit-signal-handler", "plain"])
def test_sigint(tmp_path, handler):
    """Ctrl-C: saves and exits 0 like SIGTERM under --exit-signal-handler; otherwise exit 130, no traceback."""
    cmd = [sys.executable, SCRIPT, *CLI, "--train-iters", "100000", "--save", str(tmp_path), "--eval-interval", "0",
           "--num-workers", "2"] + (["--exit-signal-handler"] if handler else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if " iteration        2/" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    if handler:
        assert proc.returncode == 0, output[-3000:]
        assert "exit signal received" in output
        assert int((tmp_path / "latest_checkpointed_iteration.txt").read_text()) >= 2
    else:
        assert proc.returncode == 130, output[-3000:]
        assert "error: interrupted" in output and "Traceback" not in output


def test_run_guarded_turns_every_exception_into_one_line(capsys):
    from megatron_spiral.checkpointing import CheckpointError
    from megatron_spiral.training.failure import run_guarded

    def raise_(err):
        def fn():
            raise err
        return fn

    assert run_guarded(raise_(EOFError("No data left in file")), watchdog_seconds=None) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "pretrain_spiral.py: error: EOFError: No data left in file"
    assert run_guarded(raise_(CheckpointError("checkpoint X is bad")), watchdog_seconds=None) == 1
    assert capsys.readouterr().err == "pretrain_spiral.py: error: checkpoint X is bad\n"
    assert run_guarded(raise_(KeyboardInterrupt()), watchdog_seconds=None) == 130
    with pytest.raises(SystemExit):  # argparse's own exit passes through
        run_guarded(raise_(SystemExit(2)), watchdog_seconds=None)
    disk = RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                        "data/0: file write failed")
    assert run_guarded(raise_(disk), watchdog_seconds=None) == 1
    assert "error: disk full" in capsys.readouterr().err


def _nan_at(steps):
    def hook(trainer):
        def poison(module, inputs, output):
            return output * float("nan") if trainer.state.iteration + 1 in steps else output
        trainer.state.model.module.embedding.register_forward_hook(poison)
    return hook


def test_max_skipped_iters_counts_consecutive_skips():
    from megatron_spiral.training.step import TrainingStopped

    trainer = _train(["--max-skipped-iters", "1"], 5, hook=_nan_at({2, 4}))  # never two in a row
    assert trainer.state.iteration == 5 and trainer.state.skipped_iterations == 2
    with pytest.raises(TrainingStopped, match="iteration 3: more than 1 consecutive steps skipped"):
        _train(["--max-skipped-iters", "1"], 5, hook=_nan_at({2, 3}))


# ------------------------------------------------------------------ resume refuses what it must
@pytest.mark.parametrize("flags, field, old, new", [
    (["--normalization", "RMSNorm"], "normalization", "'LayerNorm'", "'RMSNorm'"),
    (["--spiral-shift", "parallel"], "shift", "'overlap'", "'parallel'"),
    (["--spiral-chunk-offset", "zero"], "chunk_offset", "'half'", "'zero'"),
    (["--rotary-percent", "0.5"], "rotary_percent", "1.0", "0.5"),
])
def test_changed_model_field_is_refused_naming_it(ckpt, flags, field, old, new):
    from megatron_spiral.checkpointing import CheckpointError

    with pytest.raises(CheckpointError, match=rf"{field} \(--[a-z-]+\): checkpoint {old}, this run {new}"):
        _train(["--load", str(ckpt)] + flags, 6)


def test_field_missing_in_an_old_checkpoint_counts_as_its_default(ckpt):
    meta_path = ckpt / "iter_0000004" / "spiral_config.json"
    meta = json.loads(meta_path.read_text())
    del meta["model"]["rotary_percent"]  # a field added after this checkpoint was written
    meta_path.write_text(json.dumps(meta))
    (ckpt / "iter_0000004" / "checksums.json").unlink()  # old checkpoints have none
    assert _train(["--load", str(ckpt)], 6).state.iteration == 6
    from megatron_spiral.checkpointing import CheckpointError

    with pytest.raises(CheckpointError, match="rotary_percent .*checkpoint 1.0, this run 0.5"):
        _train(["--load", str(ckpt), "--rotary-percent", "0.5"], 6)


def test_tokenizer_vocabulary_is_compared():
    from megatron_spiral.checkpointing import CheckpointError, tokenizer_metadata
    from megatron_spiral.tokenizer import NullTokenizer
    from megatron_spiral.training.resume_checks import check_tokenizer

    saved = tokenizer_metadata(NullTokenizer(4094))
    check_tokenizer(saved, NullTokenizer(4094), "ck")  # same: fine
    with pytest.raises(CheckpointError, match="vocabulary size 4096 there, 512 with this run"):
        check_tokenizer(saved, NullTokenizer(510), "ck")
    with pytest.raises(CheckpointError, match=r"vocabulary \(sha256"):
        check_tokenizer({**saved, "sha256": "0" * 64}, NullTokenizer(4094), "ck")


def test_schedule_change_follows_megatron_rule(ckpt):
    from megatron_spiral.checkpointing import CheckpointError

    with pytest.raises(CheckpointError) as err:
        _train(["--load", str(ckpt)], 8)  # a longer run changes the decay length
    text = str(err.value)
    assert "lr_decay_steps" in text and "checkpoint 24, this run 32" in text
    assert "--override-opt-param-scheduler" in text and "--use-checkpoint-opt-param-scheduler" in text
    new = _train(["--load", str(ckpt), "--override-opt-param-scheduler"], 5)
    assert new.state.scheduler.lr_decay_steps == 5 * 4 and new.state.scheduler.num_steps == 5 * 4
    kept = _train(["--load", str(ckpt), "--use-checkpoint-opt-param-scheduler"], 8)
    assert kept.state.scheduler.lr_decay_steps == 6 * 4 and kept.state.iteration == 8
    with pytest.raises(CheckpointError, match="exclude each other"):
        run_config(BASE + ["--load", str(ckpt), "--override-opt-param-scheduler",
                           "--use-checkpoint-opt-param-scheduler"])


def test_distributed_optimizer_toggle_is_refused(ckpt):
    from megatron_spiral.checkpointing import CheckpointError

    with pytest.raises(CheckpointError, match="saved without --use-distributed-optimizer but this run has "
                                              "--use-distributed-optimizer.*--no-load-optim"):
        _train(["--load", str(ckpt), "--use-distributed-optimizer"], 6)


def test_finetune_no_load_optim_no_load_rng(saved, ckpt):
    _, weights, rng_at_save = saved
    seen = {}

    def capture(trainer):
        seen["weights"] = [p.detach().clone() for p in trainer.state.model.module.parameters()]
        seen["rng"] = torch.get_rng_state()
        seen["adam"] = len(trainer.state.optimizer.optimizer.state)
        seen["lr_steps"] = trainer.state.scheduler.num_steps
        seen["iteration"] = trainer.state.iteration

    _train(["--load", str(ckpt), "--finetune"], 1, hook=capture)
    assert seen["iteration"] == 0 and seen["lr_steps"] == 0 and seen["adam"] == 0
    assert all(torch.equal(a, b) for a, b in zip(seen["weights"], weights))
    assert not torch.equal(seen["rng"], rng_at_save)
    _train(["--load", str(ckpt), "--no-load-optim"], 5, hook=capture)
    assert seen["iteration"] == 4 and seen["lr_steps"] == 0 and seen["adam"] == 0
    assert torch.equal(seen["rng"], rng_at_save)
    assert all(torch.equal(a, b) for a, b in zip(seen["weights"], weights))
    _train(["--load", str(ckpt), "--no-load-rng"], 6, hook=capture)
    assert seen["iteration"] == 4 and seen["lr_steps"] == 16 and seen["adam"] > 0
    assert not torch.equal(seen["rng"], rng_at_save)


def test_use_checkpoint_args_takes_model_from_checkpoint(ckpt):
    from megatron_spiral.training.checkpoint import model_config_from_checkpoint

    run = run_config(BASE + ["--load", str(ckpt), "--hidden-size", "32", "--normalization", "RMSNorm",
                             "--use-checkpoint-args"])
    model = model_config_from_checkpoint(str(ckpt), run.model, log=lambda m: None)
    assert (model.hidden_size, model.normalization) == (64, "LayerNorm")


def test_validation_after_resume_equals_uninterrupted_run(tmp_path):
    """consumed_valid_samples is saved and restored (it was not: validation restarted at sample 0).
    The first launch on an empty --save X --load X starts from scratch and says so."""
    line = [*CLI, "--train-iters", "6", "--eval-interval", "2", "--eval-iters", "2", "--num-workers", "0"]

    def run(extra):
        proc = subprocess.run([sys.executable, SCRIPT, *line, *extra], capture_output=True, text=True, env=_env(),
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    def validation(out):  # {iteration: "lm loss value: ..."}
        found = re.findall(r"validation loss at iteration (\d+) \| (lm loss value: \S+)", out)
        return {int(it): value for it, value in found}

    full = validation(run([]))
    ck = str(tmp_path / "ck")
    first = run(["--save", ck, "--load", ck, "--exit-interval", "3"])
    assert f"no checkpoint found at {ck}, starting from scratch" in first
    second = run(["--save", ck, "--load", ck])
    first, second = validation(first), validation(second)
    # An exit at --exit-interval has no end-of-run evaluation (Megatron-LM's pretrain()).
    assert sorted(full) == [2, 4, 6] and sorted(first) == [2] and sorted(second) == [4, 6]
    assert {**first, **second} == full


# ------------------------------------------------------------------ checkpoint integrity
def _distcp(ckpt_dir):
    files = sorted(p for p in os.listdir(ckpt_dir) if p.endswith(".distcp"))
    return ckpt_dir / max(files, key=lambda p: os.path.getsize(ckpt_dir / p))


def test_corrupt_or_truncated_shard_is_refused_naming_the_file_and_fallback_is_opt_in(ckpt, capsys):
    from megatron_spiral.checkpointing import CheckpointError

    shard = _distcp(ckpt / "iter_0000004")
    data = bytearray(shard.read_bytes())
    n = min(65536, len(data) // 2)
    data[len(data) // 4:len(data) // 4 + n] = os.urandom(n)
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"corrupt checkpoint file .*{shard.name}: its CRC-32 differs"):
        _train(["--load", str(ckpt)], 6)
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match=rf"corrupt checkpoint file .*{shard.name}: \d+ bytes, \d+ were saved"):
        _train(["--load", str(ckpt)], 6)
    capsys.readouterr()
    trainer = _train(["--load", str(ckpt), "--ckpt-fallback"], 6)
    assert trainer.state.iteration == 6 and len(trainer.losses) == 4  # resumed from iteration 2
    assert re.search(r"--ckpt-fallback: corrupt checkpoint file .*; falling back to the newest intact "
                     r"checkpoint .*iter_0000002", capsys.readouterr().out)


def test_truncated_shard_without_checksums_is_a_checkpoint_error_not_eoferror(ckpt):
    from megatron_spiral.checkpointing import CheckpointError

    it = ckpt / "iter_0000004"
    (it / "checksums.json").unlink()
    shard = _distcp(it)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"could not load checkpoint .*iter_0000004 .*no checksums"):
        _train(["--load", str(ckpt)], 6)


def test_save_dir_lock(tmp_path, monkeypatch):
    import socket

    from megatron_spiral.checkpointing import CheckpointError
    from megatron_spiral.training import save_lock

    lock = save_lock.SaveDirLock(str(tmp_path), log=lambda m: None)
    with pytest.raises(CheckpointError, match=rf"in use by another run \(host {socket.gethostname()}, pid {os.getpid()}"):
        save_lock.SaveDirLock(str(tmp_path), log=lambda m: None)
    lock.release()
    assert not (tmp_path / ".save.lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path = tmp_path / ".save.lock"
    lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    logged = []
    save_lock.SaveDirLock(str(tmp_path), log=logged.append).release()
    assert "taking over the stale save lock" in logged[0] and f"process {dead.pid}" in logged[0]
    # another host: refused while its heartbeat is fresh, taken over when it is stale
    lock_path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1}))
    with pytest.raises(CheckpointError, match="host node-elsewhere, pid 1"):
        save_lock.SaveDirLock(str(tmp_path), log=lambda m: None)
    old = time.time() - save_lock.STALE_SECONDS - 5
    os.utime(lock_path, (old, old))
    save_lock.SaveDirLock(str(tmp_path), log=logged.append).release()
    assert "heartbeat" in logged[-1]
    # a requeued SLURM job takes over its own earlier run's lock at once
    lock_path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "slurm_job_id": "77",
                                     "slurm_restart_count": 0}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    save_lock.SaveDirLock(str(tmp_path), log=logged.append).release()
    assert "requeued" in logged[-1]


def _fake_checkpoint(path, value):
    from megatron_spiral import checkpointing as layout

    os.makedirs(path)
    for name in ("metadata.json", "common.pt", ".metadata"):
        (path / name).write_text(value)
    layout.write_metadata(str(path), {}, 0)
    layout.write_checksums(str(path))


@pytest.mark.parametrize("crash_at", [1, 2, 3])
def test_republish_is_atomic_at_every_step(tmp_path, monkeypatch, crash_at):
    """Kill (here: an exception) at each rename of a re-save of an existing iteration: the tracker's
    checkpoint always resolves and verifies (old content or new), nothing was deleted first."""
    from megatron_spiral import checkpointing as layout

    save = tmp_path
    _fake_checkpoint(save / "iter_0000002", "old")
    layout.write_tracker(str(save), 2)
    _fake_checkpoint(save / ".tmp_iter_0000002", "new")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == crash_at:
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    try:
        layout.publish(str(save / ".tmp_iter_0000002"), str(save / "iter_0000002"))
        layout.write_tracker(str(save), 2)
    except OSError:
        pass
    monkeypatch.setattr(os, "replace", real_replace)
    ckpt_dir, it = layout.resolve_checkpoint(str(save))
    assert it == 2 and layout.check_intact(ckpt_dir)
    assert (save / "iter_0000002" / "common.pt").read_text() in ("old", "new")
    layout.remove_leftovers(str(save))
    assert not [n for n in os.listdir(save) if n.startswith((".tmp_iter", ".old_iter"))]


def test_relaunch_of_finished_run_does_not_republish(ckpt):
    before = os.stat(ckpt / "iter_0000004" / "checksums.json").st_ino
    _train(["--load", str(ckpt), "--save", str(ckpt), "--use-checkpoint-opt-param-scheduler"], 4)
    assert os.stat(ckpt / "iter_0000004" / "checksums.json").st_ino == before


def test_disk_full_says_where_and_how_much_and_leaves_nothing(tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    import megatron_spiral.checkpointing as layout
    from megatron_spiral.diskspace import DiskFullError

    monkeypatch.setattr(layout, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskFullError, match=rf"disk full while saving checkpoint iteration 1 under {tmp_path} "
                                            r"\(about [\d.]+ MiB needed, .*point --save elsewhere"):
        _train(["--save", str(tmp_path)], 1)
    monkeypatch.setattr(layout, "free_bytes", lambda path: None)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(dist_checkpointing, "save", full)
    with pytest.raises(DiskFullError, match="disk full while saving checkpoint iteration 1"):
        _train(["--save", str(tmp_path)], 1)
    assert not [n for n in os.listdir(tmp_path) if "iter_" in n]


# ------------------------------------------------------------------ data faults
def test_index_cache_damage_is_repaired_and_writes_are_atomic(tmp_path):
    import numpy as np

    from megatron_spiral.data.index_cache import atomic_numpy_saves, repair_index_cache

    group, other = "abc-GPTDataset-train-", "def-GPTDataset-valid-"
    for g in (group, other):
        (tmp_path / f"{g}description.txt").write_text("x")
        for kind in ("document_index", "sample_index", "shuffle_index"):
            np.save(tmp_path / f"{g}{kind}.npy", np.arange(10))
    (tmp_path / f"{group}shuffle_index.npy").write_bytes(b"")  # killed mid-write by an older run
    removed = repair_index_cache([str(tmp_path)], log=lambda m: None)
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        f"{group}{k}" for k in ("description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy"))
    assert len(os.listdir(tmp_path)) == 4  # the intact group stays

    class Exploding:
        def __array__(self, *args, **kwargs):
            raise KeyboardInterrupt  # a kill in the middle of the write

    with atomic_numpy_saves(), pytest.raises(KeyboardInterrupt):
        np.save(str(tmp_path / "new.npy"), Exploding())
    assert not [n for n in os.listdir(tmp_path) if n.startswith("new")]


def test_bin_idx_pair_is_checked(tmp_path):
    import numpy as np

    from megatron_spiral.data.gpt_data import DataError, check_prefix, open_checked
    from megatron_spiral.data.indexed_writer import IndexedDatasetWriter

    prefix = str(tmp_path / "ds")
    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_documents(np.arange(100, dtype=np.uint16), np.array([60, 40]))
    writer.finalize()
    open_checked(prefix)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(150)
    with pytest.raises(DataError, match=r"ds.bin has 150 bytes but its .idx describes 200 .*truncated"):
        open_checked(prefix)
    os.remove(prefix + ".idx")  # a kill inside the publish of a new pair: the old .idx is gone first
    with pytest.raises(DataError, match="no indexed dataset"):
        check_prefix(prefix)


def test_bad_split_flag_is_explained(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_config(["--preset", "tiny", "--data-path", "x", "--split", "a,b,c"])
    assert exit_info.value.code == 2
    assert "--split 'a,b,c': expected up to three non-negative train,valid,test weights" in capsys.readouterr().err


def test_ckpt_format_other_than_torch_dist_is_refused_with_reason():
    from megatron_spiral.checkpointing import CheckpointError

    assert run_config(BASE + ["--ckpt-format", "torch_dist"]).checkpoint.ckpt_format == "torch_dist"
    with pytest.raises(CheckpointError, match="--ckpt-format torch: only torch_dist is supported"):
        run_config(BASE + ["--ckpt-format", "torch"])


def test_token_ids_outside_the_vocabulary_stop_the_run_naming_the_cause(tmp_path):
    """Data made with a bigger tokenizer: without a check, TP=1 dies in the embedding (a CUDA
    device-side assert) and TP > 1 trains on zeroed embeddings/logits (megatron's vocab-parallel
    layers mask ids outside their shard). The run must stop before its first step, saving nothing."""
    import numpy as np

    from megatron_spiral.data.indexed_writer import IndexedDatasetWriter

    prefix = str(tmp_path / "other_tokenizer_text_document")
    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_documents((250 + np.arange(4000) % 50).astype(np.uint16), np.array([1000] * 4))
    writer.finalize()
    save = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--preset", "tiny", "--data-path", prefix, "--split", "100,0,0",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "200", "--seq-length", "32",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
         "--save", str(save), "--save-interval", "1", "--num-workers", "0"],
        capture_output=True, text=True, timeout=300, env=_env())
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert re.search(r"token id 2[5-9]\d in a training batch is outside the tokenizer's vocabulary "
                     r"\(202 ids\): the dataset was preprocessed with another tokenizer", output), output[-3000:]
    assert not save.exists() or not [name for name in os.listdir(save) if name.startswith("iter_")]
