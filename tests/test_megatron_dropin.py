"""pretrain_spiral.py as a drop-in for Megatron-LM's pretrain_gpt.py (issue 9).

The reference values are Megatron-LM core_v0.16.1's: its flag list and defaults
(megatron_spiral/training/megatron_lm_flags.py is generated from its parser by
tools/dump_megatron_lm_flags.py), its training_log / evaluate_and_print_results strings and its
get_optimizer_param_scheduler arithmetic, worked out by hand below.
"""

import argparse
import math
import os
import re
import subprocess
import sys

import pytest

from dropin_helpers import ROOT, subprocess_env, tensorboard_scalars, tiny_corpus, wandb_history
from megatron_spiral.training.arguments import build_parser, parse_args
from megatron_spiral.training.megatron_flags import REFUSED_DEST, megatron_lm_flags
from megatron_spiral.training.megatron_lm_flags import MEGATRON_LM_DEFAULTS

SCRIPT = os.path.join(ROOT, "pretrain_spiral.py")
MOCK = ["--preset", "tiny", "--mock-data"]

# Flags whose default here differs from Megatron-LM's on purpose (docs/megatron_flags.md says why).
DEFAULT_EXCEPTIONS = {
    "--micro-batch-size": "Megatron-LM has none (required); 4 here",
    "--lr": "Megatron-LM has none (required); 3e-4 here",
    "--train-iters": "None in both; 100 is used when neither --train-iters nor --train-samples is given",
    "--tokenizer-type": "Megatron-LM has none (required); HuggingFaceTokenizer here",
    "--distributed-backend": "None here means nccl with a GPU, gloo without (Megatron-LM: nccl)",
    "--transformer-impl": "the model's own choice (TE when it imports, else local)",
}


def _parse(argv):
    return build_parser().parse_args(argv)


def test_every_megatron_lm_flag_is_honoured_or_refused_with_a_reason():
    """Megatron-LM's 651 pretrain_gpt.py flags: none is 'unrecognized', each refused one says why."""
    from megatron_spiral.training.megatron_flags import refused_flags_message

    parser = build_parser()
    honoured = refused = 0
    for group, aliases, takes_value in megatron_lm_flags():
        for flag in aliases:
            action = parser._option_string_actions.get(flag)
            assert action is not None, f"{flag} (Megatron-LM group {group!r}) is unknown to pretrain_spiral.py"
            if action.dest != REFUSED_DEST:
                honoured += 1
                continue
            refused += 1
            message = refused_flags_message(parser.parse_args(MOCK + [flag] + (["1"] if takes_value else [])))
            assert message and f"{flag}: " in message and len(message.split(f"{flag}: ")[1]) > 10, flag
    assert honoured >= 90 and refused > 400


def test_refusals_name_every_refused_flag_and_what_to_do(capsys):
    with pytest.raises(SystemExit):
        parse_args(MOCK + ["--num-experts", "8", "--rampup-batch-size", "16", "16", "100", "--context-parallel-size", "2"])
    err = capsys.readouterr().err
    assert "--num-experts: mixture-of-experts layers are not implemented" in err
    assert "--rampup-batch-size: batch-size ramp-up is not implemented; use a constant --global-batch-size" in err
    assert "--context-parallel-size: context parallelism" in err and "unrecognized" not in err


@pytest.mark.parametrize("argv, message", [
    (["--pipeline-model-parallel-size", "2"], "pipeline parallelism is not supported for looped models"),
    (["--dataloader-type", "external"], "--dataloader-type external"),
    (["--dataloader-type", "cyclic"], "use single"),
    (["--optimizer", "muon"], "use adam or sgd"),
    (["--distributed-backend", "nccl"], "use --distributed-backend gloo"),
    (["--train-iters", "4", "--train-samples", "16"], "exclude each other"),
    (["--train-samples", "16", "--lr-decay-iters", "4"], "takes the *-samples flags"),
    (["--train-iters", "4", "--lr-warmup-samples", "4"], "takes the *-iters flags"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"], "excludes --lr-warmup-iters"),
    (["--overlap-param-gather"], "needs --use-distributed-optimizer and --overlap-grad-reduce"),
    (["--fp16", "--bf16"], "exclude each other"),
])
def test_flag_values_megatron_lm_refuses_or_we_cannot_honour(argv, message, capsys):
    pytest.importorskip("torch")
    import torch

    if "nccl" in argv and torch.cuda.is_available():
        pytest.skip("nccl is fine with a GPU")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(MOCK + argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_pipeline_size_one_is_accepted():
    assert parse_args(MOCK + ["--pipeline-model-parallel-size", "1"]).parallel.pipeline_model_parallel_size == 1


def test_defaults_are_megatron_lms():
    """Each flag Megatron-LM also has defaults to Megatron-LM's value (its parser's default)."""
    import dataclasses

    from megatron_spiral.config import SpiralConfig

    model_fields = {f.name for f in dataclasses.fields(SpiralConfig)}
    parser = build_parser()
    wrong = {}
    for flag, megatron_default in MEGATRON_LM_DEFAULTS.items():
        action = parser._option_string_actions.get(flag)
        if action is None or action.dest == REFUSED_DEST or flag in DEFAULT_EXCEPTIONS:
            continue
        if action.dest in model_fields:
            continue  # model flags default to the --preset's values (None: not given)
        ours = action.default
        if action.nargs == 0 and not ours and not megatron_default:
            continue  # an unset switch: False here, None or False there
        if ours != megatron_default:
            if isinstance(ours, (int, float)) and isinstance(megatron_default, (int, float)) \
                    and math.isclose(ours, megatron_default):
                continue
            wrong[flag] = (ours, megatron_default)
    assert not wrong, f"defaults differ from Megatron-LM's (ours, Megatron-LM's): {wrong}"


def test_named_megatron_defaults():
    """The ones a GPT user notices first (Megatron-LM core_v0.16.1 arguments.py / training_config.py)."""
    run = parse_args(MOCK)
    o, t = run.optim, run.train
    assert (o.lr_decay_style, o.min_lr, o.adam_beta2, o.weight_decay, o.clip_grad, o.lr_warmup_fraction) == \
        ("linear", 0.0, 0.999, 0.01, 1.0, None)
    assert (t.eval_iters, t.eval_interval, t.log_interval, run.parallel.seed, run.log.tensorboard_log_interval) == \
        (100, None, 100, 1234, 1)
    assert run.parallel.distributed_timeout_minutes == 10 and t.exit_signal == "SIGTERM"


def test_split_defaults_to_megatron_legacy_value_with_data_path(capsys):
    from megatron_spiral.training.arguments import resolve_split

    assert resolve_split(None, ["prefix"]) == "969, 30, 1"
    assert "Please specify --split when using --data-path" in capsys.readouterr().err
    assert resolve_split("98,2,0", ["prefix"]) == "98,2,0"


def test_no_prefix_matching():
    """Megatron-LM builds its parser with allow_abbrev=False: --exit-signal is its own flag and an
    abbreviation is an error, never another flag."""
    args = _parse(MOCK + ["--exit-signal", "SIGUSR1"])
    assert args.exit_signal == "SIGUSR1" and args.exit_signal_handler is False
    with pytest.raises(SystemExit):
        _parse(MOCK + ["--exit-signal-h"])
    with pytest.raises(SystemExit):
        _parse(MOCK + ["--train-it", "5"])


def test_help_shows_each_default_once():
    text = build_parser().format_help()
    assert "(default: None) (default: None)" not in text
    assert not re.search(r"\(default: [^)]*\)\s*\(default:", text)
    assert "(default: linear)" in text and "(default: 0.999)" in text


def test_schedule_lengths_follow_megatron():
    """get_optimizer_param_scheduler: iteration-based lengths are iterations x global batch, the
    warmup fraction is of the decay length; sample-based ones are the *-samples values."""
    from megatron_spiral.training.setup import resolve_train_iters, schedule_steps

    run = parse_args(MOCK + ["--train-iters", "100", "--lr-decay-iters", "80", "--lr-warmup-fraction", "0.1",
                             "--lr-wsd-decay-iters", "20"])
    assert schedule_steps(run.optim, run.train, 8) == {
        "lr_warmup_steps": 0.1 * 640, "lr_decay_steps": 640, "wd_incr_steps": 800, "wsd_decay_steps": 160}
    run = parse_args(MOCK + ["--train-samples", "1000", "--lr-decay-samples", "900", "--lr-warmup-samples", "50",
                             "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "100"])
    assert schedule_steps(run.optim, run.train, 8) == {
        "lr_warmup_steps": 50, "lr_decay_steps": 900, "wd_incr_steps": 1000, "wsd_decay_steps": 100}
    assert resolve_train_iters(run.train, 8) == 125                     # 1000 // 8, as update_train_iters


def test_log_line_is_megatrons_format():
    """training_log's string for fixed figures, written out from Megatron-LM's format strings."""
    from megatron_spiral.training.logger import IterationStats, megatron_log_line

    stats = IterationStats(loss=2.5, skipped=False, nan=False, learning_rate=1.5e-4, loss_scale=1.0,
                           grad_norm=0.123456, params_norm=12.5)
    line = megatron_log_line("2026-01-02 03:04:05.678901", 20, 100, 80, 123.456, 1.25, stats, 4, 2.5, 0, 1)
    assert line == (" [2026-01-02 03:04:05.678901] iteration       20/     100 | consumed samples:           80 |"
                    " elapsed time per iteration (ms): 123.5 | throughput per GPU (TFLOP/s/GPU): 1.2 |"
                    " learning rate: 1.500000E-04 | global batch size:     4 | lm loss: 2.500000E+00 |"
                    " loss scale: 1.0 | grad norm: 0.123 | params norm: 12.500 |"
                    " number of skipped iterations:   0 | number of nan iterations:   1 |")
    bare = megatron_log_line("t", 1, 2, 4, 1.0, None, IterationStats(float("nan"), True, True, 0.0, 1.0), 4,
                             float("nan"), 1, 1)
    assert "throughput" not in bare and "lm loss" not in bare and "grad norm" not in bare


# --- the Pythia-style launch line (needs the model, checkpoint and recompute branches merged) ---

# Megatron-LM flags honoured by other branches: model (B), checkpoint (D), recompute (E).
OTHER_BRANCHES = {
    "model": ["--num-layers", "--max-position-embeddings", "--position-embedding-type",
              "--untie-embeddings-and-output-weights", "--attention-dropout", "--hidden-dropout",
              "--norm-epsilon", "--use-flash-attn"],
    "checkpoint": ["--ckpt-format"],  # and the fresh --save X --load X start
    "recompute": ["--recompute-activations"],
}


def pythia_line(tmp_path, corpus):
    """Pythia-160M's GPT-NeoX recipe as Megatron-LM flags (tiny dims, CPU, gloo)."""
    ckpt, tb, wandb_dir = tmp_path / "ckpt", tmp_path / "tb", tmp_path / "wandb"
    return [
        # model (Pythia: rotary 25%, untied, no dropout, LayerNorm 1e-5)
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--position-embedding-type", "rope", "--rotary-percent", "0.25",
        "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0",
        "--norm-epsilon", "1e-5", "--init-method-std", "0.02", "--use-flash-attn", "--recompute-activations",
        # schedule: GPT-3 style --lr-decay-iters < --train-iters, 1-iteration warmup from --lr-warmup-init
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "8", "--lr-decay-iters", "6",
        "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--lr-warmup-init", "1e-5", "--optimizer", "adam", "--weight-decay", "0.01", "--adam-beta1", "0.9",
        "--adam-beta2", "0.95", "--adam-eps", "1e-8", "--clip-grad", "1.0",
        "--fp16", "--initial-loss-scale", "4096", "--loss-scale-window", "1000", "--hysteresis", "2",
        "--min-loss-scale", "1",
        # parallelism
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1", "--distributed-backend", "gloo",
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
        # data
        "--data-path", corpus[0], "--split", "90,5,5", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", corpus[1], "--dataloader-type", "single", "--seed", "1234",
        # checkpoints and exits
        "--save", str(ckpt), "--load", str(ckpt), "--ckpt-format", "torch_dist", "--save-interval", "4",
        "--exit-interval", "5", "--exit-signal-handler", "--exit-signal", "SIGTERM", "--manual-gc",
        "--manual-gc-interval", "2",
        # logging
        "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1", "--log-throughput", "--log-params-norm",
        "--tensorboard-dir", str(tb), "--tensorboard-log-interval", "1", "--log-timers-to-tensorboard",
        "--log-validation-ppl-to-tensorboard", "--wandb-project", "spiral", "--wandb-exp-name", "t",
        "--wandb-save-dir", str(wandb_dir),
    ]


LOG_FIELDS = ["iteration", "consumed samples", "elapsed time per iteration (ms)",
              "throughput per GPU (TFLOP/s/GPU)", "learning rate", "global batch size", "lm loss", "loss scale",
              "grad norm", "params norm", "number of skipped iterations", "number of nan iterations",
              "tokens per second"]


def _fields(line):
    """Field names of a log line, in order ('iteration        3/       8' -> 'iteration')."""
    names = [part.split(":")[0].strip() for part in line.split("] ", 1)[1].split("|") if part.strip()]
    return ["iteration" if name.startswith("iteration") else name for name in names]


def _launch(line, wandb_mode="offline"):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return subprocess.run([torchrun, "--nproc_per_node=2", SCRIPT, *line], capture_output=True, text=True,
                          env=subprocess_env(WANDB_MODE=wandb_mode, WANDB_SILENT="true"), timeout=600)


def _cosine_lr(iteration, lr=1e-3, min_lr=1e-4, init=1e-5, gbs=4, warmup_iters=1, decay_iters=6):
    """Megatron-LM's OptimizerParamScheduler.get_lr after ``iteration`` steps (by hand)."""
    steps, warmup, decay = iteration * gbs, warmup_iters * gbs, decay_iters * gbs
    if steps <= warmup:
        return init + (lr - init) * steps / warmup
    if steps > decay:
        return min_lr
    ratio = (steps - warmup) / (decay - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (lr - min_lr)


def assert_non_looped_gpt(stdout):
    """--num-layers 2 without a layout is a plain 2-layer GPT; the model log line says so."""
    model_line = next(l for l in stdout.splitlines() if l.startswith(" > model:"))
    assert "x{" not in model_line and re.search(r"layout=2\b", model_line), model_line


def test_pythia_style_megatron_launch_line_fresh_exit_and_resume(tmp_path):
    corpus = tiny_corpus(str(tmp_path / "corpus"))
    line = pythia_line(tmp_path, corpus)
    first = _launch(line)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "exit interval 5 reached" in first.stdout
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    second = _launch(line)                                        # the same line resumes
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = first.stdout + second.stdout
    assert "loaded checkpoint" in second.stdout and "at iteration 5" in second.stdout
    assert_non_looped_gpt(second.stdout)

    log_lines = [l for l in out.splitlines() if re.match(r" \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\] iteration", l)]
    assert [int(re.search(r"iteration +(\d+)/", l).group(1)) for l in log_lines] == list(range(1, 9))
    for l in log_lines:
        assert _fields(l) == LOG_FIELDS, l
    lrs = {int(re.search(r"iteration +(\d+)/", l).group(1)): float(re.search(r"learning rate: (\S+)", l).group(1))
           for l in log_lines}
    for it, lr in lrs.items():
        assert lr == pytest.approx(_cosine_lr(it), rel=1e-5), (it, lr)
    assert lrs[6] == lrs[7] == lrs[8] == pytest.approx(1e-4)      # at --min-lr from --lr-decay-iters on
    assert "validation loss at iteration 4 |" in first.stdout
    assert "validation loss at iteration 8 on validation set |" in second.stdout
    assert "validation loss at iteration 8 on test set |" in second.stdout
    assert "on validation set" not in first.stdout              # an early exit is not evaluated (Megatron-LM)

    scalars = tensorboard_scalars(tmp_path / "tb")
    for tag in ("lm loss", "lm loss vs samples", "learning-rate", "learning-rate vs samples", "batch-size",
                "loss-scale", "grad-norm", "params-norm", "iteration-time", "throughput"):
        steps = sorted({s for s, _ in scalars.get(tag, [])})
        if tag.endswith("vs samples"):
            assert steps == [4 * i for i in range(1, 9)], (tag, steps)
        else:
            assert steps == list(range(1, 9)), (tag, steps)
    assert {s for s, _ in scalars["lm loss validation"]} == {4, 8}
    assert "lm loss validation ppl" in scalars

    rows = [r for r in wandb_history(tmp_path / "wandb") if "lm loss" in r]
    assert len(rows) >= 3 and all(math.isfinite(r["lm loss"]) for r in rows)


def test_flag_table_page_is_in_sync():
    """docs/megatron_flags.md is generated from the parser; regenerate it after adding a flag."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from megatron_flags_doc import PAGE, render

    assert open(PAGE).read() == render(), "run: python tools/megatron_flags_doc.py"


def test_eval_iters_zero_skips_evaluation(tmp_path):
    """--eval-iters 0: no validation or test block at all (not a fake 0.0 loss)."""
    proc = subprocess.run([sys.executable, SCRIPT, *MOCK, "--seq-length", "32", "--micro-batch-size", "2",
                           "--train-iters", "2", "--log-interval", "1", "--eval-interval", "1", "--eval-iters", "0"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation loss" not in proc.stdout and "lm loss value" not in proc.stdout
    assert " iteration        2/       2 |" in proc.stdout


def test_exit_signal_by_name():
    """--exit-signal takes Megatron-LM's signal names; the handler records only that signal."""
    import signal as signal_module

    from megatron_spiral.training.signals import ExitSignalHandler, parse_signal

    assert parse_signal("SIGUSR1") is parse_signal("USR1") is parse_signal(10) is signal_module.SIGUSR1
    handler = ExitSignalHandler("SIGUSR1")
    try:
        os.kill(os.getpid(), signal_module.SIGUSR1)
        assert handler.received
    finally:
        handler.restore()
    assert signal_module.getsignal(signal_module.SIGUSR1) is signal_module.SIG_DFL
