#!/usr/bin/env python
"""Kill a tiny training run with SIGKILL at random instants (many during saves), resume it each
time with the same --save X --load X line, and compare every checkpoint it wrote with those of an
uninterrupted run (model, optimizer state, schedule, RNG: every tensor and value, bitwise).

    python tools/kill_resume_check.py --kills 20 --workdir /tmp/kill_check

Prints one line per kill (when, what the tracker named afterwards, whether it verified) and a
summary; exits 1 if any checkpoint differs from the reference or any state was unloadable.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCRIPT = os.path.join(ROOT, "pretrain_spiral.py")


def run_line(save_dir: str, iters: int) -> list:
    return [sys.executable, SCRIPT, "--preset", "tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", str(iters), "--save-interval", "2", "--eval-interval", "4",
            "--eval-iters", "1", "--log-interval", "1", "--num-workers", "1", "--save", save_dir, "--load", save_dir]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _staging(save_dir: str) -> set:
    """(name, inode) of the save directories under way (an inode tells a new save from a leftover)."""
    try:
        names = [n for n in os.listdir(save_dir) if n.startswith((".tmp_iter_", ".old_iter_"))]
        return {(n, os.stat(os.path.join(save_dir, n)).st_ino) for n in names}
    except FileNotFoundError:
        return set()


def kill_once(save_dir: str, iters: int, during_save: bool, max_wait: float, rng: random.Random):
    """Start the run, SIGKILL it (at a random instant, or as soon as a save is under way).
    Returns (seconds after start, whether a save was under way, whether it finished first, leftovers)."""
    import psutil

    proc = subprocess.Popen(run_line(save_dir, iters), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env(), start_new_session=True)
    start = time.time()
    leftover_staging = _staging(save_dir)
    deadline = start + (max_wait if during_save else rng.uniform(0.25 * max_wait, max_wait))
    children = []
    while time.time() < deadline and proc.poll() is None:
        try:
            children = psutil.Process(proc.pid).children(recursive=True) or children
        except psutil.NoSuchProcess:
            break
        if during_save and _staging(save_dir) - leftover_staging:
            time.sleep(rng.uniform(0.0, 0.05))
            break
        time.sleep(0.005 if during_save else 0.05)
    finished = proc.poll() is not None
    saving = bool(_staging(save_dir) - leftover_staging)
    if not finished:
        proc.kill()
    proc.wait()

    def alive():
        out = []
        for c in children:
            try:
                if c.is_running() and c.status() != psutil.STATUS_ZOMBIE:
                    out.append(c.pid)
            except psutil.NoSuchProcess:
                pass
        return out

    for _ in range(150):  # loader workers notice their parent is gone within ~5 s
        if not alive():
            break
        time.sleep(0.1)
    leftovers = alive()
    return time.time() - start, saving, finished, leftovers


def state_after_kill(save_dir: str) -> str:
    """What the next launch will resume from; raises if the state is not loadable."""
    from megatron_spiral import checkpointing as layout

    if not os.path.isfile(os.path.join(save_dir, layout.TRACKER_FILE)):
        return "no tracker (fresh start)"
    ckpt, iteration = layout.resolve_checkpoint(save_dir)
    layout.check_intact(ckpt)
    return f"iter {iteration} (verified)"


def checkpoint_values(ckpt_dir: str, scratch: str) -> dict:
    """Every value of a dist_checkpointing checkpoint as a flat {key: tensor or object}."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(scratch, "flat.pt")
    dcp_to_torch_save(ckpt_dir, out)
    values = torch.load(out, weights_only=False)
    common = torch.load(os.path.join(ckpt_dir, "common.pt"), weights_only=False)
    os.remove(out)
    return {"sharded": values, "common": common}


def same(a, b) -> bool:
    import numpy as np
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    if hasattr(a, "getvalue") and hasattr(b, "getvalue"):  # BytesIO (pickled objects)
        return a.getvalue() == b.getvalue()
    return a == b


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="number of SIGKILLs")
    parser.add_argument("--during-save-fraction", type=float, default=0.5,
                        help="fraction of kills aimed at an ongoing save")
    parser.add_argument("--train-iters", type=int, default=40)
    parser.add_argument("--max-wait", type=float, default=None,
                        help="latest kill instant after a start in seconds (default: the reference run's wall time)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.workdir or tempfile.mkdtemp(prefix="kill_check_")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    ref, test = os.path.join(work, "reference"), os.path.join(work, "killed")

    began = time.time()
    done = subprocess.run(run_line(ref, args.train_iters), capture_output=True, text=True, env=_env())
    if done.returncode:
        print(done.stderr[-3000:])
        return 1
    max_wait = args.max_wait or (time.time() - began)
    print(f"reference run: {time.time() - began:.1f} s; kills fall in [{0.25 * max_wait:.1f}, {max_wait:.1f}] s "
          "after each launch (or as soon as a save is under way)", flush=True)
    unloadable, leftovers_total, kills, during = 0, 0, 0, 0
    attempts = 0
    while kills < args.kills and attempts < 3 * args.kills:
        attempts += 1
        aim = rng.random() < args.during_save_fraction
        seconds, saving, finished, leftovers = kill_once(test, args.train_iters, aim, max_wait, rng)
        if finished:
            print(f"launch {attempts:2d}: the run finished before the kill; starting over from scratch")
            shutil.rmtree(test)
            continue
        kills += 1
        during += saving
        leftovers_total += len(leftovers)
        try:
            state = state_after_kill(test)
        except Exception as err:  # noqa: BLE001 - reported, counted
            unloadable += 1
            state = f"UNLOADABLE: {err}"
        print(f"kill {kills:2d}: SIGKILL at {seconds:5.1f} s{' during a save' if saving else ''}; "
              f"next launch resumes from: {state}; processes left behind: {len(leftovers)}", flush=True)
    final = subprocess.run(run_line(test, args.train_iters), capture_output=True, text=True, env=_env())
    if final.returncode:
        print("the final resume failed:\n" + final.stderr[-3000:])
        return 1
    from megatron_spiral import checkpointing as layout

    compared, identical = 0, 0
    scratch = os.path.join(work, "scratch")
    os.makedirs(scratch, exist_ok=True)
    ref_dirs = dict(layout.iteration_dirs(ref))
    for iteration, ckpt in sorted(layout.iteration_dirs(test)):
        if iteration not in ref_dirs:
            continue
        compared += 1
        equal = same(checkpoint_values(ckpt, scratch), checkpoint_values(ref_dirs[iteration], scratch))
        identical += equal
        if not equal:
            print(f"  iter {iteration}: DIFFERS from the uninterrupted run")
    final_equal = same(checkpoint_values(layout.iteration_dir(test, args.train_iters), scratch),
                       checkpoint_values(layout.iteration_dir(ref, args.train_iters), scratch))
    print(f"summary: {kills} SIGKILLs ({during} during a save), {kills - unloadable}/{kills} left a loadable "
          f"state, {identical}/{compared} checkpoints bitwise identical to the uninterrupted run's, final "
          f"checkpoint (iter {args.train_iters}) identical: {final_equal}; processes left behind: {leftovers_total}")
    ok = unloadable == 0 and identical == compared and final_equal
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
