"""What a checkpoint merge calls as it goes, for whoever wants to watch or interfere: the
merge loops call `after_tensor` once a tensor (or a rank's part of one) is written, and
nothing else. The default does nothing.

`FaultInjection` is for tests that run the `modkern merge` command in a subprocess (or
under torchrun) and must slow a merge down or make one rank fail at a known point; the
command installs it, from the environment, only when one of its variables is set.
"""

from __future__ import annotations

import os
import signal
import time

from ..errors import CheckpointError

# Seconds to sleep after writing each tensor (lets a test kill a merge mid-way).
WRITE_DELAY_ENV = "MODKERN_TEST_WRITE_DELAY"
# "RANK:raise", "RANK:kill" or "RANK:hang": that rank fails (or stops) after writing its
# first tensor.
DIST_FAIL_ENV = "MODKERN_TEST_DIST_FAIL"


class MergeHooks:
    """Called by the merge loops; subclass and override. The base class does nothing."""

    def after_tensor(self, rank: int, done: int) -> None:
        """Rank `rank` (0 in a single-process merge) has written `done` tensors (or parts
        of split tensors) so far."""


NO_HOOKS = MergeHooks()


class FaultInjection(MergeHooks):
    """Test-only: sleep `delay` seconds after each tensor; on rank `fail_rank`, after its
    first tensor, `fail` ("raise", "kill" or "hang")."""

    def __init__(self, delay: float = 0.0, fail_rank: int | None = None, fail: str = ""):
        self.delay, self.fail_rank, self.fail = delay, fail_rank, fail

    def after_tensor(self, rank: int, done: int) -> None:
        if self.delay:
            time.sleep(self.delay)
        if rank == self.fail_rank and done == 1:
            if self.fail == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.fail == "hang":  # a rank stuck (e.g. on a dead disk): the others time out
                time.sleep(3600)
            raise CheckpointError(f"test failure injected by {DIST_FAIL_ENV}")


def hooks_from_environment() -> MergeHooks:
    """FaultInjection when a test set MODKERN_TEST_WRITE_DELAY or MODKERN_TEST_DIST_FAIL,
    else NO_HOOKS."""
    delay = float(os.environ.get(WRITE_DELAY_ENV, "0") or 0)
    rank, _, how = os.environ.get(DIST_FAIL_ENV, "").partition(":")
    if not delay and not how:
        return NO_HOOKS
    return FaultInjection(delay, int(rank) if how else None, how)
