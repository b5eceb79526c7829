"""Failures on one rank reach every rank at agreed points, so a run ends with the message, never a hang.

Every rank calls `agree` at the same places (the trainer: after fetching a batch and after the
forward pass; the evaluator: before gathering). A rank that failed in between arrives there with
its exception instead of running on into the next collective; one all-reduce tells every rank that
someone failed, and the messages are exchanged. The failing rank re-raises its own exception; the
others raise `PeerFailure` quoting it. A failure *inside* a collective of the step itself (say, out
of memory during DDP's gradient all-reduce) cannot meet its peers here; torchrun then stops the other
workers when the failing one exits.
"""

from __future__ import annotations

import torch
import torch.distributed as td

from densecl_bench import dist


class PeerFailure(RuntimeError):
    """Another rank failed; the message names it and quotes its error."""


def _flag_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    if td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def agree(where: str, error: BaseException | None = None, signal: int = 0) -> int:
    """Raise on every rank if any rank brings an error; otherwise return the largest pending signal.

    where: what the ranks were doing (it goes into the message of the other ranks).
    """
    if not dist.is_dist():
        if error is not None:
            raise error
        return signal
    flags = torch.tensor([int(error is not None), signal], dtype=torch.int64, device=_flag_device())
    td.all_reduce(flags, op=td.ReduceOp.MAX)
    if flags[0]:
        messages: list[str | None] = [None] * dist.world_size()
        td.all_gather_object(messages, None if error is None else _describe(error))
        if error is not None:
            raise error
        failed = ", ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
        raise PeerFailure(f"{where}: {failed}")
    return int(flags[1])
