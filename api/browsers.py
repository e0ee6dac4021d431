"""What a web page in a browser may do against this server.

A browser lets any site the user visits send requests to `http://127.0.0.1:PORT`. Three checks keep such a page from
using the model, reading its answers or changing state:

- **Host** (DNS rebinding: a page whose own name resolves to 127.0.0.1 talks to us "same-origin"): bound to loopback,
  the `Host` header must be a loopback name or one of `--allowed-hosts`.
- **Origin**: a request that carries one is served only for loopback pages, the page's own server (same origin) and
  `--cors-origins`; anything else is a 403 before the handler runs, so even "simple" requests a browser sends without
  a preflight do nothing. Allowed origins get CORS headers, so their pages can read the answers. `null` (a page
  opened from a file, like the original project's UI) is not allowed unless listed: any site can send `Origin: null`
  from a sandboxed iframe.
- **State-changing GETs** (`GET /clear`, which an `<img>` tag can send with no `Origin`): refused when the `Referer` or
  `Sec-Fetch-Site` says another site sent it.

JSON bodies must say `Content-Type: application/json` (415 otherwise, see `api.http.read_body`): a browser sends that
only after a CORS preflight, which the Origin check answers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from api.errors import error_response

LOOPBACK_NAMES = frozenset({"localhost", "::1"})
STATE_CHANGING_GETS = frozenset({"/clear"})
EXPOSED_HEADERS = "X-Request-ID, Retry-After"
PREFLIGHT_MAX_AGE = "600"
ALLOWED_ORIGIN = web.RequestKey("allowed_origin", str)


def host_name(host: str) -> str:
    """The name in a `Host` header or an origin's netloc, lower case, without port, brackets or a final dot."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8800
        return host[1 : host.find("]")] if "]" in host else host
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def is_loopback(name: str) -> bool:
    """localhost, ::1 or any address in 127.0.0.0/8."""
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class BrowserPolicy:
    """The three checks' settings, from the command line."""

    bound_to_loopback: bool  # --host is a loopback address: every Host header is checked
    allowed_hosts: tuple[str, ...] = ()  # names besides loopback ones; ".example.com" includes its subdomains
    cors_origins: tuple[str, ...] = ()  # origins allowed besides loopback ones, "null" too if listed; "*": every one

    @classmethod
    def of(cls, bind_host: str, allowed_hosts: Iterable[str], cors_origins: Iterable[str]) -> BrowserPolicy:
        return cls(
            is_loopback(host_name(bind_host)),
            tuple(h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip()),
            tuple(o.strip().lower().rstrip("/") for o in cors_origins if o.strip()),
        )

    @property
    def any_origin(self) -> bool:
        return "*" in self.cors_origins

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request's `Host` header names this server. No header at all (HTTP/1.0) cannot come from a
        browser."""
        if host is None or "*" in self.allowed_hosts:
            return True
        if not self.bound_to_loopback and not self.allowed_hosts:
            return True
        name = host_name(host)
        return is_loopback(name) or any(
            name == allowed or (allowed.startswith(".") and name.endswith(allowed)) for allowed in self.allowed_hosts
        )

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """Whether a page from `origin` may use the server that the request's `host` names."""
        origin = origin.strip().lower().rstrip("/")
        if self.any_origin or origin in self.cors_origins:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False
        if is_loopback(host_name(parts.netloc)):
            return True
        return host is not None and _netloc(parts.scheme, parts.netloc) == _netloc(parts.scheme, host)

    def refusal(self, request: web.Request) -> str | None:
        """Why a request must be refused (403), or None when it may go on."""
        host = request.headers.get("Host")
        if not self.host_allowed(host):
            return f"the Host header {host!r} does not name this server (add it with --allowed-hosts)"
        origin = request.headers.get("Origin")
        if origin is not None:
            if self.origin_allowed(origin, host):
                return None
            if origin.strip().lower() == "null":
                return "pages opened from a file (Origin: null) may use this server only with --cors-origins null"
            return f"pages from {origin!r} may not use this server (allow them with --cors-origins)"
        if request.method == "GET" and request.path in STATE_CHANGING_GETS and self._sent_by_another_site(request):
            return "another site's page may not send this request (use POST from your own client)"
        return None

    def _sent_by_another_site(self, request: web.Request) -> bool:
        """What a request without an Origin says of the page that sent it (an `<img>` sends only these)."""
        referer = request.headers.get("Referer")
        if referer is not None:
            parts = urlsplit(referer)
            return not self.origin_allowed(f"{parts.scheme}://{parts.netloc}", request.headers.get("Host"))
        return request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site")


def _netloc(scheme: str, netloc: str) -> str:
    """host:port with the scheme's default port filled in, for comparing an origin with a Host header."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        has_port = netloc.rfind("]") < netloc.rfind(":")
    else:
        has_port = ":" in netloc
    return netloc if has_port else f"{netloc}:{443 if scheme == 'https' else 80}"


def browser_guard(policy: BrowserPolicy) -> Any:
    """Middleware: the Host and Origin checks, and CORS preflights answered before routing reaches a handler."""

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if (why := policy.refusal(request)) is not None:
            return error_response(request, 403, why, code="forbidden_origin")
        origin = request.headers.get("Origin")
        if origin is None:
            response: web.StreamResponse = await handler(request)
            return response
        request[ALLOWED_ORIGIN] = "*" if policy.any_origin else origin
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return preflight(request)
        response = await handler(request)
        return response

    return guard


def preflight(request: web.Request) -> web.Response:
    """A CORS preflight from an allowed origin: the method and headers it asks for, for ten minutes."""
    headers = {
        "Access-Control-Allow-Methods": request.headers["Access-Control-Request-Method"],
        "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
    }
    if asked := request.headers.get("Access-Control-Request-Headers"):
        headers["Access-Control-Allow-Headers"] = asked
    return web.Response(status=204, headers=headers)


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: an allowed origin may read the answer (streams too: their headers go out here)."""
    response.headers.add("Vary", "Origin")
    if (origin := request.get(ALLOWED_ORIGIN)) is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
