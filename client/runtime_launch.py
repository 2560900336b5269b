"""How ``flower-client`` starts an institution's node: the SuperNode and fedsilo's runtime.

The SuperNode (``flower-supernode --isolation process``) talks to the coordinator and
serves its runtime API on loopback only; it starts no ClientApp process of its own.
fedsilo's runtime (:mod:`fedsilo.client.runtime`), started first and kept for the whole
session, takes every task from that API.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedsilo.client.dashboard import render
from fedsilo.client.settings import DATA_KEYS, DEID_KEY, LEDGER_KEY, NAME_KEY, POLICY_KEYS
from fedsilo.common.config import config_args
from fedsilo.common.deidentify import DeidSettings
from fedsilo.common.live import live_view
from fedsilo.common.processes import BIN, child_env, stop_group

log = logging.getLogger("fedsilo.client")

#: What Flower's SuperNode prints when the SuperLink does not know its key.
NOT_ADMITTED = "Failed to activate SuperNode"
#: The runtime API listens here only: nothing off this host can take the node's tasks.
LOOPBACK = "127.0.0.1"


def supernode_command(settings: dict[str, Any], runtime_port: int,
                      secret: Path | None = None) -> list[str]:
    """The ``flower-supernode`` command line for these settings.

    ``secret`` (:func:`make_secret`) makes the SuperNode hand its tasks only to a process
    that holds it: fedsilo's runtime, not any other process of this host.
    """
    keys = (NAME_KEY, *DATA_KEYS, *POLICY_KEYS, LEDGER_KEY)
    node = {k: settings[k] for k in keys if k in settings}
    node[DEID_KEY] = settings.get(DEID_KEY, DeidSettings()).to_node()
    cmd = [str(BIN / "flower-supernode"), "--superlink", str(settings["superlink"]),
           "--node-config", config_args(node), "--isolation", "process",
           "--host", LOOPBACK, "--port", str(runtime_port)]
    if secret is not None:
        cmd += ["--superexec-auth-secret-file", str(secret)]
    if settings.get("insecure"):
        return [*cmd, "--insecure"]
    return [*cmd, "--root-certificates", settings["root-certificates"],
            "--auth-supernode-private-key", settings["auth-private-key"]]


def make_secret() -> Path:
    """A fresh random secret in a private temporary folder (0700; the file 0600)."""
    folder = Path(tempfile.mkdtemp(prefix="fedsilo-runtime-"))
    path = folder / "superexec.secret"
    path.touch(mode=0o600)
    path.write_bytes(secrets.token_bytes(32))
    return path


def remove_secret(path: Path) -> None:
    """Remove the secret and its folder."""
    shutil.rmtree(path.parent, ignore_errors=True)


def start_runtime(runtime_port: int, ledger_dir: Path, secret: Path) -> subprocess.Popen:
    """Start fedsilo's runtime for the SuperNode's runtime API at ``runtime_port``.

    ``python -P`` keeps the working folder off ``sys.path``: the runtime imports only the
    installed packages.
    """
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "fedsilo.client.runtime", f"{LOOPBACK}:{runtime_port}",
         "--ledger-dir", str(ledger_dir), "--secret-file", str(secret),
         "--parent", str(os.getpid())],
        env=child_env(), stdin=subprocess.DEVNULL, start_new_session=True)


def run_supernode(settings: dict[str, Any], runtime_port: int, secret: Path,
                  runtime: subprocess.Popen) -> tuple[int, bool]:
    """Run the SuperNode until it, or the ``runtime``, exits or is stopped.

    Returns (exit code, refused); a runtime that died stops the node (exit code 3):
    without it the node would take the coordinator's messages and answer none.
    """
    cmd = supernode_command(settings, runtime_port, secret)
    log.info("joining the federation at %s", settings["superlink"])
    proc = subprocess.Popen(cmd, env=child_env(), start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, errors="replace")
    seen: list[str] = []

    def relay() -> None:  # pass the SuperNode's output through, watching for a refusal
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if NOT_ADMITTED in line:
                seen.append(line)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        with live_view(lambda: render(Path(settings[LEDGER_KEY]), str(settings[NAME_KEY]),
                                      settings.get("target-epsilon"))):
            while (code := proc.poll()) is None and runtime.poll() is None:
                time.sleep(1)
        if code is None:
            log.error("fedsilo's runtime stopped (exit %s); stopping the SuperNode, which "
                      "could run nothing without it. See the messages above, then start "
                      "flower-client again", runtime.returncode)
            code = 3
    except KeyboardInterrupt:
        log.info("stopping the SuperNode")
        code = 130
    stop_group(proc)
    reader.join(5)
    return code, bool(seen)

