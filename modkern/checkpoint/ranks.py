"""The ranks of a distributed checkpoint merge: the process group with the few collectives
the merge needs (on CPU tensors, gloo), and how the ranks agree on success or on the first
failure, so that every rank raises the same error."""

from __future__ import annotations

import re
import traceback
from datetime import timedelta

import torch

from .. import errors
from ..errors import CheckpointError, ModkernError


class DistributedMergeError(CheckpointError):
    """Raised on every rank when one rank's part of the merge failed. `rank` is the rank
    that failed; `origin` its exception class name. When that was a modkern error (e.g.
    NonFiniteError), the exception raised is also an instance of that class."""

    def __init__(self, message: str, rank: int, origin: str):
        super().__init__(message)
        self.rank, self.origin = rank, origin


AGREED_CLASSES: dict[str, type] = {}


def agreed_error(message: str, rank: int, origin: str) -> DistributedMergeError:
    """A DistributedMergeError that is also the failing rank's modkern error class."""
    cls = getattr(errors, origin, None)
    if not (isinstance(cls, type) and issubclass(cls, ModkernError)) or \
            issubclass(DistributedMergeError, cls):
        return DistributedMergeError(message, rank, origin)
    if origin not in AGREED_CLASSES:
        AGREED_CLASSES[origin] = type(origin, (DistributedMergeError, cls),
                                       {"__module__": __name__})
    return AGREED_CLASSES[origin](message, rank, origin)


class PeerLostError(CheckpointError):
    """A collective failed on this rank: another rank died, or the timeout passed."""


class Group:
    """The process group and the few collectives the merge needs, on CPU tensors (gloo).
    A collective that fails (a rank died, or the timeout passed) raises PeerLostError."""

    def __init__(self, timeout_s: float):
        import torch.distributed as dist

        self.dist = dist
        if not dist.is_available():
            raise CheckpointError("torch.distributed is not available in this torch build")
        self.created = not dist.is_initialized()
        if self.created:
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        self.group = None if dist.get_backend() == "gloo" else \
            dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def _call(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, group=self.group, **kw)
        except RuntimeError as err:  # gloo: connection closed / timed out
            first = first_sentence(str(err)) or type(err).__name__
            raise PeerLostError(f"rank {self.rank}: lost contact with the other ranks while "
                                f"{what} ({first}); another rank failed, was killed or did "
                                "not answer in time: the merge is abandoned, OUT not "
                                "written") from None

    def gather(self, obj, what: str) -> list:
        out = [None] * self.world
        self._call(what, self.dist.all_gather_object, out, obj)
        return out

    def reduce_max(self, t: torch.Tensor, what: str) -> torch.Tensor:
        self._call(what, self.dist.all_reduce, t, op=self.dist.ReduceOp.MAX)
        return t

    def close(self) -> None:
        if self.created and self.dist.is_initialized():
            self.dist.destroy_process_group()


def first_sentence(text: str) -> str:
    """'[.../pair.cc:553] Connection closed by peer [addr]. This is ...' -> 'Connection
    closed by peer [addr]' (gloo's messages are long)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)
    return line.split(". ")[0].rstrip(".")


def describe(err: BaseException) -> tuple[str, str]:
    if isinstance(err, DistributedMergeError):
        return err.origin, str(err)
    if isinstance(err, KeyboardInterrupt):
        return "KeyboardInterrupt", "interrupted"
    if isinstance(err, ModkernError):
        return type(err).__name__, str(err)
    return type(err).__name__, f"{type(err).__name__}: {err}"


def agree(group: Group, err: BaseException | None, what: str, extra=None) -> list:
    """Every rank says whether its step succeeded; if any failed, every rank raises the
    first failing rank's error. Returns every rank's `extra` otherwise."""
    mine = None if err is None else describe(err)
    if err is not None and not isinstance(err, (ModkernError, KeyboardInterrupt,
                                                OtherRankFailed)):
        traceback.print_exception(err)  # not bad input: a bug or an OS error, keep its trace
    said = group.gather((mine, extra), what)
    failed = [(rank, f) for rank, (f, _) in enumerate(said) if f is not None]
    # A rank that only learnt of another's failure (a split tensor's all_reduce) defers.
    failed.sort(key=lambda rf: (rf[1][0] == OtherRankFailed.__name__, rf[0]))
    for rank, (origin, message) in failed[:1]:
        if origin == "KeyboardInterrupt":
            message = f"rank {rank} was interrupted"
        elif not message.startswith("rank "):
            message = f"rank {rank}: {message}"
        raise agreed_error(message, rank, origin)
    return [e for _, e in said]


class OtherRankFailed(Exception):
    """This rank is fine but another failed; the agreement that follows names which."""
