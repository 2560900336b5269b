"""Helpers for the Flower processes fedsilo starts: ports and environment."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

#: Folder of this interpreter's executables (flwr, flower-superlink, ...).
BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


#: Flower's SuperExec (which starts a ClientApp or ServerApp process for each task)
#: asks its SuperNode or SuperLink for new tasks this often; Flower's default is 1 s,
#: which every train and evaluate message waits half of on average. The asks go to the
#: host's own runtime API on loopback. A value the user exports wins.
SUPEREXEC_POLL = ("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")


def child_env(**extra: str) -> dict[str, str]:
    """Return the environment for Flower processes fedsilo starts.

    Flower's processes start further Flower executables by name, so the virtual
    environment's ``bin`` must come first even when it is not activated; SuperExec's
    task poll interval defaults to :data:`SUPEREXEC_POLL`.
    """
    path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    name, seconds = SUPEREXEC_POLL
    return {name: seconds, **os.environ, "PATH": path, **extra}


def wait_for_port(proc: subprocess.Popen, port: int, timeout: float, what: str) -> None:
    """Wait until ``proc`` listens on loopback ``port``.

    Raises
    ------
    RuntimeError
        If ``proc`` exits first or ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f}s")


def terminate_on_sigterm() -> None:
    """Turn SIGTERM into ``KeyboardInterrupt`` so clean-up code runs as on Ctrl-C."""

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)


def stop_group(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
    """Stop ``proc`` and its process group (started with ``start_new_session``).

    The group is signalled even when ``proc`` itself has already exited, since
    processes it started may still run.
    """
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None where unknown."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return None
