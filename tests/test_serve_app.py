"""moerun.serve.app without an engine (the app in this process, over httpx's ASGI transport):
the API key check, and /health while the model loads. The routes that need the engine are
tested against a real server in test_serve.py."""
import asyncio

import httpx
import pytest

from moerun.serve.app import ServerSettings, ServerState, build_app
from moerun.serve.metrics import ServerMetrics

def app_with(api_key):
    return build_app(ServerState(ServerSettings("m", api_key=api_key), ServerMetrics("m")))


def get(app, path, headers=None):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get(path, headers=headers or {})
    return asyncio.run(go())


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": "sekrit"}, 401),  # no "Bearer "
    ({"Authorization": "Bearer sekrit"}, 200),
])
def test_api_key_guards_v1(headers, status):
    r = get(app_with("sekrit"), "/v1/models", headers)
    assert r.status_code == status
    if status == 401:
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    else:
        assert r.json()["data"][0]["id"] == "m"


def test_no_api_key_and_the_routes_outside_v1_are_open():
    assert get(app_with(None), "/v1/models").status_code == 200
    keyed = app_with("sekrit")
    assert get(keyed, "/version").status_code == 200
    r = get(keyed, "/health")  # no engine yet: loading
    assert r.status_code == 503 and "loading" in r.json()["error"]["message"]


@pytest.mark.parametrize("flags, words", [
    (["--port", "70000"], "--port 70000"),
    (["--max-waiting", "0"], "--max-waiting"),
    (["--drain-timeout", "-1"], "--drain-timeout"),
    (["--stream-interval", "0"], "--stream-interval"),
    (["--max-model-len", "1"], "--max-model-len"),
])
def test_bad_server_flags_name_the_flag(flags, words):
    from moerun.serve.cli import check_server_flags, parser

    with pytest.raises(ValueError, match=words):
        check_server_flags(parser().parse_args(flags))
    check_server_flags(parser().parse_args([]))  # the defaults pass
