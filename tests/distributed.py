"""Run a test body on N gloo ranks (CPU). The body raises on failure; any failing rank fails the test."""

import os
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world_size, port, fn, args, errors):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        fn(*args)
    except BaseException:  # report every rank's failure to the parent
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def run_on_ranks(fn, world_size=2, *args):
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    codes = [p.exitcode for p in procs]
    if messages or any(c != 0 for c in codes):
        raise AssertionError(f"exit codes {codes}\n" + "\n".join(messages))
