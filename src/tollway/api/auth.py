"""Bearer-token auth for the API: who is calling, with which scopes, on which accounts.

A request carries ``Authorization: Bearer <JWT>``, verified by :func:`tollway.tokens.verify`
(ES256 or EdDSA by ``kid``; HS256 only with ``auth_allow_hs256``; ``alg: none``, a missing
``exp`` and a wrong ``aud`` or ``iss`` are refused). The claims that mean something here:

- ``scope`` — space-separated. ``billing:admin`` implies ``billing:gateway``, which implies
  ``billing:read``: a gateway may read the entries and balances of the accounts it bills, and
  an admin may do everything. Unknown scopes are ignored.
- ``accounts`` — optional: a list of account ids (or one space- or comma-separated string),
  each an exact id or a ``prefix*`` pattern (``*`` alone: every account). Without the claim
  the token is valid for every account. The restriction applies to every request that names
  an account (directly, or through the entry it touches), admin ones included; operations
  on no account (settlement, guard, prices) only need the scope.
- ``sub`` — who is calling; recorded as the ``admin_id`` of a void.

401 ``unauthorized`` without a token or with one that does not verify (or whose ``scope`` or
``accounts`` claim is malformed); 403 ``forbidden`` outside the scope or the accounts.

Verified tokens are cached (bounded LRU, keyed by the token text) until their ``exp``, so the
signature is checked once per token, not once per request. Verification keys come from
``auth_public_key_files`` or, when none are configured, from the development signing key
in ``<data_dir>/keys/`` (created on first start); :func:`issue_token` signs tokens with it.
"""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tollway.api.errors import ApiError
from tollway.config import Settings
from tollway.core.errors import InvalidInput
from tollway.service import keys_dir
from tollway.tokens import (
    UNKNOWN_KID,
    SigningKey,
    TokenInvalid,
    VerificationKey,
    load_or_create_signing_key,
    load_verification_keys,
    verify,
)

TOKEN_CACHE_MAX: Final = 10_000
"""Verified tokens remembered at most (least recently used evicted first)."""
ACCOUNT_PATTERNS_MAX: Final = 1_000
"""Most entries an ``accounts`` claim may hold."""
TOKEN_TTL_S_DEFAULT: Final = 24 * 3600
TOKEN_TTL_S_MAX: Final = 366 * 86_400
ANONYMOUS: Final = "anonymous"
"""The subject of a token without ``sub``."""


class Scope(enum.Enum):
    """What a token allows."""

    READ = "billing:read"  # balances, entries, prices
    GATEWAY = "billing:gateway"  # reserve, commit, release, extend, charge (and read)
    ADMIN = "billing:admin"  # void, finalize, credits, settlement, guard (and everything else)


_IMPLIED: Final = {
    Scope.READ: frozenset({Scope.READ}),
    Scope.GATEWAY: frozenset({Scope.GATEWAY, Scope.READ}),
    Scope.ADMIN: frozenset(Scope),
}
_BY_VALUE: Final = {scope.value: scope for scope in Scope}


@dataclass(frozen=True, slots=True)
class AccountFilter:
    """Exact account ids and ``prefix*`` patterns; ``everything`` when unrestricted."""

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    everything: bool = True

    def allows(self, account_id: str) -> bool:
        """Whether ``account_id`` is within the filter."""
        return self.everything or account_id in self.exact or account_id.startswith(self.prefixes)

    @classmethod
    def parse(cls, patterns: Iterable[str]) -> AccountFilter:
        """A filter from patterns: ``acct-1`` (exact), ``team-a:*`` (prefix), ``*`` (all)."""
        items = list(patterns)
        if "*" in items:
            return cls()
        exact = frozenset(item for item in items if not item.endswith("*"))
        prefixes = tuple(sorted({item[:-1] for item in items if item.endswith("*")}))
        return cls(exact, prefixes, everything=False)


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller."""

    subject: str
    scopes: frozenset[Scope]  # with the implied ones
    accounts: AccountFilter
    expires_at_s: float

    def require(self, scope: Scope, account_id: str | None = None) -> None:
        """Raise 403 unless the token has ``scope`` and (when given) covers ``account_id``."""
        if scope not in self.scopes:
            raise ApiError("forbidden", f"this operation needs the {scope.value} scope", required_scope=scope.value)
        if account_id is not None and not self.accounts.allows(account_id):
            raise ApiError("forbidden", "the token does not cover this account", account_id=account_id)


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """The caller the verified ``claims`` describe; a malformed claim raises :class:`TokenInvalid`."""
    scope = claims.get("scope", "")
    if not isinstance(scope, str):
        raise TokenInvalid("scope must be a space-separated string")
    scopes = frozenset().union(*(_IMPLIED[_BY_VALUE[name]] for name in scope.split() if name in _BY_VALUE))
    subject = claims.get("sub")
    return Principal(
        subject if isinstance(subject, str) and subject else ANONYMOUS,
        scopes,
        _accounts(claims.get("accounts")),
        float(claims["exp"]),
    )


def _accounts(claim: object) -> AccountFilter:
    if claim is None:
        return AccountFilter()
    items = claim.replace(",", " ").split() if isinstance(claim, str) else claim
    if not isinstance(items, list) or not all(isinstance(item, str) and item for item in items):
        raise TokenInvalid("accounts must be a list of account ids or prefix* patterns")
    if len(items) > ACCOUNT_PATTERNS_MAX:
        raise TokenInvalid(f"accounts lists more than {ACCOUNT_PATTERNS_MAX} patterns")
    return AccountFilter.parse(items)


class Authenticator:
    """Verifies bearer tokens against a key set and caches the verified callers."""

    def __init__(
        self,
        keys: Mapping[str, VerificationKey],
        *,
        audience: str,
        issuer: str | None = None,
        allow_hs256: bool = False,
        hs256_secret: bytes | None = None,
        clock_s: Callable[[], float] = time.time,
        cache_max: int = TOKEN_CACHE_MAX,
        unknown_kid_hint: str = "",
    ) -> None:
        self.keys = dict(keys)
        self.unknown_kid_hint = unknown_kid_hint  # appended to "unknown kid": where this service's keys come from
        self.audience = audience
        self.issuer = issuer
        self.allow_hs256 = allow_hs256
        self._hs256_secret = hs256_secret
        self._clock_s = clock_s
        self._cache: collections.OrderedDict[str, Principal] = collections.OrderedDict()
        self._cache_max = cache_max

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        """Keys from ``auth_public_key_files``, else the data directory's development key."""
        paths = [Path(item.strip()) for item in settings.auth_public_key_files.split(",") if item.strip()]
        if paths:
            keys = load_verification_keys(paths)
            hint = f"this service trusts the keys of auth_public_key_files (kid {', '.join(sorted(keys))})"
        else:
            key, _ = development_key(settings)
            keys = {key.kid: key.public()}
            hint = (
                f"this service trusts only the development key of its own data directory (kid {key.kid}); "
                "was the token issued with another --data-dir?"
            )
        secret = settings.auth_hs256_secret.encode() if settings.auth_hs256_secret else None
        return cls(
            keys,
            audience=settings.auth_audience,
            issuer=settings.auth_issuer,
            allow_hs256=settings.auth_allow_hs256,
            hs256_secret=secret,
            unknown_kid_hint=hint,
        )

    def authenticate_header(self, authorization: str) -> Principal:
        """The caller of an ``Authorization: Bearer <token>`` header's value; 401 as :meth:`authenticate`."""
        scheme, _, credentials = authorization.partition(" ")
        return self.authenticate(credentials.strip() if scheme.lower() == "bearer" else None)

    def authenticate(self, token: str | None) -> Principal:
        """The caller of ``token``; 401 ``unauthorized`` when absent or not valid."""
        if not token:
            raise ApiError("unauthorized", "a bearer token is required")
        now_s = self._clock_s()
        cached = self._cache.get(token)
        if cached is not None:
            if now_s < cached.expires_at_s:
                self._cache.move_to_end(token)
                return cached
            del self._cache[token]
        try:
            claims = verify(
                token,
                self.keys,
                self.audience,
                self.allow_hs256,
                self._hs256_secret,
                issuer=self.issuer,
                now_s=int(now_s),
            )
            principal = principal_from_claims(claims)
        except TokenInvalid as exc:
            hint = f": {self.unknown_kid_hint}" if exc.reason == UNKNOWN_KID and self.unknown_kid_hint else ""
            raise ApiError("unauthorized", f"the bearer token was refused: {exc.reason}{hint}") from exc
        self._remember(token, principal)
        return principal

    def _remember(self, token: str, principal: Principal) -> None:
        self._cache[token] = principal
        if len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)


# -- issuing tokens ----------------------------------------------------------------------------


def development_key(settings: Settings) -> tuple[SigningKey, bool]:
    """The development signing key in ``<data_dir>/keys/``; ``True`` when just created."""
    directory = keys_dir(settings)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return load_or_create_signing_key(directory)


def token_claims(
    scopes: Sequence[str],
    *,
    subject: str,
    audience: str,
    issuer: str,
    now_s: int,
    ttl_s: int = TOKEN_TTL_S_DEFAULT,
    accounts: Sequence[str] | None = None,
) -> dict[str, object]:
    """The claims of an API token; unknown scopes and out-of-range TTLs raise :class:`InvalidInput`."""
    unknown = sorted(set(scopes) - set(_BY_VALUE))
    if unknown or not scopes:
        raise InvalidInput(f"scopes must be among {sorted(_BY_VALUE)}, got {list(scopes)}", field="scope")
    if not 1 <= ttl_s <= TOKEN_TTL_S_MAX:
        raise InvalidInput(f"ttl_s must be between 1 and {TOKEN_TTL_S_MAX}", field="ttl_s")
    if accounts is not None and not all(isinstance(item, str) and item for item in accounts):
        raise InvalidInput("accounts must be non-empty ids or prefix* patterns", field="accounts")
    claims: dict[str, object] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "scope": " ".join(scopes),
        "iat": now_s,
        "exp": now_s + ttl_s,
    }
    if accounts is not None:
        claims["accounts"] = list(accounts)
    return claims


def issue_token(
    key: SigningKey,
    settings: Settings,
    scopes: Sequence[str],
    *,
    subject: str,
    ttl_s: int = TOKEN_TTL_S_DEFAULT,
    accounts: Sequence[str] | None = None,
    now_s: int | None = None,
) -> str:
    """A token for this service (its audience and issuer), signed with ``key``."""
    claims = token_claims(
        scopes,
        subject=subject,
        audience=settings.auth_audience,
        issuer=settings.auth_issuer,
        now_s=int(time.time()) if now_s is None else now_s,
        ttl_s=ttl_s,
        accounts=accounts,
    )
    return key.sign(claims)
