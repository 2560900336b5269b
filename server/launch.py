"""Run fedsilo through Flower's SuperLink: start it, submit the app, follow the run.

fedsilo never leaves a SuperLink behind: the one it starts lives in a private
``FLWR_HOME`` and is stopped when the run ends, fails or is interrupted. The app it
submits is a *thin* Flower app: a ``pyproject.toml`` whose components point at the
installed ``fedsilo`` package and whose ``[tool.flwr.app.config]`` holds this run's
settings, so no code, weights or data travel in the FAB.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsilo.common.certs import public_key_fingerprint
from fedsilo.common.config import FedsiloConfig, toml_table
from fedsilo.common.processes import BIN, child_env, free_port, stop_group, wait_for_port
from fedsilo.server.allowlist import Allowed
from fedsilo.server.gate import Roster

log = logging.getLogger(__name__)

CONNECTION = "fedsilo"


class LaunchError(RuntimeError):
    """The SuperLink could not be started, or the run did not complete."""


#: What the coordinator process and everything it starts may give away: nothing to
#: group or others (state.db holds each institution's individual updates).
PRIVATE_UMASK = 0o077


def close_state_dir(state: Path) -> None:
    """Make ``state`` the coordinator's private folder: 0700, everything in it owner-only.

    Sets the process umask to :data:`PRIVATE_UMASK` (the SuperLink, ServerApp and
    gateway inherit it, so ``state.db`` and the logs are created 0600) and takes group
    and other bits off what an earlier run left there.

    Raises
    ------
    LaunchError
        If the folder belongs to another user (who could read or swap the state).
    """
    os.umask(PRIVATE_UMASK)
    state.mkdir(parents=True, exist_ok=True)
    if state.stat().st_uid != os.getuid():
        raise LaunchError(f"--state-dir {state} belongs to another user; use a folder of "
                          "your own (the coordinator's state holds institutions' updates)")
    for path in [state, *state.rglob("*")]:
        info = path.lstat()
        if not stat.S_ISLNK(info.st_mode) and stat.S_IMODE(info.st_mode) & 0o077:
            path.chmod(stat.S_IMODE(info.st_mode) & 0o700)


def write_thin_app(app_dir: Path, cfg: FedsiloConfig) -> Path:
    """Write a Flower app folder whose run config is ``cfg``; return the folder."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(
        "[build-system]\nrequires = [\"setuptools>=69\"]\n"
        "build-backend = \"setuptools.build_meta\"\n\n"
        "[project]\nname = \"fedsilo-run\"\nversion = \"0.1.0\"\n"
        "description = \"Thin Flower app: the code is the installed fedsilo package\"\n"
        "license = \"Apache-2.0\"\n"
        "dependencies = []\n\n"
        "[tool.flwr.app]\npublisher = \"fedsilo\"\n\n"
        "[tool.flwr.app.components]\n"
        "serverapp = \"fedsilo.server.server_app:app\"\n"
        "clientapp = \"fedsilo.client.client_app:app\"\n\n"
        "[tool.flwr.app.config]\n" + toml_table(cfg.to_flat()),
        "utf-8",
    )
    return app_dir


@dataclass
class SuperLink:
    """A SuperLink process owned by fedsilo, with its own ``FLWR_HOME``.

    Parameters
    ----------
    home
        Private Flower home (CLI connection config, SuperLink log).
    args
        Extra ``flower-superlink`` arguments (TLS, simulation, state database...).
    host, port
        Where the SuperLink listens (the one port serves all its APIs).
    """

    home: Path
    args: list[str]
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    tls_root: Path | None = None
    process: subprocess.Popen | None = None
    extra_env: dict[str, str] = field(default_factory=dict)  # inherited by the ServerApp

    @property
    def env(self) -> dict[str, str]:
        """Environment for Flower processes that talk to this SuperLink."""
        # RAY_DEDUP_LOGS=0: every institution's own line reaches the log in simulations.
        return child_env(FLWR_HOME=str(self.home), FLWR_DISABLE_UPDATE_CHECK="1",
                         RAY_DEDUP_LOGS="0", **self.extra_env)

    @property
    def log_file(self) -> Path:
        """Where the SuperLink writes its log."""
        return self.home / "superlink.log"

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink and wait until it accepts connections."""
        self.home.mkdir(parents=True, exist_ok=True)
        address = f"127.0.0.1:{self.port}"
        connection = {"address": address}
        if self.tls_root is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(self.tls_root)
        lines = [f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]']
        lines += [f"{k} = {json.dumps(v)}" for k, v in connection.items()]
        (self.home / "config.toml").write_text("\n".join(lines) + "\n", "utf-8")
        cmd = [str(BIN / "flower-superlink"), "--host", self.host, "--port", str(self.port),
               "--log-file", str(self.log_file), *self.args]
        log.debug("starting %s", " ".join(cmd))
        self.process = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(self.process, self.port, timeout, "flower-superlink")
        except RuntimeError as err:
            self.stop()
            raise LaunchError(f"{err}; see {self.log_file}:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the SuperLink log (for error messages)."""
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text("utf-8", "replace").splitlines()[-lines:])

    def stop(self, grace: float = 15.0) -> None:
        """Stop the SuperLink and everything it started (its process group)."""
        proc, self.process = self.process, None
        stop_group(proc, grace)

    def flwr(self, *args: str, capture: bool = True) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against this SuperLink."""
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, text=True,
                              capture_output=capture, check=False, stdin=subprocess.DEVNULL)

    def submit(self, app_dir: Path, federation_config: list[str] | None = None) -> int:
        """Submit the app in ``app_dir`` and return its run id."""
        args = ["run", str(app_dir), CONNECTION, "--format", "json"]
        if federation_config:
            args += ["--federation-config", " ".join(federation_config)]
        done = self.flwr(*args)
        try:
            payload = json.loads(done.stdout[done.stdout.index("{"):])
            return int(payload["run-id"])
        except (ValueError, KeyError, TypeError):
            raise LaunchError(f"flwr run failed (exit {done.returncode}):\n{done.stdout}"
                              f"{done.stderr}") from None

    def follow(self, run_id: int, sink: Callable[[str], None]) -> None:
        """Pass each line of the run's log to ``sink`` until the run ends."""
        cmd = [str(BIN / "flwr"), "log", str(run_id), CONNECTION, "--stream"]
        with subprocess.Popen(cmd, env=self.env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              errors="replace") as proc:
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    sink(line.rstrip("\n"))
            finally:
                proc.terminate()

    def status(self, run_id: int) -> str:
        """Return the run's final status, e.g. ``finished:completed``."""
        done = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            payload = json.loads(done.stdout[done.stdout.index("{"):])
            return str(payload["runs"][0]["status"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise LaunchError(f"cannot read the status of run {run_id}:\n{done.stdout}"
                              f"{done.stderr}") from None

    def node_keys(self) -> dict[int, bytes]:
        """Node id → PEM public key of every SuperNode registered with this SuperLink.

        Read through Flower's Control API client (``flwr supernode ls`` prints no keys).
        """
        done = subprocess.run([sys.executable, "-c", _LIST_NODES, CONNECTION], env=self.env,
                              text=True, capture_output=True, check=False,
                              stdin=subprocess.DEVNULL)
        try:
            return {int(k): bytes.fromhex(v)
                    for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
        except (ValueError, IndexError, AttributeError):
            raise LaunchError(f"cannot list the registered nodes (exit {done.returncode}):\n"
                              f"{done.stdout}{done.stderr}") from None

    def cancel(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run."""
        self.flwr("stop", str(run_id), CONNECTION)


_LIST_NODES = """
import json, sys
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.utils import init_http_client_from_connection
from flwr.proto.control_pb2 import ListNodesRequest
client = init_http_client_from_connection(read_superlink_connection(sys.argv[1]))
nodes = client.ListNodes(ListNodesRequest()).nodes_info
print(json.dumps({n.node_id: n.public_key.hex() for n in nodes if n.status != "unregistered"}))
"""


def write_roster(link: SuperLink, allowed: dict[str, Allowed], path: Path) -> Roster:
    """Map every registered node to its allow-listed institution; store it at ``path``.

    A node's institution is the allow-list entry whose key fingerprint matches the key
    the node authenticates with; a registered key no longer on the allow-list maps to
    nothing, so the gate rejects its replies. ``path`` is what ``$FEDSILO_ROSTER``
    names for the ServerApp.
    """
    by_print = {entry.sha256: name for name, entry in allowed.items()}
    nodes: dict[int, str] = {}
    for node, pem in link.node_keys().items():
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, UnsupportedAlgorithm):
            continue
        if isinstance(key, ec.EllipticCurvePublicKey) and \
                (name := by_print.get(public_key_fingerprint(key))) is not None:
            nodes[node] = name
    missing = sorted(set(allowed) - set(nodes.values()))
    if missing:
        raise LaunchError(f"no registered node for {', '.join(missing)}; see {link.log_file}")
    roster = Roster(nodes, {name: entry.expected_examples for name, entry in allowed.items()
                            if entry.expected_examples})
    roster.write(path)
    log.info("roster %s: %d institution node(s)", path, len(nodes))
    if unknown := sorted(set(allowed) - set(roster.expected)):
        log.warning("no expected-examples for %s: their replies' example counts are capped "
                    "only by --max-examples (give `flower-server provision --institution NAME "
                    "--expected-examples N`)", ", ".join(unknown))
    return roster


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class LogFilter:
    """Write every run log line to a file; echo only fedsilo lines and problems.

    Parameters
    ----------
    path
        File that receives the whole log.
    verbose
        Echo every line, not only fedsilo's and warnings/errors.
    """

    _SHOWN = re.compile(r" fedsilo (INFO|WARNING|ERROR) |^(WARNING|ERROR)\b|Traceback|Error:")

    def __init__(self, path: Path, verbose: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")
        self.verbose = verbose

    def __call__(self, line: str) -> None:
        """Record one log line."""
        plain = _ANSI.sub("", line)
        self.file.write(plain + "\n")
        self.file.flush()
        if self.verbose or self._SHOWN.search(plain.strip()):
            print(plain, flush=True)

    def close(self) -> None:
        """Close the log file."""
        self.file.close()


def run_to_completion(link: SuperLink, app_dir: Path, sink: Callable[[str], None],
                      federation_config: list[str] | None = None) -> str:
    """Submit, follow and check a run; return its status or raise :class:`LaunchError`.

    ``flwr run --stream`` exits 0 even when a run fails, so the final status is read
    back from the SuperLink. Ctrl-C stops the run before re-raising.
    """
    run_id = link.submit(app_dir, federation_config)
    log.info("submitted run %d", run_id)
    try:
        link.follow(run_id, sink)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping run %d", run_id)
        link.cancel(run_id)
        raise
    status = link.status(run_id)
    if status != "finished:completed":
        raise LaunchError(f"run {run_id} ended with status {status!r}; SuperLink log "
                          f"{link.log_file}:\n{link.log_tail()}")
    return status
