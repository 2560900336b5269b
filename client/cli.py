"""``flower-client``: run an institution's node of a fedsilo federation.

The institution creates its node key pair in its own folder and sends only the public
half to the coordinator; it approves the coordinator's agreement; then it starts its
node beside its data with the ``ca.pem`` and ``client.toml`` the coordinator sent::

    flower-client keygen --dir site --institution hospital-a   # send site/node.pub
    flower-client approve agreement.json --config site/client.toml   # --yes without a tty
    flower-client --config site/client.toml

Before connecting it checks everything locally (data file, columns, labels, model,
certificate and key, privacy policy) and exits with a clear message if something is
wrong. It then runs a Flower SuperNode that connects to the coordinator over TLS,
authenticates with the institution's key and keeps reconnecting if the coordinator
restarts. Each round's ClientApp reads the institution's data location and privacy
policy from the SuperNode's node config, so nothing the coordinator sends can
loosen that policy (see :mod:`fedsilo.client.policy`).
"""

from __future__ import annotations

import argparse
import logging
import socket
import ssl
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from fedsilo.client.agreements import approve, summary
from fedsilo.client.deid_report import deid_preview, deid_settings, deidentify_check
from fedsilo.client.keys import TrustError, check_ca, check_private_key, keygen
from fedsilo.client.ledger import LedgerError
from fedsilo.client.ledger_cli import ledger_main, show
from fedsilo.client.length_check import before_approval, length_check
from fedsilo.client.runtime_launch import (
    make_secret,
    remove_secret,
    run_supernode,
    start_runtime,
)
from fedsilo.client.settings import DEID_KEY, LEDGER_KEY, NAME_KEY, PATH_KEYS, SCHEMA, SHARED_KEYS
from fedsilo.client.settings import check as check_settings
from fedsilo.common.agreement import AgreementError
from fedsilo.common.certs import key_fingerprint
from fedsilo.common.config import (
    DEFAULT_MODEL,
    ConfigError,
    FedsiloConfig,
    ModelConfig,
    parse_labels,
)
from fedsilo.common.deidentify import DeidSettings
from fedsilo.common.logs import configure_logging
from fedsilo.common.model import ModelError, load_tokenizer
from fedsilo.common.processes import free_port, stop_group, terminate_on_sigterm
from fedsilo.common.records import DataError, LabelMap, load_records

log = logging.getLogger("fedsilo.client")

ADMISSION_RETRY = 10.0  # seconds between attempts to join while not admitted


class ClientSetupError(ValueError):
    """A client setting is unusable; the message names the file, key or flag."""


def load_client_config(path: Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Read ``client.toml`` (paths relative to its folder) and apply flag overrides.

    Raises
    ------
    ClientSetupError
        For an unreadable file, an unknown key, a value of the wrong type or out of range,
        or a missing setting; the message names the file or flag and the key.
    """
    settings: dict[str, Any] = {}
    if path is not None:
        try:
            settings = tomllib.loads(path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise ClientSetupError(f"{path}: cannot read the client config ({err})") from None
        try:
            check_settings(settings, str(path))
        except ConfigError as err:
            raise ClientSetupError(str(err)) from None
        settings.setdefault(LEDGER_KEY, "ledger")  # beside client.toml unless set
        settings[DEID_KEY] = deid_settings(settings.get(DEID_KEY, {}), path)
        for key in PATH_KEYS:
            if key in settings and not Path(settings[key]).is_absolute():
                settings[key] = str((path.parent / settings[key]).resolve())
    settings |= {k: v for k, v in overrides.items() if v is not None}
    settings.setdefault(DEID_KEY, DeidSettings())  # on, every pattern kind, unless set
    for key in (NAME_KEY, "superlink", "data", LEDGER_KEY):
        if not settings.get(key):
            raise ClientSetupError(f"missing '{key}': set it in client.toml or with --{key}")
    host, _, port = str(settings["superlink"]).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClientSetupError(f"superlink {settings['superlink']!r} is not HOST:PORT (e.g. "
                               "fl.example.org:9092); fix it in client.toml or --superlink")
    return settings


def preflight(settings: dict[str, Any]) -> None:
    """Check data, labels, model, privacy policy, certificate and key; raise on problems."""
    try:  # the privacy policy and columns must be valid settings of the schema
        FedsiloConfig.from_flat({k: settings[k] for k in SHARED_KEYS if k in settings},
                                origin="client config")
    except ConfigError as err:
        raise ClientSetupError(str(err)) from None
    records = load_records(settings["data"], settings.get("text-column", "text"),
                           settings.get("label-column", "label"))
    log.info("data %s: %d examples, %d distinct labels", settings["data"], len(records),
             len(set(records.labels)))
    if settings.get("labels"):
        labels = LabelMap.from_names(parse_labels(str(settings["labels"]), "labels"))
        labels.encode(records.labels, records.source)
    else:
        log.info("no 'labels' given: labels are checked against the federation's when the "
                 "run starts")
    load_tokenizer(ModelConfig(model=settings.get("model", DEFAULT_MODEL)))
    for line in summary(Path(settings[LEDGER_KEY])):
        log.info("%s", line)
    if settings.get("insecure"):
        return
    for key in ("root-certificates", "auth-private-key"):
        if not settings.get(key):
            raise ClientSetupError(f"missing '{key}' (use the kit's client.toml, or "
                                   "--insecure for a plain-text test federation)")
    fingerprint = check_ca(Path(settings["root-certificates"]), settings.get("ca-sha256"))
    log.info("federation CA fingerprint (SHA-256) %s: the coordinator printed it when it "
             "provisioned; compare the two out of band", fingerprint)
    check_private_key(Path(settings["auth-private-key"]))


def check_tls(superlink: str, ca_file: str, timeout: float = 10.0) -> None:
    """Verify the coordinator's certificate against the kit's CA before joining.

    An unreachable coordinator is only logged (the SuperNode keeps retrying); a
    certificate that the CA does not vouch for is an error, since retrying cannot fix it.
    """
    host, _, port = superlink.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=ca_file)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as err:
        raise ClientSetupError(
            f"TLS check of {superlink} failed: {err.verify_message}. The coordinator's "
            f"certificate is not signed by root-certificates {ca_file} (or is not valid for "
            f"{host!r}); ask the coordinator for its current kit"
        ) from None
    except (OSError, ssl.SSLError) as err:
        log.warning("coordinator %s not reachable yet (%s); the SuperNode will keep trying",
                    superlink, err)


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags (each overrides the same key of client.toml)."""
    parser = argparse.ArgumentParser(
        prog="flower-client", description=__doc__.split("\n\n")[0],
        epilog="set-up steps: `flower-client keygen --help` (create this institution's key), "
        "`flower-client approve --help` (approve the coordinator's agreement)")
    parser.add_argument("--config", type=Path, help="the kit's client.toml")
    parser.add_argument("--check", action="store_true", help="only run the local checks")
    parser.add_argument("--deid-preview", type=int, metavar="N",
                        help="print N de-identified texts of the data (changed ones first) "
                        "on this terminal, and exit")
    parser.add_argument("--ledger", action="store_true",
                        help="print each dataset's privacy budget (ε spent / lifetime / left) "
                        "and exit (= `flower-client ledger show`)")
    parser.add_argument("--admission-wait", type=float, default=120.0, metavar="SECONDS",
                        help="keep retrying this long while the coordinator does not admit "
                        "this institution yet (it may still be registering keys)")
    for key, setting in SCHEMA.items():  # one flag per client.toml key, of its type
        if setting.kinds == (bool,):
            parser.add_argument(f"--{key}", action="store_true", default=None,
                                help="plain text, no TLS (testing only)" if key == "insecure"
                                else f"overrides '{key}' in client.toml (sets it true)")
        else:
            kind = int if setting.kinds == (int,) else float if float in setting.kinds else None
            parser.add_argument(f"--{key}", type=kind, help=f"overrides '{key}' in client.toml")
    return parser


def approve_main(argv: list[str]) -> int:
    """``flower-client approve AGREEMENT``: verify, show and store a federation agreement."""
    parser = argparse.ArgumentParser(
        prog="flower-client approve",
        description="Approve a federation agreement for this institution's data (stored "
        "beside its ledger). It asks on the terminal; without one (a script, CI) it needs "
        "--yes, given only after reading the terms it prints.")
    parser.add_argument("agreement", type=Path, help="the agreement file from the coordinator")
    parser.add_argument("--config", type=Path, required=True, help="the kit's client.toml")
    parser.add_argument("--yes", action="store_true",
                        help="approve without asking (required when there is no terminal)")
    args = parser.parse_args(argv)

    def confirm(question: str) -> bool:
        before_approval(args.config, args.agreement)  # the share of local texts it cuts
        if args.yes:
            return True
        if not sys.stdin.isatty():
            raise AgreementError("no terminal to ask on: read the terms above and run again "
                                 "with --yes to approve")
        return input(question).strip().lower() in ("y", "yes")

    try:
        settings = tomllib.loads(args.config.read_text("utf-8"))
        folder = args.config.parent
        ledger = folder / settings.get(LEDGER_KEY, "ledger")
        ca = folder / settings.get("root-certificates", "ca.pem")
        check_ca(ca, settings.get("ca-sha256"))  # a swapped CA would vouch for anything
        approve(args.agreement, ledger, ca, confirm)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        log.error("--config %s: cannot read the client config (%s)", args.config, err)
        return 2
    except (AgreementError, TrustError) as err:
        log.error("%s", err)
        return 2
    return 0


def keygen_main(argv: list[str]) -> int:
    """``flower-client keygen``: create this institution's node key pair in its own folder."""
    parser = argparse.ArgumentParser(
        prog="flower-client keygen",
        description="Create this institution's node key pair (node.key stays here, mode "
        "0600; send node.pub to the coordinator). Put the kit's ca.pem and client.toml in "
        "the same folder afterwards.")
    parser.add_argument("--dir", type=Path, default=Path("."),
                        help="the institution's folder (created if missing)")
    parser.add_argument("--institution", default="",
                        help="the institution's name, written as the public key's comment")
    args = parser.parse_args(argv)
    try:
        made = keygen(args.dir, args.institution)
    except (TrustError, OSError) as err:
        log.error("%s", err)
        return 2
    name = args.institution or "NAME"
    log.info("created %s (private: never send it anywhere) and %s", made.private, made.public)
    log.info("send %s to the coordinator; confirm its fingerprint %s out of band (phone, "
             "in person). The coordinator registers it with:\n  flower-server provision "
             "--out pki --host HOST --port PORT --institution %s --public-key %s",
             made.public, made.fingerprint, name, made.public.name)
    log.info("then put the kit's ca.pem and client.toml into %s, compare the CA fingerprint "
             "`flower-client --config %s --check` prints with the coordinator's",
             made.private.parent, made.private.parent / "client.toml")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Validate the institution's settings, then run its SuperNode until stopped."""
    configure_logging()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["approve"]:
        return approve_main(argv[1:])
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
    if argv[:1] == ["ledger"]:
        return ledger_main(argv[1:], load_client_config)
    args = build_parser().parse_args(argv)
    overrides = {k: getattr(args, k.replace("-", "_")) for k in SCHEMA}
    try:
        settings = load_client_config(args.config, overrides)
        if args.ledger:
            show(settings)
            return 0
        if args.deid_preview is not None:
            deid_preview(settings, args.deid_preview)
            return 0
        preflight(settings)
    except (ClientSetupError, DataError, ModelError, ConfigError, LedgerError,
            ValueError) as err:
        log.error("%s", err)
        return 2
    if settings.get("insecure"):
        log.warning("--insecure: updates travel in plain text and the node is not "
                    "authenticated; use this only for a local test")
    try:
        if not settings.get("insecure"):
            check_tls(str(settings["superlink"]), str(settings["root-certificates"]))
    except ClientSetupError as err:
        log.error("%s", err)
        return 2
    deidentify_check(settings)  # last: it journals, and bad input must leave no trace
    length_check(settings)  # the share of local texts the agreed max-length cuts
    if not settings.get("declared-examples"):
        log.warning("%s: no declared-examples in client.toml: each update reports the exact "
                    "size of the training split (docs/privacy.md, 'Exact record counts')",
                    settings[NAME_KEY])
    log.info("%s: local checks passed", settings[NAME_KEY])
    if args.check:
        return 0
    terminate_on_sigterm()
    port = int(settings.get("runtime-port") or free_port())
    secret = make_secret()  # only fedsilo's runtime may take the SuperNode's tasks
    runtime = start_runtime(port, Path(settings[LEDGER_KEY]), secret)
    deadline = time.monotonic() + args.admission_wait
    try:
        while True:
            code, refused = run_supernode(settings, port, secret, runtime)
            if not refused or settings.get("insecure") or time.monotonic() >= deadline:
                break
            log.warning("%s is not admitted yet (the coordinator may still be registering "
                        "institutions); retrying in %.0f s", settings[NAME_KEY], ADMISSION_RETRY)
            time.sleep(ADMISSION_RETRY)
    finally:
        stop_group(runtime)
        remove_secret(secret)
    if refused and not settings.get("insecure"):
        log.error("the coordinator at %s refused to admit %s: its node key (%s) is not on the "
                  "coordinator's allow-list. Send the coordinator this institution's public "
                  "key (node.pub) to register with `flower-server provision --public-key`, "
                  "and compare that fingerprint with it.", settings["superlink"],
                  settings[NAME_KEY], key_fingerprint(Path(settings["auth-private-key"])))
    return code
