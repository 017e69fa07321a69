"""Checkpoint layout shared by training, conversion and analysis tools (Megatron's layout).

    SAVE_DIR/
      latest_checkpointed_iteration.txt      "100"  (written last, atomically)
      iter_0000100/                          megatron.core.dist_checkpointing directory
        spiral_config.json                   {"model": SpiralConfig fields, "tokenizer": {...}|null,
                                              "iteration": 100, "tensor_model_parallel_size": 2}
        tokenizer/                           tokenizer files, when training knew its tokenizer
        common.pt, *.distcp, metadata.json   dist_checkpointing payload; the sharded state dict
                                             is {"model": GPTModel.sharded_state_dict(), ...}

        checksums.json                       size + CRC-32 of every other file, verified at load

Any TP size can load a checkpoint saved at any other TP size (dist_checkpointing reshards).
Every publish step is atomic, so a kill at any instant leaves the previous state loadable: a
checkpoint is written under ``.tmp_iter_*`` and renamed into place only when complete (with its
checksums); re-saving an existing iteration first renames the old directory aside
(``.old_iter_*``, restored by ``resolve_checkpoint`` if the kill came between the two renames) and
never deletes it before the new one is in place; the tracker is replaced atomically, last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from typing import Callable, List, Optional, Tuple

from megatron_spiral.diskspace import disk_full_error, free_bytes, is_disk_full

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "spiral_config.json"
TOKENIZER_DIR = "tokenizer"
CHECKSUM_FILE = "checksums.json"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incomplete; the message names the file."""


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def staging_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f".tmp_iter_{iteration:07d}")


def aside_dir(save_dir: str, iteration: int) -> str:
    """Where a re-save moves the previous ``iter_*`` while the new one is renamed into place."""
    return os.path.join(save_dir, f".old_iter_{iteration:07d}")


def _fsync_dir(directory: str) -> None:
    """Make renames inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_tracker(load_dir: str) -> int:
    """Iteration named by ``latest_checkpointed_iteration.txt``."""
    path = os.path.join(load_dir, TRACKER_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint tracker {path}; is --load a directory written by --save?")
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"corrupt tracker file {path}: expected an iteration number, got {text!r}")
    return int(text)


def write_tracker(save_dir: str, iteration: int) -> None:
    """Atomic replace: readers see the old or the new iteration, never a partial file."""
    path = os.path.join(save_dir, TRACKER_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(save_dir)


def resolve_checkpoint(path: str) -> Tuple[str, int]:
    """Accept a save directory (with a tracker) or an ``iter_*`` directory; return (dir, iteration)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if os.path.isfile(os.path.join(path, TRACKER_FILE)):
        iteration = read_tracker(path)
        ckpt = iteration_dir(path, iteration)
        restore_aside(path, iteration)
        if not os.path.isdir(ckpt):
            raise CheckpointError(
                f"{os.path.join(path, TRACKER_FILE)} points at iteration {iteration} but {ckpt} is missing")
        return ckpt, iteration
    config_path = os.path.join(path, CONFIG_FILE)
    if os.path.isfile(config_path):
        return path, int(read_metadata(path).get("iteration", 0))
    raise CheckpointError(
        f"{path} is neither a save directory (no {TRACKER_FILE}) nor a checkpoint (no {CONFIG_FILE})")


def write_metadata(ckpt_dir: str, model_config: dict, iteration: int, tokenizer: Optional[dict] = None,
                   **extra) -> None:
    payload = {"model": model_config, "tokenizer": tokenizer, "iteration": iteration, **extra}
    with open(os.path.join(ckpt_dir, CONFIG_FILE), "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)


def read_metadata(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {CONFIG_FILE}; it is incomplete") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"corrupt {path}: {err}") from None


def load_spiral_config(ckpt_dir: str):
    from megatron_spiral.config import SpiralConfig

    return SpiralConfig.from_dict(read_metadata(ckpt_dir)["model"])  # old metadata: old recipe


def check_complete(ckpt_dir: str) -> None:
    """Fail with the missing file's name if the dist_checkpointing payload is incomplete."""
    for name in ("metadata.json", "common.pt", ".metadata"):
        if not os.path.isfile(os.path.join(ckpt_dir, name)):
            raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {name} is missing")


def restore_aside(save_dir: str, iteration: int) -> bool:
    """Undo a re-save that was killed between its two renames; True when something was restored."""
    final, old = iteration_dir(save_dir, iteration), aside_dir(save_dir, iteration)
    if os.path.isdir(old) and not os.path.isdir(final):
        os.replace(old, final)
        _fsync_dir(save_dir)
        return True
    return False


def publish(staging: str, final: str) -> None:
    """Move a fully written checkpoint into place. An existing one of the same name is renamed
    aside first and deleted only once the new one is in place: at every instant one of the two
    is loadable under a name ``resolve_checkpoint`` finds."""
    save_dir = os.path.dirname(final)
    match = _ITER_RE.match(os.path.basename(final))
    old = aside_dir(save_dir, int(match.group(1))) if match else final + ".old"
    if os.path.isdir(final):
        if os.path.isdir(old):
            shutil.rmtree(old)  # a previous aside copy whose replacement was published
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_dir(save_dir)
    if os.path.isdir(old):
        shutil.rmtree(old)


def remove_leftovers(save_dir: str) -> List[str]:
    """Delete staging directories of interrupted saves (call with the save lock held)."""
    removed = []
    if not os.path.isdir(save_dir):
        return removed
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if name.startswith(".tmp_iter_") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif name.startswith(".old_iter_") and os.path.isdir(path):
            final = os.path.join(save_dir, name[len(".old_"):])
            if os.path.isdir(final):  # its replacement was published
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            else:
                restore_aside(save_dir, int(name[len(".old_iter_"):]))
    return removed


def iteration_dirs(save_dir: str) -> List[Tuple[int, str]]:
    """Published ``iter_*`` directories of a save directory, newest first."""
    found = []
    if os.path.isdir(save_dir):
        for name in os.listdir(save_dir):
            match = _ITER_RE.match(name)
            if match and os.path.isdir(os.path.join(save_dir, name)):
                found.append((int(match.group(1)), os.path.join(save_dir, name)))
    return sorted(found, reverse=True)


# --------------------------------------------------------------------------- checksums
def _crc32(path: str, block: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            if not data:
                return crc
            crc = zlib.crc32(data, crc)


def _payload_files(ckpt_dir: str) -> List[str]:
    files = []
    for root, _, names in os.walk(ckpt_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), ckpt_dir)
            if rel != CHECKSUM_FILE:
                files.append(rel)
    return sorted(files)


def write_checksums(ckpt_dir: str) -> None:
    """Record size and CRC-32 of every file of a (staged) checkpoint."""
    table = {}
    for rel in _payload_files(ckpt_dir):
        path = os.path.join(ckpt_dir, rel)
        table[rel] = {"size": os.path.getsize(path), "crc32": _crc32(path)}
    with open(os.path.join(ckpt_dir, CHECKSUM_FILE), "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def verify_checksums(ckpt_dir: str) -> bool:
    """Raise CheckpointError naming the first missing, truncated or corrupt file.

    Returns False when the checkpoint predates checksums (nothing to verify against)."""
    path = os.path.join(ckpt_dir, CHECKSUM_FILE)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"corrupt {path}: {err}") from None
    for rel, want in sorted(table.items()):
        file = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {rel} is missing")
        size = os.path.getsize(file)
        if size != want["size"]:
            raise CheckpointError(
                f"corrupt checkpoint file {file}: {size} bytes, {want['size']} were saved (truncated or "
                "overwritten); load an older checkpoint (--ckpt-fallback picks the newest intact one)")
        if _crc32(file) != want["crc32"]:
            raise CheckpointError(
                f"corrupt checkpoint file {file}: its CRC-32 differs from the one saved in {CHECKSUM_FILE}; "
                "load an older checkpoint (--ckpt-fallback picks the newest intact one)")
    return True


def check_intact(ckpt_dir: str) -> bool:
    """check_complete + verify_checksums; returns whether checksums were verified."""
    check_complete(ckpt_dir)
    read_metadata(ckpt_dir)
    return verify_checksums(ckpt_dir)


def resolve_with_fallback(load_dir: str, log: Callable[[str], None] = print) -> Tuple[str, int]:
    """The tracker's checkpoint if intact, else the newest intact older ``iter_*`` (said in the log).

    Raises the tracker checkpoint's CheckpointError when no intact checkpoint exists."""
    first_error = None
    try:
        ckpt, iteration = resolve_checkpoint(load_dir)
        check_intact(ckpt)
        return ckpt, iteration
    except CheckpointError as err:
        first_error = err
    tracked = None
    try:
        tracked = read_tracker(load_dir)
    except CheckpointError:
        pass
    for iteration, ckpt in iteration_dirs(load_dir):
        if tracked is not None and iteration >= tracked:
            continue
        try:
            check_intact(ckpt)
        except CheckpointError as err:
            log(f" > --ckpt-fallback: skipping {ckpt}: {err}")
            continue
        log(f" > --ckpt-fallback: {first_error}; falling back to the newest intact checkpoint {ckpt}")
        return ckpt, iteration
    raise first_error


def load_model_weights(gpt_model, ckpt_dir: str) -> None:
    """Load only the model weights of a checkpoint into ``gpt_model`` (any TP layout)."""
    from megatron.core import dist_checkpointing

    check_complete(ckpt_dir)
    try:
        state = dist_checkpointing.load({"model": gpt_model.sharded_state_dict()}, ckpt_dir)
    except Exception as err:  # dist_checkpointing raises many types; name the checkpoint
        raise CheckpointError(f"could not load model weights from {ckpt_dir}: {err}") from err
    gpt_model.load_state_dict(state["model"])


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _is_writer() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def tokenizer_metadata(tokenizer) -> dict:
    """What a checkpoint records of its tokenizer; ``sha256`` fingerprints the vocabulary."""
    ident = dict(getattr(tokenizer, "unique_identifiers", {}) or {})
    return {"type": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod,
            "pad": tokenizer.pad, "sha256": ident.get("sha256"), "directory": TOKENIZER_DIR}


def _state_bytes(sharded_state_dict) -> int:
    """Bytes of the tensors this save writes, summed over ranks (an estimate of the disk needed)."""
    import torch
    import torch.distributed as dist

    total = 0
    stack = [sharded_state_dict]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        else:
            data = getattr(item, "data", item)
            replica = getattr(item, "replica_id", 0)
            is_main = replica == 0 or (isinstance(replica, tuple) and all(r == 0 for r in replica))
            if torch.is_tensor(data) and is_main:
                total += data.numel() * data.element_size()
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        value = torch.tensor([total], dtype=torch.float64, device=device)
        dist.all_reduce(value)
        total = int(value.item())
    return total


def _die_with_parent() -> None:
    """Process initializer (Linux): get SIGKILL when the parent dies, however it dies."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_WRITER_MANAGER = []  # keeps our Manager alive for the process's lifetime


def _writer_queue_dies_with_us() -> None:
    """dist_checkpointing's file writer creates, on the first save, a multiprocessing Manager whose
    server process outlives a SIGKILLed trainer (found left behind after kill -9). Give it one we
    started with PDEATHSIG instead, in the context megatron-core would use."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fs_async

    if fs_async._results_queue is not None:
        return
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=fs_async.mp.get_context("spawn"))
    manager.start(initializer=_die_with_parent)
    _WRITER_MANAGER.append(manager)
    fs_async._results_queue = manager.Queue()


def save_sharded_checkpoint(save_dir: str, iteration: int, sharded_state_dict: dict, model_config: dict,
                            tokenizer=None, **metadata) -> str:
    """Save ``sharded_state_dict`` (at least {"model": ...}) as ``iter_{iteration}`` atomically.

    All ranks call this. ``tokenizer`` (optional, a megatron_spiral.tokenizer.SpiralTokenizer)
    writes its Hugging Face files into ``iter_*/tokenizer``. Returns the final directory.
    """
    from megatron.core import dist_checkpointing

    staging, final = staging_dir(save_dir, iteration), iteration_dir(save_dir, iteration)
    if _is_writer():
        os.makedirs(save_dir, exist_ok=True)
        if os.path.isdir(staging):
            shutil.rmtree(staging)  # leftovers of a crashed save
        os.makedirs(staging)
    _barrier()
    needed = _state_bytes(sharded_state_dict)
    free = free_bytes(save_dir)
    if free is not None and needed > free:  # every rank sees the same totals: all refuse together
        raise disk_full_error("saving checkpoint iteration " + str(iteration), save_dir, needed, "--save")
    _writer_queue_dies_with_us()
    try:
        dist_checkpointing.save(sharded_state_dict, staging)
    except BaseException as err:
        if _is_writer():
            shutil.rmtree(staging, ignore_errors=True)  # leave nothing half-written
        if is_disk_full(err):
            raise disk_full_error("saving checkpoint iteration " + str(iteration), save_dir, needed,
                                  "--save") from err
        raise
    _barrier()
    if _is_writer():
        tokenizer_meta = None
        if tokenizer is not None:
            tokenizer.save_hf(os.path.join(staging, TOKENIZER_DIR))
            tokenizer_meta = tokenizer_metadata(tokenizer)
        write_metadata(staging, model_config, iteration, tokenizer_meta, **metadata)
        write_checksums(staging)
        publish(staging, final)
        write_tracker(save_dir, iteration)
    _barrier()
    return final
