"""Coordinator provisioning: CA, SuperLink certificate, allow-list and institution kits.

Each institution makes its own node key pair (``flower-client keygen``) and sends
only the public half; the coordinator registers it::

    flower-server provision --out pki --host fl.example.org --port 9092 \
        --institution hospital-a --public-key hospital-a.pub [--expected-examples N]

and writes, with ``cryptography`` only (see :mod:`fedsilo.server.pki`)::

    ca/ca.key, ca/ca.pem                 private CA, 5 years
    server/server.key, server/server.pem SuperLink TLS certificate signed by the CA
    allowlist/<name>.pub, allowlist.json node public keys (OpenSSH) + fingerprints +
                                         expected examples (:mod:`.allowlist`)
    kits/<name>/                         for the institution: ca.pem and client.toml
                                         (which pins ca-sha256); no private key

It prints the CA fingerprint (SHA-256 of ``ca.pem``'s DER) so that coordinator and
institutions can compare it out of band, and the commands each side runs next.

The old flow, ``--generate-keys-at-coordinator``, makes each institution's node key
here and puts ``node.key`` / ``node.pub`` in its kit: the coordinator then holds the
institution's private key and could impersonate it.

Re-running never silently overwrites a key: the CA and server key are reused,
existing kits are left as they are (files missing after an interrupted run are
added), new institutions get a kit and an allow-list entry, earlier entries stay. A
key that does not match an institution's existing entry is a ``ProvisionError``.
Flower reads ``flower-supernode --auth-supernode-private-key`` with
``load_ssh_private_key`` and ``flwr supernode register <file>`` with
``load_ssh_public_key`` (OpenSSH, NIST curve).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from fedsilo.common.atomic import write_atomic
from fedsilo.common.certs import ca_fingerprint, public_key_fingerprint
from fedsilo.common.logs import configure_logging
from fedsilo.server.allowlist import (
    INDEX,
    PUBLIC,
    ProvisionError,
    allowlist_entries,
    key_file_fingerprint,
    load_allowlist,
    public_line,
    read_index,
    read_public_key,
    write_index,
)
from fedsilo.server.kit_template import client_toml
from fedsilo.server.pki import ensure_ca, ensure_server, load_key, mkdir, new_key

__all__ = ["Provisioned", "ProvisionError", "load_allowlist", "main", "provision"]

log = logging.getLogger("fedsilo.provision")

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}", re.IGNORECASE)
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DNS = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*", re.IGNORECASE)
_PEM = serialization.Encoding.PEM
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Provisioned:
    """Paths written or reused by :func:`provision`; ``created`` names the new kits."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    allowlist: Path
    kits: dict[str, Path]
    created: tuple[str, ...] = ()
    ca_sha256: str = ""


def _ensure_kit(kit: Path, name: str, superlink: str, ca_pem: bytes, ca_sha256: str,
                generate_key: bool) -> tuple[bytes | None, bool]:
    """Create or complete one kit; return its public-key line (old flow) and whether it is new.

    A kit holds ``ca.pem`` and ``client.toml``; only with ``generate_key`` (the old flow,
    where the coordinator makes and therefore holds the institution's key) also
    ``node.key`` and ``node.pub``. An existing kit is completed, never overwritten.
    """
    key_path, existed = kit / "node.key", kit.exists()
    mkdir(kit, private=True)
    pub = None
    files = {"ca.pem": ca_pem}
    if key_path.exists() or generate_key:
        if key_path.exists():
            key = load_key(key_path, ssh=True)
        elif (kit / "node.pub").exists():
            raise ProvisionError(f"Kit {kit} has node.pub but no node.key; restore node.key, "
                                 "or remove the kit folder and its allow-list entry")
        else:
            key = new_key(key_path, serialization.PrivateFormat.OpenSSH)
        pub = public_line(key.public_key(), name)
        files["node.pub"] = pub
    files["client.toml"] = client_toml(name, superlink, ca_sha256,
                                       institution_key=pub is None).encode()
    for fname, data in files.items():
        if not (kit / fname).exists():
            write_atomic(kit / fname, data, PUBLIC)
    if (kit / "ca.pem").read_bytes() != ca_pem:
        log.warning("Kit %s holds a different ca.pem than the current CA", kit)
    if existed:
        log.info("Kit for %s already exists; left as it is: %s", name, kit)
    return pub, not existed


def _check(hosts: list[str], institutions: list[str], port: int) -> tuple[list, list]:
    names: list[str] = []
    for raw in institutions:
        if not _NAME.fullmatch(raw):
            raise ProvisionError(f"Invalid institution name {raw!r}: use 1-63 letters, digits, "
                                 "'.', '_' or '-', starting with a letter or digit")
        if raw.lower() in names:
            raise ProvisionError(f"Duplicate institution name {raw!r}")
        names.append(raw.lower())
    clean: list[str] = []
    for raw in hosts:
        host = raw.strip().strip("[]").lower()
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            if not _DNS.fullmatch(host):
                raise ProvisionError(f"Invalid host name {raw!r}: give a DNS name or IP "
                                     "address without scheme or port") from None
        clean += [] if host in clean else [host]
    if not clean:
        raise ProvisionError("Give at least one public host name of the SuperLink")
    if not 0 < port < 65536:
        raise ProvisionError(f"Invalid port {port}")
    return clean, names


def _institution_keys(names: list[str], public_keys: Mapping[str, Path],
                      index: dict[str, dict], generate_keys: bool,
                      expected: Mapping[str, int]) -> dict[str, bytes | None]:
    """Each institution's public-key line from its own file (None: from its kit or entry).

    Everything is checked before anything is written.
    """
    unknown = sorted({k.lower() for k in [*public_keys, *expected]} - set(names))
    if unknown:
        raise ProvisionError(f"--public-key / --expected-examples for {unknown}, which is not "
                             "among the --institution names")
    if generate_keys and public_keys:
        raise ProvisionError("--public-key and --generate-keys-at-coordinator exclude each "
                             "other: the institution makes its key, or (old flow) you do")
    for name, count in expected.items():
        if count < 1:
            raise ProvisionError(f"--expected-examples {count} for {name!r}: give a whole "
                                 "number ≥ 1")
    lines: dict[str, bytes | None] = {}
    for name in names:
        path = {k.lower(): v for k, v in public_keys.items()}.get(name)
        if path is None:
            if name not in index and not generate_keys:
                raise ProvisionError(
                    f"institution {name!r} has no --public-key: the institution creates its "
                    "key pair with `flower-client keygen` and sends you node.pub (or, the old "
                    "flow, --generate-keys-at-coordinator, which leaves its private key "
                    "with you)")
            lines[name] = None
            continue
        key = read_public_key(path)
        fp = public_key_fingerprint(key)
        if name in index and index[name]["sha256"] != fp:
            raise ProvisionError(
                f"institution {name!r} is already on the allow-list with key "
                f"{index[name]['sha256']}, not {fp} ({path}); to replace its key, remove its "
                "entry from allowlist.json and its .pub file, then provision it again")
        lines[name] = public_line(key, name)
    return lines


def provision(out_dir: Path, hosts: list[str], institutions: list[str], port: int = 9092, *,
              public_keys: Mapping[str, Path] | None = None,
              expected_examples: Mapping[str, int] | None = None,
              generate_keys: bool = False) -> Provisioned:
    """Create or extend the coordinator's CA, server certificate, allow-list and kits.

    Parameters
    ----------
    out_dir
        Output folder, created if needed; see the module docstring for layout and re-runs.
    hosts
        Public host names or IP addresses of the SuperLink; the first one goes into each
        kit's ``superlink`` address. ``localhost`` and ``127.0.0.1`` are always added.
    institutions
        Institution names, ``[a-z0-9][a-z0-9._-]{0,62}``, case-insensitive and stored in
        lower case. Existing entries and kits are kept; new names get a kit.
    port
        SuperLink Fleet API port written into each ``client.toml``.
    public_keys
        Each new institution's public key file (``node.pub`` from ``flower-client
        keygen``). Its private key stays at the institution; the kit holds no key.
    expected_examples
        Training examples each institution is expected to declare (allow-list entry).
    generate_keys
        Old flow: the coordinator generates each new institution's key and puts it in
        the kit, so it holds that key and could impersonate the institution.

    Returns
    -------
    Provisioned
        Paths of everything written or reused.
    """
    hosts, names = _check(hosts, institutions, port)
    expected = {k.lower(): v for k, v in (expected_examples or {}).items()}
    out_dir = Path(out_dir)
    allow_dir, kits_dir = out_dir / "allowlist", out_dir / "kits"
    index_path = allow_dir / INDEX
    index = read_index(index_path) if index_path.exists() else {}
    lines = _institution_keys(names, public_keys or {}, index, generate_keys, expected)
    ca_key, ca = ensure_ca(mkdir(out_dir / "ca", private=True))
    server_cert, server_key = ensure_server(mkdir(out_dir / "server", private=True),
                                             hosts, ca_key, ca)
    mkdir(allow_dir), mkdir(kits_dir, private=True)
    superlink = _superlink(hosts[0], port)
    ca_pem, ca_sha256 = ca.public_bytes(_PEM), ca_fingerprint(ca)
    kits: dict[str, Path] = {}
    created: list[str] = []
    for name in names:
        kit, pub_path = kits_dir / name, allow_dir / f"{name}.pub"
        if generate_keys and name in index and not kit.exists():
            raise ProvisionError(f"{name!r} is on the allow-list but its kit {kit} is missing; "
                                 f"remove its entry from {index_path} and {pub_path} to issue "
                                 "a new key (and unregister the old node)")
        kit_pub, new = _ensure_kit(kit, name, superlink, ca_pem, ca_sha256,
                                   generate_keys and name not in index)
        kits[name], pub = kit, lines[name] or kit_pub
        created += [name] if new else []
        if lines[name] and kit_pub and lines[name] != kit_pub:
            raise ProvisionError(f"Kit {kit} holds a coordinator-made key for {name!r} that is "
                                 "not the --public-key given; remove the old kit first")
        if pub is None and not pub_path.is_file():
            raise ProvisionError(f"{pub_path} is missing; give {name!r}'s --public-key again")
        pub = pub or pub_path.read_bytes()
        fp = public_key_fingerprint(serialization.load_ssh_public_key(pub.strip()))
        if name in index and index[name]["sha256"] != fp:
            raise ProvisionError(f"Allow-list entry for {name!r} does not match its kit's key "
                                 f"({index[name]['sha256']} vs {fp}); resolve this by hand")
        if not pub_path.exists():
            write_atomic(pub_path, pub, PUBLIC)
        elif key_file_fingerprint(pub_path) != fp:
            raise ProvisionError(f"{pub_path} does not match the key of {name!r}")
        entry = {"public-key": pub_path.name, "sha256": fp, "expected-examples":
                 expected.get(name, index.get(name, {}).get("expected-examples"))}
        if index.get(name) != entry:
            index[name] = entry
            write_index(index_path, index)
    return Provisioned(out_dir / "ca" / "ca.pem", server_cert, server_key, index_path, kits,
                       tuple(created), ca_sha256)


def _pairs(flag: str, values: list, names: list[str]) -> dict[str, object]:
    """Pair the n-th ``flag`` value with the n-th --institution."""
    if values and len(values) != len(names):
        raise ProvisionError(f"give one {flag} per --institution, in the same order (got "
                             f"{len(names)} institution(s) and {len(values)} {flag})")
    return dict(zip(names, values, strict=False))


def _next_steps(out: Path, hosts: list[str], port: int, result: Provisioned,
                generated: bool) -> str:
    """The commands both sides run next, for the host and port the kits were made for."""
    listen = "127.0.0.1" if all(h.lower() in _LOOPBACK for h in hosts) else "0.0.0.0"
    lines = [f"Next steps (the kits dial {_superlink(hosts[0], port)}):",
             "  coordinator: issue the agreement for the run's flags (RUN FLAGS, e.g. "
             "--labels labels.txt --num-rounds 5), then run under it with the same flags:",
             f"    flower-server agreement --pki {out} --name FEDERATION --out agreement.json "
             "RUN FLAGS",
             f"    flower-server --pki {out} --host {listen} --port {port} "
             "--agreement agreement.json RUN FLAGS",
             "  each institution, in " + ("its kit folder (it holds the key made here)"
                                         if generated else
                                         "the folder holding its node.key (from `flower-client "
                                         "keygen`), after copying in the kit's ca.pem and "
                                         "client.toml") + ", with client.toml's data settings "
             "edited:",
             "    flower-client --config client.toml --check   # prints the CA fingerprint: "
             f"it must be {result.ca_sha256}",
             "    flower-client approve agreement.json --config client.toml   # --yes when "
             "there is no terminal",
             "    flower-client --config client.toml"]
    return "\n".join(lines)


def _superlink(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    """Command line: ``flower-server provision --out DIR --host H --institution NAME ...``."""
    parser = argparse.ArgumentParser(
        prog="flower-server provision", description=(__doc__ or "").splitlines()[0],
        epilog="Each institution runs `flower-client keygen` and sends you its node.pub; you "
        "compare its fingerprint with the institution's out of band.")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--host", action="append", required=True,
                        help="public host name or IP of the SuperLink, written into every "
                        "kit (repeatable; the first one is what institutions dial)")
    parser.add_argument("--port", type=int, default=9092,
                        help="public port institutions dial (flower-server --port); written "
                        "into every kit")
    parser.add_argument("--institution", action="append", default=[],
                        help="institution name (repeatable)")
    parser.add_argument("--public-key", action="append", type=Path, default=[],
                        help="the institution's node.pub from `flower-client keygen`, one per "
                        "--institution in the same order")
    parser.add_argument("--expected-examples", action="append", type=int, default=[],
                        help="training examples the institution is expected to declare, one "
                        "per --institution in the same order (optional)")
    parser.add_argument("--generate-keys-at-coordinator", action="store_true",
                        help="OLD FLOW, not recommended: generate each new institution's "
                        "private key here and put it in its kit. You then hold every "
                        "institution's key and could impersonate it; send each kit over a "
                        "secure channel and delete your copy")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        keys = _pairs("--public-key", args.public_key, args.institution)
        expected = _pairs("--expected-examples", args.expected_examples, args.institution)
        result = provision(args.out, args.host, args.institution, args.port,
                           public_keys=keys, expected_examples=expected,
                           generate_keys=args.generate_keys_at_coordinator)
        allowed = allowlist_entries(args.out) if result.kits else {}
    except ProvisionError as err:
        log.error("%s", err)
        return 2
    log.info("CA fingerprint (SHA-256) %s: tell every institution by a second channel "
             "(phone, in person); its `flower-client --check` prints the same", result.ca_sha256)
    for name in result.kits:
        entry = allowed[name]
        log.info("allow-list: %s key %s, expected examples %s (flower-server registers it at "
                 "start)", name, entry.sha256, entry.expected_examples or "not given")
    for name in result.created:
        if (result.kits[name] / "node.key").exists():
            log.warning("kit %s holds %s's PRIVATE key, made here (--generate-keys-at-"
                        "coordinator): send it over a secure channel, then delete your copy",
                        result.kits[name], name)
        else:
            log.info("send %s its kit %s (ca.pem, client.toml; no private key)", name,
                     result.kits[name])
    hosts = [h.strip().strip("[]") for h in args.host]
    log.info("%s", _next_steps(args.out, hosts, args.port, result,
                               args.generate_keys_at_coordinator))
    return 0
