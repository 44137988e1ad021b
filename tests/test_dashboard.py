"""/v1/limits, what the operator's dashboard shows of the receiver's limits.

In process (TestClient): it needs the token and shows the receiver-wide caps to operators only.
"""

from __future__ import annotations

import torch
from fastapi.testclient import TestClient

from kvlink import wire
from kvlink.metrics import MetricsRegistry
from kvlink.models import Geometry, LoadedModel
from kvlink.server.guard import Guard, Identity
from kvlink.server.rest import create_app
from kvlink.server.service import KVLinkService
from kvlink.server.store import SessionStore

TOKENS = {"alice": "tok-alice-" + "a" * 20, "bob": "tok-bob-" + "b" * 20, "ops": "tok-ops-" + "o" * 20}
OPERATORS = {"ops"}


# --- in process --------------------------------------------------------------------------------------------------
def _app(max_cached: int = 1 << 30) -> TestClient:
    lm = LoadedModel(torch.nn.Linear(2, 2), None, "fake", "f" * 64, Geometry(2, 1, 4, 2))
    tenants = {token: Identity(name, name in OPERATORS) for name, token in TOKENS.items()}
    store = SessionStore(ttl_s=300, max_bytes=max_cached, owner_max_bytes=max_cached // 2)
    guard = Guard(tenants=tenants, max_calls=32, per_peer=3)
    return TestClient(create_app(KVLinkService(lm, store, MetricsRegistry(), guard=guard, max_new_tokens=16)))


def _bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


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
