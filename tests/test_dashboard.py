"""The operator's dashboard (kvlink/server/static/, served at / by kvlink/server/rest.py) and /v1/limits.

In process (TestClient): the page and its files are served without a token, with a strict
Content-Security-Policy, and load nothing from another host; /v1/limits needs the token and shows the
receiver-wide caps to operators only.

In a real browser (marker `browser`; `make test-browser` installs Debian's chromium): a kvlink-serve
subprocess on a tiny random-weight model with two tenants and an operator, sent messages over real
gRPC (with reference answers, so that the receiver scores them); chromium loads the page with the
token in the URL fragment and shows every message, its config and a plotted point, only the tenant's
own to a tenant, and without a valid token only "token required" / "token refused" and no data. Over
the DevTools protocol: a message sent while the page is open appears at the next poll, the token
leaves the address bar and survives a reload in sessionStorage, and "forget token" takes the data away.
"""

from __future__ import annotations

import asyncio
import html
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from fastapi.testclient import TestClient

from headless import Browser, chromium, dump_dom
from kvlink import wire
from kvlink.cache import prefill
from kvlink.client.sender import ask, transfer
from kvlink.codec import Codec
from kvlink.eval.squad import load_squad
from kvlink.metrics import MetricsRegistry
from kvlink.models import Geometry, LoadedModel, load_model
from kvlink.prompt import context_ids, question_ids
from kvlink.recipe import Recipe, build
from kvlink.server.guard import Guard, Identity
from kvlink.server.rest import DASHBOARD_ASSETS, DASHBOARD_HEADERS, DASHBOARD_PATH, create_app
from kvlink.server.service import KVLinkService
from kvlink.server.store import SessionStore
from netutil import Receiver, free_port

TOKENS = {"alice": "tok+alice/" + "a" * 20, "bob": "tok-bob-" + "b" * 20, "ops": "tok-ops-" + "o" * 20}
"""Alice's has a "+" and a "/", which a URL fragment carries as they are (it is not form-encoded)."""
OPERATORS = {"ops"}
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
"""The one http:// string the files may hold: an XML namespace name (SVG elements), never fetched."""


# --- in process --------------------------------------------------------------------------------------------------
def _app(max_cached: int = 1 << 30) -> TestClient:
    lm = LoadedModel(torch.nn.Linear(2, 2), None, "fake", "f" * 64, Geometry(2, 1, 4, 2))
    tenants = {token: Identity(name, name in OPERATORS) for name, token in TOKENS.items()}
    store = SessionStore(ttl_s=300, max_bytes=max_cached, owner_max_bytes=max_cached // 2)
    guard = Guard(tenants=tenants, max_calls=32, per_peer=3)
    return TestClient(create_app(KVLinkService(lm, store, MetricsRegistry(), guard=guard, max_new_tokens=16)))


def _bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def _references(page: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", page)


def _directives(csp: str) -> dict[str, list[str]]:
    return {d.split()[0]: d.split()[1:] for d in (p.strip() for p in csp.split(";")) if d}


def test_the_page_and_its_files_need_no_token_and_carry_a_strict_csp() -> None:
    with _app() as http:
        assert http.get("/v1/info").status_code == 401  # the data needs the token; the page does not
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        files = [ref for ref in _references(page.text) if ref.startswith(DASHBOARD_PATH + "/")]
        assert {f.rsplit("/", 1)[1] for f in files} == {"dashboard.js", "dashboard.css", "favicon.svg"}
        kinds = {".js": "javascript", ".css": "text/css", ".svg": "image/svg+xml"}
        for reply, path in [(page, "/"), *((http.get(f), f) for f in files)]:
            assert reply.status_code == 200, path
            for name, value in DASHBOARD_HEADERS.items():
                assert reply.headers[name] == value, (path, name)
            if path != "/":
                assert kinds[Path(path).suffix] in reply.headers["content-type"], path
        csp = _directives(page.headers["content-security-policy"])
        assert csp["default-src"] == ["'none'"] and csp["script-src"] == ["'self'"], csp
        assert csp["style-src"] == ["'self'"] and csp["connect-src"] == ["'self'"], csp
        assert csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"], csp
        sources = [v for values in csp.values() for v in values]
        assert not any(v.startswith("'unsafe") or v in ("*", "data:", "blob:") for v in sources), sources
        assert page.headers["x-content-type-options"] == "nosniff"
        assert http.get(f"{DASHBOARD_PATH}/nothing.js").status_code == 404
        for escape in ("/../rest.py", "/%2e%2e/rest.py", "/..%2frest.py"):  # nothing outside static/
            reply = http.get(DASHBOARD_PATH + escape)
            assert reply.status_code in (401, 404) and "create_app" not in reply.text, escape
        assert "/" not in http.get("/openapi.json", headers=_bearer("ops")).json()["paths"]
        # The docs keep their own pages (Swagger's inline bootstrap script): the policy is the dashboard's.
        assert "content-security-policy" not in http.get("/docs", headers=_bearer("ops")).headers


def test_the_dashboard_loads_nothing_from_another_host() -> None:
    """No CDN, no web fonts, no inline script or style (the policy would block them, so they must not be
    needed), and no way for a received text to become markup (textContent only)."""
    names = sorted(p.name for p in DASHBOARD_ASSETS.iterdir())
    assert names == ["dashboard.css", "dashboard.js", "favicon.svg", "index.html"], names
    for path in DASHBOARD_ASSETS.iterdir():
        text = path.read_text()
        urls = set(re.findall(r"""(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s"'<>)]*""", text)) - {SVG_NAMESPACE}
        assert not urls, f"{path.name} names another host: {urls}"
        assert "@import" not in text and "url(" not in text, path.name
    page = (DASHBOARD_ASSETS / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.S)
    assert scripts and all('src="/static/dashboard/' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\sstyle\s*=|<style\b|\son[a-z]+\s*=", page), "inline style or handler"
    for ref in _references(page):
        assert ref == "/docs" or (DASHBOARD_ASSETS / ref.removeprefix(DASHBOARD_PATH + "/")).is_file(), ref
    script = (DASHBOARD_ASSETS / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 'setAttribute("style"', "setAttribute('style'"):  # fmt: skip
        assert sink not in script, sink
    assert "Authorization" in script and "sessionStorage" in script and "replaceState" in script


def test_limits_need_the_token_and_show_the_global_caps_to_operators() -> None:
    with _app(max_cached=1 << 30) as http:
        assert http.get("/v1/limits").status_code == 401
        mine = http.get("/v1/limits", headers=_bearer("alice")).json()
        every = http.get("/v1/limits", headers=_bearer("ops")).json()
        spec = http.get("/openapi.json", headers=_bearer("ops")).json()
    limits = wire.WireLimits()
    assert mine["max_message_bytes"] == limits.max_message_bytes and mine["max_new_tokens"] == 16
    assert mine["max_cached_bytes_per_identity"] == 1 << 29 and mine["session_ttl_s"] == 300
    assert mine["per_peer_concurrency"] == 3 and mine["shared_store"] is False
    hidden = ("max_cached_bytes", "max_concurrent_sessions", "max_buffered_bytes", "store_max_bytes")
    assert all(mine[k] is None for k in hidden), mine
    assert (every["max_cached_bytes"], every["max_concurrent_sessions"]) == (1 << 30, 32)
    assert every["max_buffered_bytes"] == 1 << 30 and every["store_max_bytes"] is None
    assert {k: every[k] for k in every if k not in hidden} == {k: mine[k] for k in mine if k not in hidden}
    ok = spec["paths"]["/v1/limits"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/Limits"}
    assert set(spec["components"]["schemas"]["Limits"]["properties"]) == set(every)


# --- in a browser: a live receiver -------------------------------------------------------------------------------
MODEL = "random:tiny-llama"


@dataclass
class Sent:
    message_id: str
    owner: str
    recipe: Recipe
    references: tuple[str, ...]


@dataclass
class Live:
    rx: Receiver
    lm: LoadedModel
    sent: list[Sent]
    profiles: Path

    def url(self, fragment: str = "") -> str:
        return f"{self.rx.rest}/{fragment}"

    def profile(self) -> Path:
        """A fresh chromium profile folder (nothing shared between runs: no stored token)."""
        path = self.profiles / uuid.uuid4().hex[:8]
        path.mkdir()
        return path


async def _send(live_rx: Receiver, lm: LoadedModel, owner: str, recipe: Recipe, example: int,
                scored: bool = True) -> Sent:  # fmt: skip
    """One SQuAD context at `recipe` over real gRPC as `owner`, then its question (with the gold answers
    as references when `scored`, so that the receiver records F1)."""
    qa = load_squad()[example]
    q = question_ids(lm.tokenizer, qa.question)
    pre = prefill(lm.model, context_ids(lm.tokenizer, qa.context), q, observe=recipe.needs())
    encoded = Codec(recipe, lm.geometry).encode(pre)
    message_id = f"{owner}-{uuid.uuid4().hex[:12]}"
    frames = wire.to_frames(encoded, "dash", message_id, lm.fingerprint, 1 << 20)
    references = tuple(dict.fromkeys(qa.answers)) if scored else ()
    metadata = (("authorization", f"Bearer {TOKENS[owner]}"),)
    timings = {"prefill_s": 0.01, "select_s": 0.002, "quantize_s": 0.003, "pack_s": 0.001}
    async with grpc.aio.insecure_channel(live_rx.target) as channel:
        await transfer(channel, frames, timeout=60, metadata=metadata)
        question = wire.Ask("dash", message_id, qa.question, 4, references, timings)
        await ask(channel, question, timeout=60, metadata=metadata)
    return Sent(message_id, owner, recipe, references)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """kvlink-serve on a tiny random model with tenants alice and bob and an operator; three messages sent:
    alice's two with reference answers (two configs), bob's one without."""
    if chromium() is None:
        pytest.skip("no chromium on PATH: `make chromium` installs Debian's")
    d = tmp_path_factory.mktemp("dashboard")
    tenants = d / "tenants"
    lines = [f"{name} {token}{' operator' if name in OPERATORS else ''}" for name, token in TOKENS.items()]
    tenants.write_text("\n".join(lines) + "\n")
    rx = Receiver(
        args=["--model", MODEL, "--tenants-file", str(tenants), "--max-new-tokens", "8", "--log-level", "info"],
        log=d / "kvlink-serve.log", port=free_port(), rest_port=free_port(), headers=_bearer("ops"),
    )  # fmt: skip
    rx.start()
    try:
        lm = load_model(MODEL, "cpu", "fp32")  # while the receiver loads its copy
        rx.wait_ready()
        plan = [("alice", build(selector="q2c", retention=0.5, k_bits=4, v_bits=4), 0, True),
                ("alice", build(k_bits=8, v_bits=8), 1, True), ("bob", build(k_bits=4, v_bits=4), 2, False)]  # fmt: skip

        async def send_all() -> list[Sent]:
            return [await _send(rx, lm, *p) for p in plan]

        profiles = d / "profiles"
        profiles.mkdir()
        yield Live(rx, lm, asyncio.run(send_all()), profiles)
    finally:
        rc = rx.stop()
        assert rc == 0, f"kvlink-serve exited with {rc}:\n{rx.log_tail()}"


def _hidden(dom: str, element_id: str) -> bool:
    match = re.search(rf"<[a-z]+ [^>]*\bid=\"{element_id}\"[^>]*>", dom)
    assert match is not None, f"no #{element_id} in the page"
    return re.search(r"\shidden(=\"\")?[\s>]", match[0]) is not None


def _message_ids(dom: str) -> list[str]:
    return re.findall(r'<tr class="message[^"]*" data-message-id="([^"]+)"', dom)


def _page(url: str, live: Live) -> str:
    """The DOM chromium dumps for `url`, entities decoded and the config labels' <wbr> left out."""
    return html.unescape(dump_dom(url, live.profile())).replace("<wbr>", "")


def _assert_no_data(dom: str, live: Live) -> None:
    for sent in live.sent:
        assert sent.message_id not in dom and f"<code>{sent.recipe.name}</code>" not in dom
    assert not _message_ids(dom) and "<circle" not in dom
    assert _hidden(dom, "dashboard") and not _hidden(dom, "auth")
    assert all(token not in dom for token in TOKENS.values())


@pytest.mark.browser
def test_the_dashboard_shows_every_message_its_config_and_a_plotted_point(live: Live) -> None:
    dom = _page(live.url(f"#token={TOKENS['ops']}"), live)
    assert not _hidden(dom, "dashboard") and _hidden(dom, "auth"), dom[:3000]
    assert sorted(_message_ids(dom)) == sorted(s.message_id for s in live.sent)
    for sent in live.sent:
        row = re.search(rf'<tr class="message[^"]*" data-message-id="{sent.message_id}".*?</tr>', dom, re.S)
        assert row is not None and f"<code>{sent.recipe.name}</code>" in row[0], sent
        assert f"from {sent.owner}" in row[0]  # the operator sees whose it is
        if sent.references:
            assert f"reference: {' | '.join(sent.references)}" in row[0]
            assert re.search(r"\d\.\d\d / \d\.\d\d", row[0]), "F1 / EM"
        assert re.search(r"receiver: .*decode \d", row[0]) and "sender: prefill 10 ms" in row[0], row[0]
    configs = re.findall(r'<tr data-config="([^"]+)"', dom)
    assert sorted(configs) == sorted(s.recipe.name for s in live.sent)
    points = re.findall(r'<circle class="point [^"]*"[^>]*data-message="([^"]+)"', dom)
    scored = {s.message_id for s in live.sent if s.references}
    assert points and set(points) == scored, points  # bob's message, without references, is not plotted
    assert len(re.findall(r'<circle class="config-mean', dom)) == 2
    assert 'data-state="live"' in dom and "as ops (operator)" in dom and "largest message" in dom
    assert all(token not in dom for token in TOKENS.values()), "the token is never shown"


@pytest.mark.browser
def test_a_tenant_sees_only_its_own_messages(live: Live) -> None:
    dom = _page(live.url(f"#token={TOKENS['alice']}"), live)
    mine = {s.message_id for s in live.sent if s.owner == "alice"}
    assert set(_message_ids(dom)) == mine
    bobs = [s for s in live.sent if s.owner == "bob"]
    assert all(s.message_id not in dom and f"<code>{s.recipe.name}</code>" not in dom for s in bobs)
    assert "an operator's token shows them" in dom  # the calls in progress are an operator's


@pytest.mark.browser
def test_without_a_valid_token_the_page_says_so_and_shows_no_data(live: Live) -> None:
    dom = _page(live.url(), live)
    assert 'data-state="required"' in dom and "Token required" in dom and "token required" in dom
    _assert_no_data(dom, live)
    dom = _page(live.url("#token=not-a-tenants-token"), live)
    assert 'data-state="refused"' in dom and "Token refused" in dom
    assert "not-a-tenants-token" not in dom
    _assert_no_data(dom, live)


@pytest.mark.browser
def test_messages_appear_as_they_arrive_and_the_token_stays_out_of_the_address_bar(live: Live) -> None:
    rows = "document.querySelectorAll('tr.message').length"
    with Browser(live.profile()) as browser:
        page = browser.open(live.url(f"#token={TOKENS['alice']}"))
        page.wait_for(f"{rows} === 2")
        assert page.evaluate("location.href") == live.url()  # the fragment is gone
        assert page.problems() == []  # no error, nothing the policy blocked
        assert page.evaluate("sessionStorage.getItem('kvlink-dashboard-token')") == TOKENS["alice"]
        started = time.monotonic()
        snapkv = build(selector="snapkv", retention=0.25, k_bits=4, v_bits=4)
        new = asyncio.run(_send(live.rx, live.lm, "alice", snapkv, 3))
        live.sent.append(new)
        row = f"document.querySelector('tr[data-message-id=\"{new.message_id}\"]')"
        page.wait_for(f"{row} !== null", timeout=15)
        shown_after = time.monotonic() - started
        assert page.evaluate(f"{row}.className") == "message fresh"  # highlighted as new
        point = f'circle.point[data-message="{new.message_id}"]'
        assert page.evaluate(f"document.querySelectorAll('{point}').length") == 1
        # A reload without the fragment: the tab's sessionStorage still has the token.
        page.navigate(live.url())
        page.wait_for(f"{rows} === 3")
        # "forget token": the data goes, the form asks for one; a typed token brings it back.
        page.evaluate("document.getElementById('forget-token').click()")
        page.wait_for(f"{rows} === 0 && document.getElementById('auth').dataset.state === 'required'")
        assert page.evaluate("document.getElementById('dashboard').hidden") is True
        assert page.evaluate("sessionStorage.getItem('kvlink-dashboard-token')") is None
        page.evaluate(
            f"document.getElementById('token-input').value = {TOKENS['alice']!r};"
            "document.getElementById('token-form').requestSubmit()"
        )
        page.wait_for(f"{rows} === 3")
        assert page.evaluate("document.getElementById('token-input').value") == ""
        assert page.problems() == []
    assert shown_after < 10, f"the new message showed {shown_after:.1f} s after it was sent"
