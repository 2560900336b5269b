"""``flower-server``: the coordinator's commands.

``flower-server provision`` creates the federation's CA, the server certificate and
one kit per institution (see :mod:`fedsilo.server.provision`).

``flower-server`` (no sub-command) runs a federation: it starts Flower's SuperLink on
loopback with TLS, SuperNode authentication and persistent state, puts the fleet-only
gateway (:mod:`fedsilo.server.gateway`) on the public address, registers the
allow-listed institution keys, waits for the minimum number of institutions, submits
the fedsilo run, shows its progress and writes the model and ``metrics.json``. It exits
0 only if the run completed.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from fedsilo.common.agreement import DEFAULT_VALID_DAYS
from fedsilo.common.certs import outside_validity
from fedsilo.common.config import ConfigError, FedsiloConfig
from fedsilo.common.config_flags import SIMULATION_ONLY, add_config_arguments
from fedsilo.common.config_flags import config_overrides as typed_overrides
from fedsilo.common.live import live_view
from fedsilo.common.logs import configure_logging
from fedsilo.common.model import ModelError, load_tokenizer
from fedsilo.common.processes import (
    child_env,
    free_port,
    stop_group,
    terminate_on_sigterm,
    wait_for_port,
)
from fedsilo.common.records import DataError
from fedsilo.common.task import freeze_labels
from fedsilo.server import checkpoint, gateway, provision
from fedsilo.server.agreements import run_under, write_agreement
from fedsilo.server.allowlist import allowlist_entries
from fedsilo.server.dashboard import heartbeat, render
from fedsilo.server.gate import ROSTER_ENV
from fedsilo.server.launch import (
    LaunchError,
    LogFilter,
    SuperLink,
    close_state_dir,
    run_to_completion,
    write_roster,
    write_thin_app,
)

log = logging.getLogger("fedsilo.server")


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``flower-server`` (the run's settings come from the shared schema)."""
    parser = argparse.ArgumentParser(
        prog="flower-server", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run a fedsilo federation as coordinator "
        "(`flower-server provision --help` for the set-up step).")
    srv = parser.add_argument_group("coordinator settings")
    srv.add_argument("--pki", type=Path, default=Path("pki"),
                     help="folder written by `flower-server provision`")
    srv.add_argument("--state-dir", type=Path, default=Path("coordinator-state"),
                     help="SuperLink state (database, logs) kept across restarts")
    srv.add_argument("--host", default="0.0.0.0", help="public address institutions reach")
    srv.add_argument("--port", type=int, default=9092, help="public port (Fleet API only)")
    srv.add_argument("--insecure", action="store_true",
                     help="no TLS and no institution authentication (local tests only)")
    gateway.add_limit_arguments(srv, "gateway-")
    srv.add_argument("--verbose", action="store_true", help="echo Flower's log lines too")
    srv.add_argument("--agreement", type=Path, help="run under this federation agreement "
                     "(from `flower-server agreement`); the run must match its terms")
    add_config_arguments(parser, ["model", "data", "privacy", "train", "federation"],
                         "coordinator")
    return parser


def _pki_files(pki: Path) -> dict[str, Path]:
    """The CA, server certificate and key under ``pki``, checked to be usable together.

    Raises
    ------
    ConfigError
        If a file is missing or unreadable, a certificate is not current, the server
        certificate is not issued by the CA, or the key does not match it.
    """
    files = {"ca": pki / "ca" / "ca.pem", "cert": pki / "server" / "server.pem",
             "key": pki / "server" / "server.key"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"--pki {pki}: missing {', '.join(missing)}; run `flower-server "
                          f"provision --out {pki} --host HOST --institution NAME ...` first")
    fix = (f"; run `flower-server provision --out {pki} --host HOST` again to renew the "
           "server certificate")
    ca, cert = _load_cert(files["ca"], fix), _load_cert(files["cert"], fix)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(f"--pki: server certificate {files['cert']} is not issued by the CA "
                          f"{files['ca']}{fix}") from None
    try:
        key = serialization.load_pem_private_key(files["key"].read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"--pki: server key {files['key']} is not a readable PEM private "
                          f"key ({err}){fix}") from None
    if key.public_key() != cert.public_key():
        raise ConfigError(f"--pki: server key {files['key']} does not match the server "
                          f"certificate {files['cert']}{fix}")
    return files


def _load_cert(path: Path, fix: str) -> x509.Certificate:
    """Load a PEM certificate and refuse one outside its validity period."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--pki: {path} is not a readable PEM certificate ({err}){fix}") \
            from None
    if (when := outside_validity(cert)) is not None:
        raise ConfigError(f"--pki: certificate {path} is {when}{fix}")
    return cert


def simulation_flags(argv: list[str]) -> list[str]:
    """The flags in ``argv`` that only a simulation offers (:data:`SIMULATION_ONLY`)."""
    return [a.split("=")[0] for a in argv
            if a.startswith("--") and a.split("=")[0][2:] in SIMULATION_ONLY]


def resolve_config(args: argparse.Namespace) -> FedsiloConfig:
    """The run's settings (after checking --pki); the holdout split is simulation-only."""
    if not getattr(args, "insecure", True):  # refuse a bad --pki before anything starts
        _pki_files(args.pki.expanduser().resolve())
    given = typed_overrides(args)
    flat = {"holdout-fraction": 0.0, "output-dir": "outputs/federation"} | given
    if given.get("resume"):  # the interrupted run's settings, unless a flag changes one
        folder = Path(str(flat["output-dir"])).expanduser().resolve()
        flat = checkpoint.load(folder).config | given | {"output-dir": str(folder)}
    cfg = FedsiloConfig.from_flat(flat, origin="command line")
    out = str(Path(cfg.federation.output_dir).expanduser().resolve())
    return freeze_labels(cfg.replace(output_dir=out))


def start_gateway(args: argparse.Namespace, upstream_port: int,
                  pki: dict[str, Path] | None, log_file: Path) -> subprocess.Popen:
    """Start the fleet-only gateway on the public address."""
    scheme = "http" if pki is None else "https"
    cmd = [sys.executable, "-m", "fedsilo.server.gateway", "--listen",
           f"{args.host}:{args.port}", "--upstream", f"{scheme}://127.0.0.1:{upstream_port}"]
    cmd += ["--insecure"] if pki is None else [
        "--ssl-certfile", str(pki["cert"]), "--ssl-keyfile", str(pki["key"]),
        "--ca", str(pki["ca"]), "--allowlist", str(args.pki)]
    cmd += gateway.limit_flags(gateway.limits_from(args, "gateway-"))
    with log_file.open("ab") as out:
        proc = subprocess.Popen(cmd, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for_port(proc, args.port, 30, "the gateway")
    except RuntimeError as err:
        stop_group(proc)
        raise LaunchError(f"{err}; see {log_file}") from None
    return proc


def register_institutions(link: SuperLink, pki: Path, roster: Path) -> None:
    """Register every allow-listed public key (idempotent); write the node roster."""
    allowed = allowlist_entries(pki)
    for name, entry in allowed.items():
        pub = entry.public_key
        done = link.flwr("supernode", "register", str(pub), "fedsilo", "--name", name)
        text = done.stdout + done.stderr
        if done.returncode and "already" not in text.lower():
            raise LaunchError(f"cannot register {name} ({pub}):\n{text}")
        log.info("institution %s: key %s registered", name, pub)
    write_roster(link, allowed, roster)


def run(args: argparse.Namespace, cfg: FedsiloConfig) -> int:
    """Start SuperLink and gateway, run the federation, stop everything."""
    args.pki = args.pki.expanduser().resolve()
    pki = None if args.insecure else _pki_files(args.pki)
    state = args.state_dir.resolve()
    try:
        close_state_dir(state)
    except LaunchError as err:
        log.error("%s", err)
        return 2
    link_args = ["--database", str(state / "state.db"), "--isolation", "subprocess",
                 "--disable-runtime-dependency-installation"]
    if pki is None:
        log.warning("--insecure: no TLS and no institution authentication; local tests only")
        link_args.append("--insecure")
    else:
        link_args += ["--ssl-certfile", str(pki["cert"]), "--ssl-keyfile", str(pki["key"]),
                      "--ssl-ca-certfile", str(pki["ca"]), "--enable-supernode-auth"]
    # The ServerApp names each reply's sender from this roster (node id → institution).
    roster = state / "roster.json"
    link = SuperLink(home=state / "flwr-home", args=link_args, port=free_port(),
                     tls_root=None if pki is None else pki["ca"],
                     extra_env={} if pki is None else {ROSTER_ENV: str(roster)})
    proxy = None
    sink = LogFilter(Path(cfg.federation.output_dir) / "run.log", args.verbose)
    try:
        link.start()
        proxy = start_gateway(args, link.port, pki, state / "gateway.log")
        if pki is not None:
            register_institutions(link, args.pki, roster)
        log.info("listening on %s:%d (Fleet API only); waiting for %d institution(s)",
                 args.host, args.port, cfg.federation.min_available)
        app = write_thin_app(state / "app", cfg)
        out = Path(cfg.federation.output_dir)
        with live_view(lambda: render(out), heartbeat=lambda: heartbeat(out)):
            run_to_completion(link, app, sink)
    except LaunchError as err:
        log.error("%s", err)
        _resume_hint(cfg)
        return 1
    except KeyboardInterrupt:
        log.warning("interrupted")
        _resume_hint(cfg)
        return 130
    finally:
        sink.close()
        stop_group(proxy)
        link.stop()
    log.info("done: model in %s/model, metrics in %s/metrics.json",
             cfg.federation.output_dir, cfg.federation.output_dir)
    return 0


def _resume_hint(cfg: FedsiloConfig) -> None:
    out = Path(cfg.federation.output_dir)
    if (out / checkpoint.FILE).is_file():
        log.info("to continue after the last completed round: flower-server --resume "
                 "--output-dir %s (with the same --pki and --state-dir)", out)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``flower-server``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["provision"]:
        return provision.main(argv[1:])
    configure_logging()
    issuing = argv[:1] == ["agreement"]
    parser = build_parser()
    if issuing:
        parser.prog = "flower-server agreement"
        parser.description = ("Write the federation agreement for the run these flags "
                              "describe, signed with the coordinator's server key")
        parser.add_argument("--name", required=True, help="the federation's name")
        parser.add_argument("--out", type=Path, required=True, help="agreement file to write")
        parser.add_argument("--valid-days", type=int, metavar="DAYS",
                            help=f"days the agreement stays valid (default {DEFAULT_VALID_DAYS}, "
                            "or until the server certificate expires if sooner); institutions "
                            "decline runs under an expired agreement")
    if wrong := simulation_flags(argv):
        log.error("%s: simulation setting(s), not the coordinator's: each institution's data "
                  "and split are its own (client.toml); run a simulation with "
                  "simulations/run_simulation.py, and give the coordinator's own held-out "
                  "file with --eval-data", ", ".join(wrong))
        return 2
    args = parser.parse_args(argv[1:] if issuing else argv)
    try:
        cfg = resolve_config(args)
        load_tokenizer(cfg.model)
        if issuing:
            ident = write_agreement(cfg, args.name, _pki_files(args.pki), args.out,
                                    args.valid_days)
            log.info("agreement %s written to %s: send it to every institution's privacy "
                     "officer (flower-client approve %s), then run with --agreement %s",
                     ident, args.out, args.out.name, args.out)
            return 0
        if args.agreement is not None:
            cfg = run_under(cfg, args.agreement, _pki_files(args.pki)["ca"])
            log.info("running under agreement %s", cfg.federation.agreement_id)
        elif not cfg.federation.agreement_id:
            log.warning("no --agreement: every deployed institution declines a run that "
                        "names no agreement it approved (`flower-server agreement --help`)")
    except (ConfigError, DataError, ModelError, ValueError, OSError) as err:
        log.error("%s", err)
        return 2
    terminate_on_sigterm()
    return run(args, cfg)
