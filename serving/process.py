"""A supervised child process: its own process group, its output read line by line, stopped without leftovers.

`TritonServer` runs tritonserver in one, the GPU run (`benchmarks.gpu_run`) each of its stages.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # resolved before fork: the child must not dlopen


def _die_with_parent() -> None:
    # A child outliving a killed parent (a crashed test run) would hold ports and memory. Linux sends the
    # signal when the thread that started the child ends: `SupervisedProcess` starts it from a thread of its own.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class SupervisedProcess:
    """`argv` run in its own process group (Ctrl-C is not sent to it; its own children are reachable as a group).

    Its stdout and stderr, together, are read line by line as they come: each line is written to every one of
    `sinks` (and flushed), and the last `tail_lines` lines are kept (`tail`). `die_with_parent`: the child gets
    SIGTERM when this process ends (Linux's parent-death signal, sent when the thread that forked the child
    ends: it is forked from a thread that waits for it, so a caller's thread, such as the supervisor's that
    restarts a server, may end before it).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        sinks: Sequence[IO[str]] = (),
        tail_lines: int = 400,
        die_with_parent: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.sinks = sinks
        self.die_with_parent = die_with_parent
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> SupervisedProcess:
        """Start it (OSError where it cannot be run)."""
        if self.die_with_parent:
            started: queue.Queue[subprocess.Popen | OSError] = queue.Queue(maxsize=1)
            threading.Thread(target=self._keep, args=(started,), name="supervised-child", daemon=True).start()
            proc = started.get()
            if isinstance(proc, OSError):
                raise proc
            self._proc = proc
        else:
            self._proc = self._popen()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        return self

    def _keep(self, started: queue.Queue) -> None:
        """Fork the child, hand it over, and live as long as it does (see the class docstring)."""
        try:
            proc = self._popen()
        except OSError as e:
            started.put(e)
            return
        started.put(proc)
        proc.wait()

    def _popen(self) -> subprocess.Popen:
        return subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._tail.append(line)
            for sink in self.sinks:
                sink.write(line)
                sink.flush()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    @property
    def tail(self) -> list[str]:
        """The last lines it printed."""
        return list(self._tail)

    def poll(self) -> int | None:
        """Its exit code, or None while it runs."""
        assert self._proc is not None
        return self._proc.poll()

    def send_signal(self, sig: int) -> None:
        """`sig` to the process alone, if it still runs."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """`sig` to its whole process group (what is left of it)."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, sig)

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit code once it has ended and its output is read; None if it still runs after `timeout` s."""
        assert self._proc is not None
        try:
            rc = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._join_reader()
        return rc

    def stop(self, grace: float, *, group: bool = False) -> int:
        """SIGTERM to the process (`group`: to its whole group), then SIGKILL to the group if it has not ended
        after `grace` s. Returns its exit code."""
        assert self._proc is not None
        if group:
            self.signal_group(signal.SIGTERM)
        else:
            self.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self._proc.wait()
        self._join_reader()
        return self._proc.returncode

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)
