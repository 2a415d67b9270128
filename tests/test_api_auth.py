"""HTTP API auth: bearer JWTs refused for every documented reason, scopes, account patterns, HS256, the cache."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from tests.api_fixtures import ADMIN, GATEWAY, READ, Api, api, check_error, open_api
from tollway import Settings
from tollway.api.auth import AccountFilter, Authenticator, principal_from_claims
from tollway.api.errors import ApiError
from tollway.testing import FakeClock
from tollway.tokens import ALG_HS256, TokenInvalid, generate_signing_key, sign

__all__ = ["api"]

SECRET = "s" * 40


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def _status(api: Api, token: str | None) -> tuple[int, str]:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    response = await api.http.get("/v1/accounts/acct-1", headers=headers)
    return response.status_code, response.json().get("error", "")


async def test_tokens_refused_with_401(api: Api) -> None:
    """No token, a bad signature, expired, alg none, wrong aud, no exp, wrong iss, garbage: all 401."""
    other = generate_signing_key()
    now = int(time.time())
    claims = {"iss": "tollway", "aud": "tollway", "sub": "x", "scope": READ, "exp": now + 600}
    cases = {
        "missing": None,
        "bad signature": sign(claims, other.private_key, api.key.kid),
        "unknown kid": other.sign(claims),
        "expired": api.token(READ, claims={"exp": now - 120}),
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.",
        "wrong aud": api.token(READ, claims={"aud": "someone-else"}),
        "no exp": api.token(READ, claims={"exp": None}),
        "wrong iss": api.token(READ, claims={"iss": "evil"}),
        "garbage": "not.a.jwt",
        "bad accounts claim": api.token(READ, claims={"accounts": 7}),
        "bad scope claim": api.token(READ, claims={"scope": ["billing:read"]}),
    }
    results = {name: await _status(api, token) for name, token in cases.items()}
    assert dict.fromkeys(cases, (401, "unauthorized")) == results


async def test_non_bearer_scheme_is_401(api: Api) -> None:
    """Basic auth (or any other scheme) is not a bearer token."""
    response = await api.http.get("/v1/accounts/acct-1", headers={"authorization": "Basic dXNlcjpwYXNz"})
    check_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_scopes_imply_downwards_and_refuse_upwards(api: Api) -> None:
    """read cannot reserve; gateway can read but cannot mint; admin can do everything."""
    body = {"account_id": "acct-1", "request_id": "r", "estimated_cost_micro": "1"}
    check_error(await api.http.post("/v1/reservations", json=body, headers=api.auth(READ)), 403, "forbidden")
    assert 200 == (await api.http.get("/v1/accounts/acct-1", headers=api.auth(GATEWAY))).status_code
    mint = {"credit_id": "c", "kind": "mint", "amount_micro": "10"}
    check_error(
        await api.http.post("/v1/accounts/acct-1/credits", json=mint, headers=api.auth(GATEWAY)), 403, "forbidden"
    )
    check_error(await api.http.get("/v1/guard", headers=api.auth(GATEWAY)), 403, "forbidden")
    assert 402 == (await api.http.post("/v1/reservations", json=body, headers=api.auth(ADMIN))).status_code
    unknown_scope = {"authorization": f"Bearer {api.token(READ, claims={'scope': 'billing:unknown'})}"}
    check_error(await api.http.get("/v1/accounts/acct-1", headers=unknown_scope), 403, "forbidden")


async def test_accounts_claim_restricts_with_exact_ids_and_prefixes(api: Api) -> None:
    """A token for ``team-a:*`` and ``solo`` may touch team-a:x and solo, not team-b:x or an entry of team-b."""
    await api.mint("team-b:x", 10_000)
    other_entry = await api.held("team-b:x", "r", 100)
    limited = api.auth(GATEWAY, accounts=["team-a:*", "solo"])
    for account_id, status in [("team-a:x", 200), ("solo", 200), ("solo2", 403), ("team-b:x", 403)]:
        response = await api.http.get(f"/v1/accounts/{account_id}", headers=limited)
        assert (account_id, status) == (account_id, response.status_code)
    body = {"account_id": "team-b:x", "request_id": "r2", "estimated_cost_micro": "1"}
    check_error(await api.http.post("/v1/reservations", json=body, headers=limited), 403, "forbidden")
    commit = await api.http.post(
        f"/v1/reservations/{other_entry}/commit", json={"actual_cost_micro": 1}, headers=limited
    )
    check_error(commit, 403, "forbidden")
    check_error(await api.http.get(f"/v1/reservations/{other_entry}", headers=limited), 403, "forbidden")
    history = await api.http.get("/v1/accounts/team-b:x/entries", headers=limited)
    check_error(history, 403, "forbidden")


async def test_hs256_refused_unless_allowed(tmp_path: Path, redis_url: str, api: Api) -> None:
    """An HS256 token is 401 by default and accepted only with auth_allow_hs256 and the secret."""
    claims = {"iss": "tollway", "aud": "tollway", "sub": "dev", "scope": READ, "exp": int(time.time()) + 600}
    token = sign(claims, SECRET.encode(), None, ALG_HS256)
    assert (401, "unauthorized") == await _status(api, token)
    settings = Settings(
        data_dir=tmp_path / "hs", redis_url=redis_url, auth_allow_hs256=True, auth_hs256_secret=SECRET, shard="hs"
    )
    async with open_api(settings, FakeClock()) as dev:
        assert 200 == (await _status(dev, token))[0]


def test_verified_tokens_are_cached_until_expiry() -> None:
    """A verified token is answered from the cache (even once its key is gone) until its exp."""
    key = generate_signing_key()
    now = [1_000_000.0]
    auth = Authenticator({key.kid: key.public()}, audience="tollway", clock_s=lambda: now[0])
    token = key.sign({"aud": "tollway", "scope": READ, "exp": 1_000_100})
    first = auth.authenticate(token)
    auth.keys.clear()
    assert first == auth.authenticate(token)
    now[0] = 1_000_100.0
    with pytest.raises(ApiError) as refused:
        auth.authenticate(token)
    assert "unauthorized" == refused.value.code


def test_cache_is_bounded() -> None:
    """The cache keeps at most ``cache_max`` tokens, evicting the least recently used."""
    key = generate_signing_key()
    auth = Authenticator({key.kid: key.public()}, audience="tollway", cache_max=2)
    exp = int(time.time()) + 600
    tokens = [key.sign({"aud": "tollway", "scope": READ, "exp": exp, "n": n}) for n in range(3)]
    for token in tokens:
        auth.authenticate(token)
    assert 2 == len(auth._cache)


def test_account_filter_patterns() -> None:
    """Exact ids, prefix* patterns and ``*``; no claim means every account."""
    limited = AccountFilter.parse(["a", "team:*"])
    assert [True, False, True, False] == [limited.allows(x) for x in ("a", "ab", "team:1", "other")]
    assert AccountFilter.parse(["*"]).allows("anything")
    assert principal_from_claims({"exp": 1, "scope": READ}).accounts.allows("anything")
    assert principal_from_claims({"exp": 1, "accounts": "x, y*"}).accounts.allows("yes")
    with pytest.raises(TokenInvalid):
        principal_from_claims({"exp": 1, "accounts": [""]})


async def test_unknown_kid_hints_at_another_data_directory(api: Api) -> None:
    """A token signed with another development key gets a 401 naming the key this service trusts."""
    now = int(time.time())
    claims = {"iss": "tollway", "aud": "tollway", "sub": "x", "scope": READ, "exp": now + 600}
    response = await api.http.get(
        "/v1/accounts/acct-1", headers={"authorization": f"Bearer {generate_signing_key().sign(claims)}"}
    )
    message = check_error(response, 401, "unauthorized")["message"]
    assert (True, True) == (f"kid {api.key.kid}" in message, "another --data-dir?" in message)
