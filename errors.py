"""Refusals: the recipe's own errors, whose message is all a user needs, end a run with one block and status 1.

Bad configuration, unusable data, a checkpoint that cannot be resumed, a GPU that cannot run the chosen precision:
each is raised as a `RecipeError` whose message names the problem and the fix. An entrypoint prints that message
once, with no traceback, and exits with status 1; `HYDRA_FULL_ERROR=1` (Hydra's own switch) shows the traceback
as well. Anything else is a bug or an environment failure and keeps its full traceback.

Under torchrun every rank meets a shared problem (the same configuration, the same data, a checkpoint decision the
ranks agreed on), and one copy of the message is enough: rank 0 prints it. Another rank stays silent while the
launcher stops the job (it does once rank 0 has failed), and prints after all if that takes longer than
`RANK_0_GRACE_S`, so a message is never lost to a rank that fails alone.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

logger = logging.getLogger(__name__)

TRACEBACK_ENV = "HYDRA_FULL_ERROR"
RANK_0_GRACE_S = 30.0  # how long another rank waits for the launcher to stop it before it reports itself

Task = TypeVar("Task", bound=Callable[..., Any])


class RecipeError(Exception):
    """A refusal: bad input or a state the run cannot go on from; the message says what is wrong and what to do.

    `shared` is True where every rank meets the same problem (rank 0 reports it), False for a problem of one rank.
    """

    shared = True


def traceback_requested() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") == "1"


def exit_refused(message: str, shared: bool = True) -> NoReturn:
    """Print `message` once for the whole job (see the module docstring) and end the process with status 1."""
    rank = int(os.environ.get("RANK", 0))
    if rank != 0 and shared:
        _await_launcher_stop(RANK_0_GRACE_S)
    text = message if rank == 0 or not shared else f"[rank {rank}] {message}"
    if logging.getLogger().handlers:  # inside a run: to the console and the run's log file alike
        logger.error(text)  # as the message itself: a rank's log prefix sees it is there already
    else:  # before logging is set up (the command line itself is refused)
        sys.stderr.write(f"Error: {text}\n")
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(1)


def _await_launcher_stop(seconds: float) -> None:
    """Under torchrun, wait until the launcher stops this rank (after rank 0 failed), at most `seconds`."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not hasattr(signal, "sigtimedwait"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if signal.sigtimedwait({signal.SIGTERM}, seconds) is not None:
        os._exit(1)  # rank 0 has reported the problem; the launcher is ending the job
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def refusals_exit_cleanly(task: Task) -> Task:
    """Wrap an entrypoint's task function: a `RecipeError` ends the process as `exit_refused` says."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except RecipeError as error:
            if traceback_requested():
                raise
            exit_refused(str(error), shared=error.shared)

    return wrapper  # type: ignore[return-value]
