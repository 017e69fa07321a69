"""Training: loss falls, DP=2 and TP=2+SP match one process, exact resume, TP2 <-> TP1 checkpoints,
SIGTERM save-and-exit, NaN guard, atomic saves and clear errors on corrupt checkpoints."""

import json
import os
import signal

import pytest
import torch

from distributed import run_on_ranks
from training_utils import micro_batches, run_config

SEQ, VOCAB = 32, 16  # data uses 16 of the 256 ids: an easy, fast-falling loss
BASE = ["--preset", "tiny", "--mock-data", "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "3e-3", "--log-interval", "100", "--eval-interval", "0", "--seed", "3"]


def _train(argv, iters, hook=None, validate=False):
    """Build, optionally resume, train ``iters`` steps on synthetic data; returns the trainer."""
    from megatron.core import parallel_state as ps

    from megatron_spiral.parallel import initialize_parallel
    from megatron_spiral.training.loop import Trainer
    from megatron_spiral.training.setup import build_training_state

    run = run_config(BASE + ["--train-iters", str(iters)] + argv)
    initialize_parallel(run.parallel.tensor_model_parallel_size, run.parallel.seed)
    state = build_training_state(run.model, run.parallel, run.train, run.optim)
    trainer = Trainer(run, state)
    trainer.resume()
    if hook is not None:
        hook(trainer)
    data = micro_batches(SEQ, VOCAB, 2, 4, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                         state.consumed_train_samples)
    valid = micro_batches(SEQ, VOCAB, 2, 4, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                          offset=10 ** 6) if validate else None
    trainer.reason = trainer.train(data, valid)
    return trainer


def _dump(path, value):
    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(value, f)


def test_loss_decreases_single_process():
    losses = _train([], 40).losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def test_exact_resume_single_process(tmp_path):
    full = _train([], 6).losses
    first = _train(["--save", str(tmp_path), "--exit-interval", "3"], 6)
    assert first.reason.startswith("exit interval") and len(first.losses) == 3
    second = _train(["--load", str(tmp_path)], 6)
    assert first.losses + second.losses == full  # bitwise: every state survives the round trip


def _two_rank_body(out_dir):
    """DP=2 (+distributed optimizer, exact resume) and TP=2+SP (saved for a TP=1 load)."""
    from megatron.core import parallel_state

    results = {}
    results["dp2"] = _train(["--use-distributed-optimizer"], 6).losses
    parallel_state.destroy_model_parallel()
    _train(["--use-distributed-optimizer", "--save", os.path.join(out_dir, "dp2"), "--exit-interval", "3"], 6)
    parallel_state.destroy_model_parallel()
    results["dp2_resumed"] = _train(["--use-distributed-optimizer", "--load", os.path.join(out_dir, "dp2")], 6).losses
    parallel_state.destroy_model_parallel()
    tp_args = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer"]
    results["tp2"] = _train(tp_args, 6).losses
    parallel_state.destroy_model_parallel()
    _train(tp_args + ["--save", os.path.join(out_dir, "tp2"), "--exit-interval", "3"], 6)
    parallel_state.destroy_model_parallel()
    results["tp1_to_tp2"] = _train(tp_args + ["--load", os.path.join(out_dir, "tp1")], 6).losses
    _dump(os.path.join(out_dir, "losses.json"), results)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    # a TP=1 checkpoint at step 3 for the two ranks to continue at TP=2
    _train(["--use-distributed-optimizer", "--save", str(out / "tp1"), "--exit-interval", "3"], 6)
    run_on_ranks(_two_rank_body, 2, str(out))
    with open(out / "losses.json") as f:
        return json.load(f), out


def test_dp2_and_tp2_sp_match_single_process(two_rank_results):
    results, _ = two_rank_results
    reference = _train([], 6).losses
    torch.testing.assert_close(results["dp2"], reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["tp2"], reference, rtol=1e-4, atol=1e-4)
    assert results["dp2"][-1] < results["dp2"][0]


def test_exact_resume_dp2_distributed_optimizer(two_rank_results):
    results, _ = two_rank_results
    assert results["dp2_resumed"] == results["dp2"][3:]


def test_tp2_checkpoint_continues_at_tp1(two_rank_results):
    results, out = two_rank_results
    resumed = _train(["--use-distributed-optimizer", "--load", str(out / "tp2")], 6).losses
    torch.testing.assert_close(resumed, results["tp2"][3:], rtol=1e-4, atol=1e-4)


def test_tp1_checkpoint_continues_at_tp2(two_rank_results):
    results, _ = two_rank_results
    torch.testing.assert_close(results["tp1_to_tp2"], results["tp2"][3:], rtol=1e-4, atol=1e-4)
    assert results["tp1_to_tp2"] != results["tp2"][:3]  # resumed at step 3, not restarted


def test_sigterm_saves_and_exits(tmp_path):
    def send_sigterm_at_step_2(trainer):
        original = trainer.logger.record

        def record(loss, finite, **kwargs):
            original(loss, finite, **kwargs)
            if trainer.state.iteration == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        trainer.logger.record = record

    trainer = _train(["--exit-signal-handler", "--save", str(tmp_path)], 10, hook=send_sigterm_at_step_2)
    assert trainer.reason == "exit signal received" and trainer.state.iteration == 2
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert signal.getsignal(signal.SIGTERM) is not None  # handler restored afterwards


def _nan_at_step(step):
    def hook(trainer):
        embedding = trainer.state.model.module.embedding

        def poison(module, inputs, output):
            if trainer.state.iteration + 1 == step:
                return output * float("nan")
            return output

        embedding.register_forward_hook(poison)
    return hook


def test_nan_step_is_skipped_not_trained_on():
    snapshots = {}

    def hook(trainer):
        _nan_at_step(3)(trainer)
        original = trainer.logger.record

        def record(loss, finite, **kwargs):
            original(loss, finite, **kwargs)
            snapshots[trainer.state.iteration] = [p.detach().clone() for p in trainer.state.model.parameters()]

        trainer.logger.record = record

    trainer = _train([], 5, hook=hook)
    assert trainer.state.skipped_iterations == 1 and trainer.state.nan_iterations == 1
    for before, after in zip(snapshots[2], snapshots[3]):
        assert torch.equal(before, after)  # the NaN step changed nothing
    assert all(torch.isfinite(p).all() for p in trainer.state.model.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(snapshots[3], snapshots[4]))  # training went on


def test_nan_policy_stop_names_the_iteration():
    from megatron_spiral.training.step import NonFiniteError

    with pytest.raises(NonFiniteError, match="iteration 2"):
        _train(["--nan-policy", "stop"], 4, hook=_nan_at_step(2))


def test_corrupt_and_incomplete_checkpoints_give_clear_errors(tmp_path):
    from megatron_spiral.checkpointing import CheckpointError

    _train(["--save", str(tmp_path)], 2)
    ckpt = tmp_path / "iter_0000002"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("two\n")
    with pytest.raises(CheckpointError, match="corrupt tracker file .*latest_checkpointed_iteration.txt"):
        _train(["--load", str(tmp_path)], 4)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2\n")
    (ckpt / "common.pt").unlink()
    with pytest.raises(CheckpointError, match="common.pt is missing"):
        _train(["--load", str(tmp_path)], 4)
    # Megatron-LM starts from scratch when --load has no checkpoint, unless told to exit instead
    with pytest.raises(CheckpointError, match="no checkpoint found at .*nowhere"):
        _train(["--load", str(tmp_path / "nowhere"), "--exit-on-missing-checkpoint"], 4)


def test_crash_mid_save_leaves_previous_checkpoint_usable(tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    # (same --train-iters throughout: a changed schedule is refused on resume, as in Megatron-LM)
    _train(["--save", str(tmp_path), "--save-interval", "2", "--exit-interval", "2"], 4)
    real_save = dist_checkpointing.save

    def crashing_save(state_dict, directory, *args, **kwargs):
        real_save(state_dict, directory, *args, **kwargs)
        raise RuntimeError("node died while saving")

    monkeypatch.setattr(dist_checkpointing, "save", crashing_save)
    with pytest.raises(RuntimeError, match="node died"):
        _train(["--load", str(tmp_path), "--save", str(tmp_path), "--save-interval", "2"], 4)
    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not (tmp_path / "iter_0000004").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp_iter")]  # nothing half-written left
    resumed = _train(["--load", str(tmp_path)], 4)
    assert resumed.state.iteration == 4 and len(resumed.losses) == 2


def test_preset_with_explicit_override_flags():
    run = run_config(["--preset", "spiral-b-160m-mesh", "--mock-data", "--hidden-size", "64", "--num-attention-heads", "4",
                      "--spiral-topology", "anchor"])
    assert (run.model.hidden_size, run.model.topology) == (64, "anchor")
    assert run.model.layout == "2+4x{1/8,1/4,1/2,1}+2"  # kept from the preset
    # Optimizer flags are not part of a preset: Megatron-LM's defaults (the paper's recipe is spelled
    # out in examples/slurm and docs/training.md).
    assert run.optim.adam_beta2 == 0.999 and run.optim.weight_decay == 0.01


def test_flag_errors_exit_with_a_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_config(["--preset", "tiny", "--sequence-parallel"])  # without a model: --num-layers error
    assert exit_info.value.code == 2
    assert "--sequence-parallel needs --tensor-model-parallel-size > 1" in capsys.readouterr().err


def test_tensorboard_has_megatron_keys_and_loop_diagnostics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _train(["--tensorboard-dir", str(tmp_path), "--log-interval", "2", "--eval-interval", "2",
                      "--eval-iters", "2", "--log-throughput", "--log-timers-to-tensorboard",
                      "--log-validation-ppl-to-tensorboard"], 4, validate=True)
    assert 0 < trainer.last_validation_loss < 10
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for key in ("lm loss", "learning-rate", "grad-norm", "throughput", "tokens-per-second",
                "lm loss validation", "lm loss validation ppl",
                "loop/update-norm/iter0", "loop/mesh-write-entropy/iter0", "loop/mesh-read-entropy/transitional"):
        assert key in tags, (key, sorted(tags))
    assert [e.step for e in events.Scalars("lm loss")] == [1, 2, 3, 4]  # --tensorboard-log-interval 1
    assert [e.step for e in events.Scalars("throughput")] == [2, 4]     # per log line, as Megatron-LM
    validation = events.Scalars("lm loss validation")
    assert [e.step for e in validation] == [2, 4]
    ppl = events.Scalars("lm loss validation ppl")[-1].value
    assert abs(ppl - __import__("math").exp(validation[-1].value)) < 1e-3 * ppl
    slots = 3 + 3  # tiny: T = 3 iterations -> B = T + 3
    entropy = events.Scalars("loop/mesh-write-entropy/iter0")[0].value
    assert 0 < entropy <= __import__("math").log(slots) + 1e-6
