"""torch.distributed helpers: torchrun's environment, rank-0-only I/O, small collectives, and
ending every rank when one fails."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from densecl_bench.errors import UserError

FAILURE_KEY = "densecl_bench/failure"


def init_from_env() -> bool:
    """Initialise the default process group when started by torchrun (WORLD_SIZE > 1).

    NCCL on GPU, gloo on CPU. Returns True when running distributed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def close() -> None:
    """End the process group together: a rank that tears gloo down while a peer is still talking to
    it can abort the peer ("terminate called without an active exception")."""
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_device(spec: str | None) -> torch.device:
    """`--device` as a torch.device (None: this rank's GPU, else CPU); a GPU that is not there is a user error."""
    if spec is None:
        return default_device()
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise UserError(f"--device {spec}: not a device name ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: no CUDA GPU is available here (omit --device to run on the CPU)")
    return device


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from every rank along dim 0 (identity when not distributed)."""
    if not is_dist():
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t)
    return t


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (picklable; identity when not distributed)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _failure_store() -> dist.Store:
    """A client of torchrun's rendezvous store, keyed per run attempt (a restart must not see old failures)."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=60))
    attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return dist.PrefixStore(attempt, store)


def _stopped_key(r: int) -> str:
    return f"densecl_bench/stopped/{r}"


def _watch(store: dist.Store, stop: threading.Event, poll_s: float) -> None:
    """End this process with a failed peer's message; the main thread may be blocked in a collective."""
    while not stop.wait(poll_s):
        if store.check([FAILURE_KEY]):
            message = store.get(FAILURE_KEY).decode()
            if message.startswith(f"rank {rank()} "):
                return  # this rank failed itself and is raising
            print(f"error: {message} (rank {rank()} stops too)", file=sys.stderr, flush=True)
            store.set(_stopped_key(rank()), "1")
            os._exit(1)  # no clean way out of a collective the failed rank will never join


@contextlib.contextmanager
def fail_together(poll_s: float = 0.2, grace_s: float = 10.0) -> Iterator[None]:
    """Under torchrun, if the block raises on any rank, end every rank with that rank's message.

    The failing rank writes `rank N failed: Type: message` to the rendezvous store; a watcher thread
    on every other rank sees it within `poll_s`, prints it and ends its process with exit status 1,
    even when its main thread is blocked in a collective the failed rank will never join (an
    all-reduce of a status flag cannot help there: the blocked rank never reaches it). The failing
    rank waits up to `grace_s` for the others to say so before re-raising: torchrun kills the
    remaining workers as soon as one exits, which would cut their message. A no-op in one process.
    """
    if not is_dist():
        yield
        return
    store = _failure_store()
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(store, stop, poll_s), name="fail_together", daemon=True)
    watcher.start()
    try:
        yield
    except BaseException as err:
        stop.set()
        store.set(FAILURE_KEY, f"rank {rank()} failed: {type(err).__name__}: {err}")
        store.set(_stopped_key(rank()), "1")
        with contextlib.suppress(RuntimeError):  # a peer that is already gone never answers
            store.wait([_stopped_key(r) for r in range(world_size())], timedelta(seconds=grace_s))
        raise
    finally:
        stop.set()
        watcher.join()
