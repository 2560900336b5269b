"""The coordinator's public listener: the Fleet API only, never Control or Runtime.

Flower's SuperLink serves its Fleet (institutions), Control (submit runs, register
keys) and Runtime APIs on one port, and open-source Flower does not authenticate the
Control API: whoever reaches that port can run code on every institution. fedsilo
therefore binds the SuperLink to loopback and puts this gateway on the public
address. It terminates TLS with the coordinator's server certificate and forwards
only ``POST /v1/fleet/*`` and ``GET /health`` to the SuperLink (over TLS, verified
against the federation CA); every other request gets ``403``.

It holds under abuse by peers that are not institutions (:class:`Limits`):

- with ``--allowlist``, a Fleet request must carry Flower's SuperNode signature headers
  (``flwr-public-key``, ``flwr-timestamp``, ``flwr-signature``, as
  ``flwr.supernode.node_auth_http_interceptor`` writes them) for an allow-listed key and
  a fresh timestamp; anything else is answered ``401`` *before its body is read*. (The
  SuperLink still checks the node id the body claims against the key.)
- a body larger than ``max_body`` is refused (``413``) from its ``Content-Length`` or as
  soon as it grows past the cap, never buffered; the default is the largest request a
  SuperNode makes: one Flower array chunk (or the whole update, if smaller) plus
  headroom;
- a request whose headers or body stall longer than ``idle_timeout``, or whose body
  takes longer than ``read_timeout``, is cut off (``408``, connection closed);
- at most ``max_connections`` connections at once (``503`` beyond), and as many to
  the SuperLink.

Run as ``python -m fedsilo.server.gateway --listen HOST:PORT --upstream
https://127.0.0.1:PORT --ssl-certfile ... --ssl-keyfile ... --ca ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import contextlib
import datetime
import logging
import ssl
import sys
from base64 import b64decode
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.constant import (
    FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE,
    SYSTEM_TIME_TOLERANCE,
    TIMESTAMP_HEADER,
    TIMESTAMP_TOLERANCE,
)
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from flwr.supercore.date import now
from flwr.supercore.error.base import ApiErrorCode, FlowerError
from flwr.supercore.error.catalog import API_ERROR_MAP
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedsilo.common.certs import public_key_fingerprint
from fedsilo.server.allowlist import allowlist_entries

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
HEALTH_PATH = "/health"
#: Room for a request's protobuf framing and headers beside its largest array chunk.
HEADROOM = 1 << 20
#: Where a SuperNode first presents its key: a key off the allow-list is told what the
#: SuperLink would tell it (Flower's own error), so the institution sees the usual cause.
ACTIVATE_PATH = FLEET_PREFIX + "activate-node"
NOT_LISTED = "the node key is not on the allow-list"
# Hop-by-hop headers (RFC 9110 §7.6.1) and those the proxy recomputes.
_DROP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
         "trailer", "transfer-encoding", "upgrade", "host", "content-length"}


def default_body_cap(update_bytes: int | None = None) -> int:
    """The largest body a SuperNode sends: one object per request, arrays in chunks.

    Flower pushes one object per Fleet request and splits arrays into chunks of
    ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` bytes, so no request carries more than one
    chunk, or the whole update (``update_bytes``) when that is smaller, plus headroom.
    """
    chunk = FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    return (chunk if update_bytes is None else min(chunk, update_bytes)) + HEADROOM


@dataclass(frozen=True)
class Limits:
    """What one peer may take from the gateway."""

    max_body: int = default_body_cap()
    read_timeout: float = 60.0  # a whole body must arrive within this
    idle_timeout: float = 15.0  # longest silence while headers or a body arrive
    max_connections: int = 64


def is_public_route(method: str, path: str) -> bool:
    """Whether a request may pass the gateway (Fleet API or health check)."""
    if method == "POST" and path.startswith(FLEET_PREFIX) and ".." not in path:
        return True
    return method == "GET" and path in (HEALTH_PATH, HEALTH_PATH + "/")


def authentication_problem(headers: Mapping[str, str], allowed: set[str]) -> str | None:
    """Why a Fleet request's SuperNode signature headers are not acceptable, or None.

    ``allowed`` holds the OpenSSH fingerprints of the allow-listed node keys; the
    timestamp must be as fresh as the SuperLink requires and signed by that key.
    """
    try:
        pem = b64decode(headers[FLEET_HTTP_PUBLIC_KEY_HEADER], validate=True)
        signature = b64decode(headers[FLEET_HTTP_SIGNATURE_HEADER], validate=True)
        stamp = headers[TIMESTAMP_HEADER]
        key = bytes_to_public_key(pem)
        if not isinstance(key, ec.EllipticCurvePublicKey) \
                or public_key_fingerprint(key) not in allowed:
            return NOT_LISTED
        age = (now() - datetime.datetime.fromisoformat(stamp)).total_seconds()
        if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
            return "the signed timestamp is not fresh"
        if not verify_signature(key, stamp.encode("ascii"), signature):
            return "the signature does not match the node key"
    except KeyError:
        return "no SuperNode signature headers"
    except (ValueError, TypeError, UnicodeError, binascii.Error):
        return "malformed SuperNode signature headers"
    return None


class _Refused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def _refuse(status: int, detail: str) -> Response:
    """An error answer that also closes the connection (an unread body is dropped)."""
    return JSONResponse({"error": detail}, status_code=status, headers={"connection": "close"})


def _activation_failed() -> Response:
    """Flower's own answer to a SuperNode whose key the SuperLink does not know."""
    code = ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED
    spec = API_ERROR_MAP[code]
    return JSONResponse(FlowerError(code, spec.public_message).to_json(spec.public_message),
                        status_code=spec.http_status_code,
                        headers={**(spec.http_headers or {}), "connection": "close"})


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body, at most ``limits.max_body`` bytes, read within the timeouts.

    Raises
    ------
    _Refused
        413 for a body over the cap (from ``Content-Length`` before reading, or as it
        grows), 408 when it stalls or takes too long, 400 for a bad length.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _Refused(400, "bad Content-Length")
        if int(declared) > limits.max_body:
            raise _Refused(413, f"body over {limits.max_body} bytes")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.read_timeout
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        wait = min(limits.idle_timeout, deadline - loop.time())
        try:
            if wait <= 0:
                raise TimeoutError
            chunk = await asyncio.wait_for(anext(stream), wait)
        except StopAsyncIteration:
            return b"".join(chunks)
        except TimeoutError:
            raise _Refused(408, "the body arrived too slowly") from None
        size += len(chunk)
        if size > limits.max_body:
            raise _Refused(413, f"body over {limits.max_body} bytes")
        chunks.append(chunk)


def create_app(upstream: str, verify: ssl.SSLContext | bool, limits: Limits = Limits(),
               allowed: set[str] | None = None) -> Starlette:
    """Build the gateway ASGI app forwarding allowed requests to ``upstream``.

    ``allowed``: fingerprints of the allow-listed node keys (None: no signature check,
    for ``--insecure`` tests).
    """
    client = httpx.AsyncClient(
        base_url=upstream, verify=verify,
        timeout=httpx.Timeout(limits.read_timeout, connect=10.0),
        limits=httpx.Limits(max_connections=limits.max_connections))

    async def forward(request: Request) -> Response:
        path = request.url.path
        peer = request.client.host if request.client else "?"
        if not is_public_route(request.method, path):
            log.warning("refused %s %s from %s (not the Fleet API)", request.method, path, peer)
            return JSONResponse(
                {"error": "forbidden", "detail": "only the Fleet API is served on this "
                 "address; the Control API is reachable from the coordinator only"},
                status_code=403, headers={"connection": "close"})
        try:
            if allowed is not None and path.startswith(FLEET_PREFIX) and (
                    problem := authentication_problem(request.headers, allowed)):
                if problem == NOT_LISTED and path == ACTIVATE_PATH:
                    log.warning("refused %s from %s: %s", path, peer, problem)
                    return _activation_failed()
                raise _Refused(401, problem)
            body = await read_body(request, limits)
        except _Refused as refused:
            log.warning("refused %s from %s: %s", path, peer, refused.detail)
            return _refuse(refused.status, refused.detail)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        try:
            upstream_response = await client.request(
                request.method, path, params=request.query_params, headers=headers,
                content=body,
            )
        except httpx.HTTPError as err:
            log.warning("SuperLink unreachable for %s: %s", path, err)
            return JSONResponse({"error": "bad gateway"}, status_code=502)
        out_headers = {k: v for k, v in upstream_response.headers.items()
                       if k.lower() not in _DROP and k.lower() != "content-encoding"}
        return Response(upstream_response.content, status_code=upstream_response.status_code,
                        headers=out_headers)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)],
                     lifespan=lifespan)


def protocol(idle_timeout: float) -> type[H11Protocol]:
    """Uvicorn's h11 protocol, closing a connection whose request headers stall."""

    class HeaderDeadline(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._deadline = self.loop.call_later(idle_timeout, self._headers_due, transport)

        def connection_lost(self, exc: Exception | None) -> None:
            # Timers hold the protocol and its TLS transport: cancel them with the
            # connection, or every closed connection's memory stays for ``idle_timeout``.
            # uvicorn cancels its keep-alive timer only on a clean close, not on a reset.
            self._deadline.cancel()
            super().connection_lost(exc)
            self._unset_keepalive_if_required()

        def _headers_due(self, transport: asyncio.Transport) -> None:
            if self.cycle is None and not transport.is_closing():
                transport.close()  # not even one request's headers in time

    return HeaderDeadline


def serve(app: Starlette, host: str, port: int, limits: Limits, **ssl_kwargs: str) -> None:
    """Run ``app`` under uvicorn with the connection limits and timeouts."""
    uvicorn.run(app, host=host, port=port, log_level="warning", http=protocol(
        limits.idle_timeout), limit_concurrency=limits.max_connections,
        timeout_keep_alive=int(max(1, limits.idle_timeout)), **ssl_kwargs)


def main(argv: list[str] | None = None) -> int:
    """Serve the gateway until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="public HOST:PORT")
    parser.add_argument("--upstream", required=True, help="SuperLink base URL on loopback")
    parser.add_argument("--ssl-certfile", help="server certificate (omit with --insecure)")
    parser.add_argument("--ssl-keyfile", help="server private key")
    parser.add_argument("--ca", help="CA that signed the SuperLink's certificate")
    parser.add_argument("--allowlist", type=Path, help="the pki folder whose allow-list "
                        "names the node keys whose signed requests are let through")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP (testing only)")
    add_limit_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(message)s")
    host, _, port = args.listen.rpartition(":")
    verify: ssl.SSLContext | bool = False
    ssl_kwargs = {}
    if not args.insecure:
        if not (args.ssl_certfile and args.ssl_keyfile and args.ca):
            parser.error("--ssl-certfile, --ssl-keyfile and --ca are required without --insecure")
        verify = ssl.create_default_context(cafile=args.ca)
        ssl_kwargs = {"ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile}
    allowed = None
    if args.allowlist is not None:
        allowed = {entry.sha256 for entry in allowlist_entries(args.allowlist).values()}
    limits = limits_from(args)
    serve(create_app(args.upstream, verify, limits, allowed), host.strip("[]"), int(port),
          limits, **ssl_kwargs)
    return 0


def add_limit_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The gateway's abuse limits as flags (``prefix``: ``gateway-`` in flower-server)."""
    d = Limits()
    parser.add_argument(f"--{prefix}max-body", type=int, default=d.max_body, metavar="BYTES",
                        help="largest request body (default: one Flower array chunk + 1 MiB)")
    parser.add_argument(f"--{prefix}read-timeout", type=float, default=d.read_timeout,
                        metavar="SECONDS", help="time a whole request body may take")
    parser.add_argument(f"--{prefix}idle-timeout", type=float, default=d.idle_timeout,
                        metavar="SECONDS", help="longest pause in a request's headers or body")
    parser.add_argument(f"--{prefix}max-connections", type=int, default=d.max_connections,
                        metavar="N", help="connections served at once (503 beyond)")


def limits_from(args: argparse.Namespace, prefix: str = "") -> Limits:
    """The :class:`Limits` the flags of :func:`add_limit_arguments` give."""
    key = prefix.replace("-", "_")
    return Limits(getattr(args, f"{key}max_body"), getattr(args, f"{key}read_timeout"),
                  getattr(args, f"{key}idle_timeout"), getattr(args, f"{key}max_connections"))


def limit_flags(limits: Limits) -> list[str]:
    """Command-line flags that give the gateway ``limits``."""
    return ["--max-body", str(limits.max_body), "--read-timeout", str(limits.read_timeout),
            "--idle-timeout", str(limits.idle_timeout),
            "--max-connections", str(limits.max_connections)]


if __name__ == "__main__":
    sys.exit(main())
