"""What a web page can do against the server: other sites' pages are refused, loopback pages and files (the original
project's UI) are served with CORS headers, DNS rebinding meets the Host check, JSON routes take only JSON bodies,
state-changing GETs refuse other sites; request ids and paths cannot forge log fields. Through real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import MakeClient

CHAT = {"query": "hi", "max_tokens": 1}
EVIL = "https://evil.example"
LOOPBACK_PAGES = ["http://localhost:5173", "http://127.0.0.1:8000", "http://[::1]:3000"]
JSON_ROUTES = [
    ("/chat", CHAT),
    ("/stream", CHAT),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
]


def host_of(client: Any) -> str:
    return f"127.0.0.1:{client.port}"


async def test_pages_on_other_sites_are_refused_before_anything_runs(make_client: MakeClient) -> None:
    client = await make_client()
    asks = [
        client.post("/chat", json=CHAT, headers={"Origin": EVIL}),
        client.post("/chat", data='{"query": "hi"}', headers={"Origin": EVIL, "Content-Type": "text/plain"}),
        client.post("/stream", json=CHAT, headers={"Origin": EVIL}),
        client.post("/v1/chat/completions", json=JSON_ROUTES[2][1], headers={"Origin": EVIL}),
        client.get("/v1/models", headers={"Origin": EVIL}),
        client.options(
            "/v1/chat/completions",
            headers={"Origin": EVIL, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x"},
        ),
    ]
    for ask in asks:
        resp = await ask
        assert resp.status == 403, await resp.text()
        assert "Access-Control-Allow-Origin" not in resp.headers
        error = (await resp.json())["error"]
        assert error["type"] == "permission_error" and "--cors-origins" in error["message"]
    text = await (await client.get("/metrics")).text()
    assert "chat_prompt_tokens_total 0.0" in text  # the model never ran for them


@pytest.mark.parametrize("origin", [*LOOPBACK_PAGES, "null"])
async def test_loopback_pages_and_listed_origins_may_call_and_read(make_client: MakeClient, origin: str) -> None:
    """The original project's UI served on a loopback port keeps working; opened from a file (`Origin: null`) with
    `--cors-origins null`."""
    client = await make_client(cors_origins=("null",) if origin == "null" else ())
    preflight = await client.options(
        "/stream",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
    )
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    assert preflight.headers["Access-Control-Allow-Methods"] == "POST"
    assert preflight.headers["Access-Control-Allow-Headers"] == "content-type,authorization"
    resp = await client.post("/stream", json=CHAT, headers={"Origin": origin})
    assert resp.status == 200 and b"event: delta" in await resp.read()
    assert resp.headers["Access-Control-Allow-Origin"] == origin and "Origin" in resp.headers["Vary"]
    assert "X-Request-ID" in resp.headers["Access-Control-Expose-Headers"]
    clear = await client.get("/clear", headers={"Origin": origin})
    assert clear.status == 200


async def test_null_origins_are_refused_unless_listed(make_client: MakeClient) -> None:
    """`Origin: null` comes from files, but also from a sandboxed iframe any site can make."""
    client = await make_client()
    resp = await client.post("/chat", json=CHAT, headers={"Origin": "null"})
    assert resp.status == 403 and "--cors-origins null" in (await resp.json())["error"]["message"]
    assert (await client.get("/clear", headers={"Origin": "null"})).status == 403


async def test_cors_origins_widens_and_star_allows_every_page(make_client: MakeClient) -> None:
    client = await make_client(cors_origins=("https://good.example",))
    good = await client.post("/chat", json=CHAT, headers={"Origin": "https://good.example"})
    assert good.status == 200 and good.headers["Access-Control-Allow-Origin"] == "https://good.example"
    assert (await client.post("/chat", json=CHAT, headers={"Origin": EVIL})).status == 403
    assert (await client.post("/chat", json=CHAT, headers={"Origin": "http://localhost:1"})).status == 200
    anyone = await make_client(cors_origins=("*",))
    resp = await anyone.post("/chat", json=CHAT, headers={"Origin": EVIL})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("path", ["/v1/models", "/chat", "/health", "/"])
async def test_dns_rebinding_meets_the_host_check(make_client: MakeClient, path: str) -> None:
    """A page on evil.example whose name now resolves to 127.0.0.1 is "same-origin" to the browser: its requests say
    `Host: evil.example:PORT`, which a server bound to loopback refuses."""
    client = await make_client()
    port = client.port
    method = "POST" if path == "/chat" else "GET"
    body = CHAT if method == "POST" else None
    refused = await client.request(method, path, json=body, headers={"Host": f"evil.example:{port}"})
    assert refused.status == 403 and "--allowed-hosts" in (await refused.json())["error"]["message"]
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    assert (await client.request(method, path, json=body, headers=rebound)).status == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        ok = await client.request(method, path, json=body, headers={"Host": host})
        assert ok.status == 200, host


async def test_allowed_hosts_and_other_bind_addresses(make_client: MakeClient) -> None:
    listed = await make_client(allowed_hosts=("chat.lan", ".corp.example"))
    for host, status in [("chat.lan:8800", 200), ("a.corp.example", 200), ("evil.example", 403), ("localhost", 200)]:
        assert (await listed.get("/v1/models", headers={"Host": host})).status == status, host
    # bound to every address (--host 0.0.0.0): the name users reach it by is theirs to choose...
    anywhere = await make_client(host="0.0.0.0")
    assert (await anywhere.get("/v1/models", headers={"Host": "evil.example"})).status == 200
    # ...and the page the server itself serves there (same origin) may call it; other sites still may not
    page = {"Host": "192.168.1.5:8800", "Origin": "http://192.168.1.5:8800"}
    assert (await anywhere.post("/chat", json=CHAT, headers=page)).status == 200
    assert (await anywhere.post("/chat", json=CHAT, headers={**page, "Origin": EVIL})).status == 403
    # unless --allowed-hosts names them
    named = await make_client(host="0.0.0.0", allowed_hosts=("chat.lan",))
    assert (await named.get("/v1/models", headers={"Host": "evil.example"})).status == 403
    assert (await named.get("/v1/models", headers={"Host": "chat.lan"})).status == 200


async def test_bound_everywhere_with_a_key_other_sites_still_get_403(make_client: MakeClient) -> None:
    client = await make_client(host="0.0.0.0", api_key="k")
    assert (await client.post("/chat", json=CHAT, headers={"Origin": EVIL})).status == 403  # not a 401 to probe
    assert (await client.post("/chat", json=CHAT)).status == 401
    ok = await client.post("/chat", json=CHAT, headers={"Authorization": "Bearer k", "Origin": "http://localhost:1"})
    assert ok.status == 200


@pytest.mark.parametrize(("route", "body"), JSON_ROUTES, ids=[r for r, _ in JSON_ROUTES])
async def test_json_routes_take_only_json_bodies(make_client: MakeClient, route: str, body: dict[str, Any]) -> None:
    """text/plain, forms and multipart are what a page can send without a preflight: 415, and nothing runs."""
    client = await make_client()
    raw = json.dumps(body)
    form = aiohttp.FormData({"query": "hi"})
    multipart = aiohttp.FormData({"query": "hi"})
    multipart.add_field("file", b"x", filename="x.txt")
    sent: list[dict[str, Any]] = [
        {"data": raw, "headers": {"Content-Type": "text/plain"}},
        {"data": raw},  # aiohttp says text/plain for a str
        {"data": form},
        {"data": multipart},
        {"data": raw.encode(), "skip_auto_headers": ["Content-Type"]},
    ]
    for kwargs in sent:
        resp = await client.post(route, **kwargs)
        error = (await resp.json())["error"]
        assert resp.status == 415 and "application/json" in error["message"], kwargs
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        resp = await client.post(route, data=raw, headers={"Content-Type": content_type})
        assert resp.status == 200, content_type
        await resp.read()


async def test_state_changing_gets_from_other_sites_are_refused(make_client: MakeClient) -> None:
    """An `<img src=".../clear">` on another site sends no Origin, only a Referer or Sec-Fetch-Site."""
    client = await make_client()
    for headers in [
        {"Origin": EVIL},
        {"Referer": f"{EVIL}/page.html"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Referer": "http://127.0.0.1.evil.example/"},
    ]:
        resp = await client.get("/clear", headers=headers)
        assert resp.status == 403, headers
    for headers in [{}, {"Referer": f"http://127.0.0.1:{client.port}/"}, {"Sec-Fetch-Site": "same-origin"}]:
        assert (await client.get("/clear", headers=headers)).status == 200, headers
    assert (await client.post("/clear")).status == 200
    assert (await client.post("/clear", headers={"Origin": EVIL})).status == 403


async def test_client_text_cannot_forge_log_fields(make_client: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    client = await make_client()
    caplog.set_level(logging.INFO, logger="access")
    forged = await client.get("/v1/models", headers={"X-Request-ID": "abc status=200 injected=1"})
    assert re.fullmatch(r"[0-9a-f]{32}", forged.headers["X-Request-ID"])  # replaced
    kept = await client.get("/v1/models", headers={"X-Request-ID": "trace-42.A_b"})
    assert kept.headers["X-Request-ID"] == "trace-42.A_b"
    long = await client.get("/v1/models", headers={"X-Request-ID": "x" * 129})
    assert long.headers["X-Request-ID"] != "x" * 129
    await client.get("/v1/models%0Aid=forged%20status=200")
    lines = [r.getMessage() for r in caplog.records if r.name == "access"]
    assert len(lines) == 4 and all("\n" not in line for line in lines)
    assert not any("injected" in line or " id=forged" in line for line in lines), lines
    assert "%0Aid=forged%20status=200 status=404" in lines[3]


ORIGINS = st.sampled_from([None, "null", "http://localhost:9", "http://[::1]", EVIL, "http://localhost.evil.example"])
REFUSED_ORIGINS = ("null", EVIL, "http://localhost.evil.example")
HOSTS = st.sampled_from(["127.0.0.1", "localhost:1", "[::1]:80", "evil.example", "127.0.0.1.nip.io", ""])
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", "a/b+json"])
PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
REQUEST_IDS = st.sampled_from(["ok-1", "a" * 128, "a" * 129]) | PRINTABLE


async def test_fuzzed_headers_are_refused_or_served_never_a_5xx(make_client: MakeClient) -> None:
    client = await make_client()
    cases: list[tuple[str | None, str, str, str]] = []

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(ORIGINS | PRINTABLE, HOSTS | PRINTABLE, CONTENT_TYPES | PRINTABLE, REQUEST_IDS)
    def collect(origin: str | None, host: str, content_type: str, request_id: str) -> None:
        cases.append((origin, host, content_type, request_id))

    collect()
    for origin, host, content_type, request_id in cases:
        headers = {"Host": host, "Content-Type": content_type, "X-Request-ID": request_id}
        if origin is not None:
            headers["Origin"] = origin
        resp = await asyncio.wait_for(client.post("/chat", data=json.dumps(CHAT), headers=headers), 30)
        case = (origin, host, content_type, request_id, resp.status)
        assert resp.status in (200, 400, 403, 415), case
        body = await resp.json()
        assert ("error" in body) == (resp.status != 200), case
        echoed = resp.headers["X-Request-ID"]
        if re.fullmatch(r"[A-Za-z0-9._-]{1,128}", request_id):
            assert echoed == request_id, case
        else:
            assert echoed != request_id and re.fullmatch(r"[0-9a-f]{32}", echoed), case
        host_name = host.rsplit(":", 1)[0] if not host.startswith("[") else host
        if host_name in ("evil.example", "127.0.0.1.nip.io"):
            assert resp.status == 403, case
        if origin in REFUSED_ORIGINS:
            assert resp.status == 403, case
        if resp.status == 200:
            media = content_type.split(";")[0].strip().lower()
            assert media == "application/json" or re.fullmatch(r"application/\S+\+json", media), case
            assert resp.headers.get("Access-Control-Allow-Origin") == origin, case
