"""An exclusive lock on a --save directory: two runs never write one checkpoint directory.

``SAVE_DIR/.save.lock`` is created with O_EXCL and holds the owner's host, pid, SLURM job id and a
heartbeat (its mtime, refreshed every ``HEARTBEAT_SECONDS`` by a daemon thread). A second run is
refused with the owner named. A lock is stale, and taken over, when its owner is provably gone:
same host and the pid no longer runs; the same SLURM job (a requeued job, SLURM_RESTART_COUNT higher than
the owner's); or, from another host, no heartbeat for ``STALE_SECONDS``.
Rank 0 holds the lock; the other ranks never touch the directory's bookkeeping.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from typing import Optional

from megatron_spiral.checkpointing import CheckpointError

LOCK_FILE = ".save.lock"
HEARTBEAT_SECONDS = 15.0
STALE_SECONDS = 120.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # torn or foreign content: judged by its age alone


def _restart_count(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def stale_reason(owner: dict, age_seconds: float, host: str, job: Optional[str],
                 restart: int = 0) -> Optional[str]:
    """Why a lock held by ``owner`` may be taken over, or None when its owner may still run."""
    same_host = owner.get("host") == host
    if same_host and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"]):
        return f"its process {owner['pid']} on {host} is gone"
    if job and owner.get("slurm_job_id") == job and _restart_count(owner.get("slurm_restart_count")) < restart:
        return f"it belongs to an earlier (requeued) run of SLURM job {job}"
    if age_seconds > STALE_SECONDS:
        return f"its heartbeat is {age_seconds:.0f} s old (> {STALE_SECONDS:.0f} s)"
    return None


class SaveDirLock:
    """Acquire on construction (raises CheckpointError naming the owner); ``release`` to free."""

    def __init__(self, save_dir: str, log=print) -> None:
        os.makedirs(save_dir, exist_ok=True)
        self.path = os.path.join(save_dir, LOCK_FILE)
        self.host = socket.gethostname()
        self.job = os.environ.get("SLURM_JOB_ID")
        self.restart = _restart_count(os.environ.get("SLURM_RESTART_COUNT"))
        self.owner = {"host": self.host, "pid": os.getpid(), "slurm_job_id": self.job,
                      "slurm_restart_count": self.restart, "started": time.time()}
        self._stop = threading.Event()
        self._acquire(log)
        self._thread = threading.Thread(target=self._heartbeat, name="save-lock-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.release)  # also on failures that end the process

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        return True

    def _acquire(self, log) -> None:
        for _ in range(3):  # a concurrent take-over may race us; retry a few times
            if self._try_create():
                return
            owner = _read(self.path)
            if owner is None:
                continue  # released between our two calls
            try:
                age = time.time() - os.path.getmtime(self.path)
            except FileNotFoundError:
                continue
            reason = stale_reason(owner, age, self.host, self.job, self.restart)
            if reason is None:
                raise CheckpointError(
                    f"--save directory {os.path.dirname(self.path)} is in use by another run (host "
                    f"{owner.get('host', '?')}, pid {owner.get('pid', '?')}, lock {self.path}, heartbeat "
                    f"{age:.0f} s ago). Two runs must not save to one directory: use another --save, "
                    "or stop that run. If it is dead, delete the lock file or wait "
                    f"{STALE_SECONDS:.0f} s for its heartbeat to go stale.")
            log(f" > taking over the stale save lock {self.path} (host {owner.get('host', '?')}, pid "
                f"{owner.get('pid', '?')}): {reason}")
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        raise CheckpointError(f"could not acquire the save lock {self.path}: other runs keep taking it")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Free the lock if we still own it (idempotent)."""
        self._stop.set()
        owner = _read(self.path)
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == self.host:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
