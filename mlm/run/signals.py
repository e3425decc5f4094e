"""Ctrl-C, SIGTERM and SIGHUP stop a run cleanly, from its setup to its last write.

Outside the loop a signal raises `Interrupted` at once: setup has written nothing yet and the final phase writes each
file atomically, so the folder stays as it was (before the first checkpoint) or resumable (after it). Inside the loop
(`deferred()`) a first signal only sets `received`: the step finishes, a checkpoint is saved and the run stops. A
second Ctrl-C raises at once, for when that is too slow; a repeated SIGTERM or SIGHUP does not, because schedulers
send them more than once (SLURM to the job's every process and to torchrun, which forwards it again). Once a run
is ending on an exception, recording its stop or undoing its writes, signals are ignored until it is done.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

from tqdm.auto import tqdm

from mlm.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Signals:
    def __init__(self):
        self.received: str | None = None  # the signal that asked the loop to stop
        self._defer, self._ending, self._previous = False, False, {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread
            # One ignored when the run started stays ignored: nohup's SIGHUP, a background job's SIGINT.
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS
                              if signal.getsignal(sig) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc) -> None:
        while self._previous:
            signal.signal(*self._previous.popitem())

    @contextmanager
    def deferred(self):
        self._defer = True
        try:
            yield self
        finally:
            self._defer = False

    def ending(self) -> None:
        """The run is stopping already, undoing or recording what it did: a signal now (torchrun's SIGTERM once
        another process died, a scheduler's repeated one) would only cut that short."""
        self._ending = True

    def _handle(self, signum, frame) -> None:
        if self._ending:
            return
        name = signal.Signals(signum).name
        if not self._defer or (self.received is not None and signum == signal.SIGINT):
            raise Interrupted(name)
        if self.received is not None:
            return  # the checkpoint is on its way
        self.received = name
        if int(os.environ.get("RANK", 0)) == 0:  # one line, not one per process
            tqdm.write(f"{name} received: finishing this step (with several processes: up to the next log step), "
                       "then saving a checkpoint (Ctrl-C again to stop at once, without saving).")


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's `worker_init_fn`: the STOP_SIGNALS reach the whole process group (a terminal, torchrun,
    SLURM), and are the main process's to act on: it checkpoints, then ends its workers. A worker they killed first
    would fail the run. (A worker whose main process is gone still exits: DataLoader's watchdog sees to it.)"""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
