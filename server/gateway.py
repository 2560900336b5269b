"""The coordinator's public listener: the Fleet API only, never Control or Runtime.

Flower's SuperLink serves its Fleet (institutions), Control (submit runs, register
keys) and Runtime APIs on one port, and open-source Flower does not authenticate the
Control API: whoever reaches that port can run code on every institution. fedsilo
therefore binds the SuperLink to loopback and puts this gateway on the public
address. It terminates TLS with the coordinator's server certificate and forwards
only ``POST /v1/fleet/*`` and ``GET /health`` to the SuperLink (over TLS, verified
against the federation CA); every other request gets ``403``.

Run as ``python -m fedsilo.server.gateway --listen HOST:PORT --upstream
https://127.0.0.1:PORT --ssl-certfile ... --ssl-keyfile ... --ca ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import ssl
import sys
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
HEALTH_PATH = "/health"
# Hop-by-hop headers (RFC 9110 §7.6.1) and those the proxy recomputes.
_DROP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
         "trailer", "transfer-encoding", "upgrade", "host", "content-length"}


def is_public_route(method: str, path: str) -> bool:
    """Whether a request may pass the gateway (Fleet API or health check)."""
    if method == "POST" and path.startswith(FLEET_PREFIX) and ".." not in path:
        return True
    return method == "GET" and path in (HEALTH_PATH, HEALTH_PATH + "/")


def create_app(upstream: str, verify: ssl.SSLContext | bool) -> Starlette:
    """Build the gateway ASGI app forwarding allowed requests to ``upstream``."""
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=None)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not is_public_route(request.method, path):
            peer = request.client.host if request.client else "?"
            log.warning("refused %s %s from %s (not the Fleet API)", request.method, path, peer)
            return JSONResponse(
                {"error": "forbidden", "detail": "only the Fleet API is served on this "
                 "address; the Control API is reachable from the coordinator only"},
                status_code=403,
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        body = await request.body()
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


def main(argv: list[str] | None = None) -> int:
    """Serve the gateway until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="public HOST:PORT")
    parser.add_argument("--upstream", required=True, help="SuperLink base URL on loopback")
    parser.add_argument("--ssl-certfile", help="server certificate (omit with --insecure)")
    parser.add_argument("--ssl-keyfile", help="server private key")
    parser.add_argument("--ca", help="CA that signed the SuperLink's certificate")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP (testing only)")
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
    app = create_app(args.upstream, verify)
    uvicorn.run(app, host=host.strip("[]"), port=int(port), log_level="warning",
                **ssl_kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
