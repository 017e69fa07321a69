"""Weights & Biases gets the scalars TensorBoard gets (Megatron-LM's training_log writes each tag to
both; the `... vs samples` twins are TensorBoard-only there too). Offline: no account, no network."""

import pytest

from dropin_helpers import tensorboard_scalars, wandb_history

pytest.importorskip("wandb")


def test_wandb_offline_run_gets_the_tensorboard_scalars(tmp_path, monkeypatch):
    from megatron_spiral.training import logger as logger_module
    from megatron_spiral.training.logger import IterationStats, LogOptions, ScalarWriter, TrainingLogger, init_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(logger_module, "is_last_rank", lambda: True)
    run = init_wandb("spiral", "t", str(tmp_path / "wandb"), {"lr": 1e-3})
    writer = ScalarWriter(str(tmp_path / "tb"), wandb_run=run)
    log = TrainingLogger(train_iters=3, flops_per_sequence=10 ** 9, seq_length=32,
                         options=LogOptions(log_interval=1, log_timers_to_tensorboard=True), writer=writer)
    for it, loss in ((1, 3.0), (2, 2.5), (3, 2.25)):
        log.record(loss, finite=True)
        stats = IterationStats(loss=loss, skipped=False, nan=False, learning_rate=1e-3 / it, loss_scale=1.0,
                               grad_norm=0.5 * it)
        log.write_step(it, 4 * it, 4, stats)
        log.log(it, 4 * it, 4, stats, {"loop/update-norm/iter0": 0.1 * it})
    log.log_validation("iteration 3", 3, 2.0, 12)
    log.close()

    tensorboard = tensorboard_scalars(tmp_path / "tb")
    by_step = {}
    for row in wandb_history(tmp_path / "wandb"):  # a step's row may be written more than once
        by_step.setdefault(row["_step"], {}).update(row)
    wandb = {}
    for step, row in sorted(by_step.items()):
        for key, value in row.items():
            if not key.startswith("_"):
                wandb.setdefault(key, []).append((step, value))
    tb_tags = {tag for tag in tensorboard if not tag.endswith("vs samples")}
    assert tb_tags <= set(wandb), tb_tags - set(wandb)
    for tag in ("lm loss", "learning-rate", "grad-norm", "lm loss validation", "loop/update-norm/iter0"):
        assert [v for _, v in sorted(wandb[tag])] == pytest.approx([v for _, v in sorted(tensorboard[tag])]), tag
    assert [v for _, v in sorted(wandb["lm loss"])] == pytest.approx([3.0, 2.5, 2.25])
    assert [v for _, v in wandb["samples vs steps"]] == [4, 8, 12]
