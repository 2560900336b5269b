"""The public gateway holds under abuse by peers that are not institutions.

A real gateway process (``python -m fedsilo.server.gateway``) in front of a stand-in
SuperLink that counts what reaches it: unsigned or stale requests are answered 401
before their body is read, an oversized body is refused with bounded memory, a slow
body or silent connection is cut off, connections beyond the limit get 503.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from base64 import b64encode
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.supercore.date import now
from flwr.supercore.primitives.asymmetric import sign_message
from support import closed_port

from fedsilo.common.certs import public_key_fingerprint
from fedsilo.common.processes import child_env, free_port, stop_group, wait_for_port
from fedsilo.server.allowlist import public_line, write_index
from fedsilo.server.gateway import authentication_problem, default_body_cap
from fedsilo.server.provision import provision

pytestmark = pytest.mark.slow
CAP = 2 << 20  # a 2 MiB cap keeps the test small


def _signed(key: ec.EllipticCurvePrivateKey, age: float = 0.0) -> dict[str, str]:
    """Flower's SuperNode signature headers (as its HTTP interceptor writes them)."""
    stamp = (now() - timedelta(seconds=age)).isoformat()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"flwr-public-key": b64encode(pem).decode(), "flwr-timestamp": stamp,
            "flwr-signature": b64encode(sign_message(key, stamp.encode())).decode()}


class _Upstream(BaseHTTPRequestHandler):
    seen: list[int] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        size = int(self.headers.get("content-length", 0))
        self.rfile.read(size)
        _Upstream.seen.append(size)
        out = json.dumps({"bytes": size}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("gateway")
    key = ec.generate_private_key(ec.SECP384R1())
    (root / "allowlist").mkdir()
    (root / "allowlist" / "hospital-a.pub").write_bytes(public_line(key.public_key(), "a"))
    write_index(root / "allowlist" / "allowlist.json", {"hospital-a": {
        "public-key": "hospital-a.pub", "sha256": public_key_fingerprint(key.public_key()),
        "expected-examples": None}})
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsilo.server.gateway", "--listen", f"127.0.0.1:{port}",
         "--upstream", f"http://127.0.0.1:{upstream.server_address[1]}", "--insecure",
         "--allowlist", str(root), "--max-body", str(CAP), "--idle-timeout", "1",
         "--read-timeout", "3", "--max-connections", "4"],
        env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True)
    wait_for_port(proc, port, 30, "the gateway")
    yield port, key, proc
    stop_group(proc)
    upstream.shutdown()


def _memory(proc: subprocess.Popen, field: str = "VmHWM") -> int:
    """Bytes of ``field`` in the process's /proc status (VmHWM: peak RSS, VmRSS: now)."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def _request(port: int, headers: dict[str, str], body: bytes = b"",
             length: int | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    lines = ["POST /v1/fleet/push-object HTTP/1.1", "host: x",
             f"content-length: {len(body) if length is None else length}",
             *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def _answer(sock: socket.socket) -> tuple[int, bool]:
    """Status code, and whether the gateway then closed the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1])
    try:
        while sock.recv(65536):
            pass
        closed = True
    except ConnectionResetError:  # closed with our unread bytes still in its buffer
        closed = True
    except TimeoutError:
        closed = False
    sock.close()
    return status, closed


def test_a_signed_request_passes(gateway):
    port, key, _ = gateway
    assert _answer(_request(port, _signed(key), b"x" * 1000))[0] == 200
    assert _Upstream.seen[-1] == 1000


@pytest.mark.parametrize("what", ["unsigned", "stale", "foreign key", "bad signature"])
def test_an_unauthenticated_peer_is_dropped_before_its_body_is_read(gateway, what):
    port, key, proc = gateway
    headers = {"unsigned": {}, "stale": _signed(key, age=3600),
               "foreign key": _signed(ec.generate_private_key(ec.SECP384R1())),
               "bad signature": {**_signed(key), "flwr-signature": b64encode(b"0" * 64).decode()}
               }[what]
    seen = len(_Upstream.seen)
    sock = _request(port, headers, length=400 << 20)  # 400 MB announced, none sent
    assert _answer(sock) == (401, True)
    assert len(_Upstream.seen) == seen


def test_a_400_mb_body_is_refused_with_bounded_memory(gateway):
    port, key, proc = gateway
    before, seen = _memory(proc), len(_Upstream.seen)
    sock = _request(port, _signed(key), length=400 << 20)
    sent = 0
    try:
        while sent < 8 << 20:  # a few MB of the 400 announced, until the gateway hangs up
            sock.sendall(b"\0" * (1 << 20))
            sent += 1 << 20
    except OSError:
        pass
    assert _answer(sock)[0] == 413
    assert _memory(proc) - before < 32 << 20  # never buffered
    assert len(_Upstream.seen) == seen


def test_a_chunked_body_is_cut_at_the_cap(gateway):
    port, key, proc = gateway
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = ["POST /v1/fleet/push-object HTTP/1.1", "host: x", "transfer-encoding: chunked",
            *(f"{k}: {v}" for k, v in _signed(key).items())]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    try:
        for _ in range(8):  # 8 MiB offered against a 2 MiB cap
            sock.sendall(b"100000\r\n" + b"\0" * (1 << 20) + b"\r\n")
    except OSError:
        pass
    assert _answer(sock)[0] == 413


def test_a_slow_body_is_cut_off_at_the_timeout(gateway):
    port, key, _ = gateway
    sock = _request(port, _signed(key), length=1000)
    status = None
    for _ in range(40):  # one byte every 0.25 s would take 250 s for the whole body
        try:
            sock.sendall(b"x")
        except OSError:
            break
        sock.settimeout(0.25)
        try:
            head = sock.recv(65536)
        except TimeoutError:
            continue
        status = int(head.split(b" ", 2)[1]) if head else None
        break
    assert status == 408


def test_a_silent_connection_is_closed_and_the_limit_frees_up(gateway):
    port, key, _ = gateway
    idle = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(6)]
    time.sleep(0.3)
    assert _answer(_request(port, _signed(key), b"x"))[0] == 503  # 4 connections at most
    for sock in idle:  # the gateway hangs up on each silent connection
        assert sock.recv(1) == b""
        sock.close()
    assert _answer(_request(port, _signed(key), b"x"))[0] == 200


def test_header_checks_name_the_problem():
    key = ec.generate_private_key(ec.SECP256R1())
    allowed = {public_key_fingerprint(key.public_key())}
    assert authentication_problem(_signed(key), allowed) is None
    assert "not fresh" in authentication_problem(_signed(key, age=-60), allowed)
    assert "allow-list" in authentication_problem(_signed(key), set())
    assert "no SuperNode" in authentication_problem({}, allowed)
    assert default_body_cap(1000) < default_body_cap(10**9) == default_body_cap()


def test_a_key_off_the_allow_list_gets_flowers_activation_refusal(gateway):
    """The SuperNode reports what the SuperLink would have said (flower-client reads it)."""
    port, _, _ = gateway
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = ["POST /v1/fleet/activate-node HTTP/1.1", "host: x", "content-length: 400000000",
            *(f"{k}: {v}" for k, v in _signed(ec.generate_private_key(ec.SECP384R1())).items())]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 412") and b"Failed to activate SuperNode" in answer


def _short(context: ssl.SSLContext, port: int, request: bytes, reset: bool) -> int:
    """One TLS connection: send ``request``, read the status, close (``reset``: with RST)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    if reset:  # an abrupt close: the gateway sees a reset, not an orderly end
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(request)
        return int(sock.recv(64).split(b" ", 2)[1])


@pytest.mark.parametrize(("request_bytes", "reset", "status"), [
    (b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
     False, 401),  # refused and closed by the gateway
    (b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n", True, 502),  # kept alive, then reset
], ids=["refused", "reset-after-keep-alive"])
def test_a_closed_tls_connection_frees_its_memory_at_once(tmp_path, request_bytes, reset,
                                                          status):
    # Timers held each closed connection's protocol and TLS state for the idle timeout:
    # the header deadline's always, uvicorn's keep-alive one after a reset. Short
    # connections grew the gateway by about 45 KB each, without bound at a steady rate
    # (the abuse bench's 2.3x peak).
    port = free_port()
    pki = tmp_path / "pki"
    provision(pki, ["localhost"], ["hospital-a"], port=port, generate_keys=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsilo.server.gateway", "--listen", f"127.0.0.1:{port}",
         "--upstream", f"https://127.0.0.1:{closed_port()}", "--allowlist", str(pki),
         "--ssl-certfile", str(pki / "server" / "server.pem"),
         "--ssl-keyfile", str(pki / "server" / "server.key"), "--ca", str(pki / "ca" / "ca.pem"),
         "--idle-timeout", "60"],
        env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True)
    context = ssl.create_default_context(cafile=pki / "ca" / "ca.pem")

    def one(_: int) -> int:
        return _short(context, port, request_bytes, reset)

    try:
        wait_for_port(proc, port, 30, "the gateway")
        with ThreadPoolExecutor(50) as pool:
            assert set(pool.map(one, range(100))) == {status}  # warm-up
            before = _memory(proc, "VmRSS")
            assert set(pool.map(one, range(1000))) == {status}
            grown = _memory(proc, "VmRSS") - before
    finally:
        stop_group(proc)
    assert grown < 15 << 20, f"the gateway grew by {grown >> 20} MB over 1000 connections"
