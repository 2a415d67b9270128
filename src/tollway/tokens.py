"""JSON Web Tokens: signing keys, key files, ``sign`` and a strict ``verify``.

One module for every JWT tollway makes or checks: the settlement client signs finalize calls
with it, the settlement simulator verifies them, and the HTTP API verifies bearer tokens.

Keys are asymmetric by default: ES256 (ECDSA on P-256) is generated, and Ed25519 (EdDSA) keys
are accepted too. Every key has a ``kid``, its RFC 7638 JWK thumbprint unless one is given, so
a public key identifies itself and a PEM file needs no side-car. HS256 with a shared secret
exists only for development and must be switched on explicitly on both sides.

:func:`verify` refuses, with :class:`TokenInvalid` and a short reason:

- ``alg: none``, any algorithm other than ES256/EdDSA, and HS256 unless ``allow_hs256``;
- an asymmetric token without a ``kid`` or with a ``kid`` not in the key set, or whose ``alg``
  is not the algorithm of the key that ``kid`` names (no algorithm confusion);
- a bad signature, a missing or past ``exp``, a future ``nbf``, a wrong ``aud`` (required), a
  wrong ``iss`` when an issuer is expected.

Time is an argument (``now_s``) so tests are deterministic; it defaults to the wall clock.
This module knows nothing about what the claims mean (purpose, scopes, accounts): callers check
those on the returned claims.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeGuard

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.types import Options

from tollway.core.errors import TollwayError

ALG_ES256: Final = "ES256"
ALG_EDDSA: Final = "EdDSA"
ALG_HS256: Final = "HS256"
ALG_NONE: Final = "none"

MAX_TOKEN_CHARS: Final = 8192
"""Longest token accepted; anything longer is refused before it is parsed."""

MIN_HS256_SECRET_BYTES: Final = 32
"""Shortest HS256 secret accepted (RFC 7518 §3.2: at least the hash size)."""

DEFAULT_LEEWAY_S: Final = 30
"""Clock skew tolerated on ``exp`` and ``nbf``."""

MAX_KEY_FILE_BYTES: Final = 1 << 20
"""Largest key file read (a JWKS with many keys still fits)."""

SIGNING_KEY_FILENAME: Final = "signing-key.pem"
KEY_FILE_MODE: Final = 0o600
KEY_DIR_MODE: Final = 0o700

PrivateKey = ec.EllipticCurvePrivateKey | Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | Ed25519PublicKey

_P256_COORDINATE_BYTES: Final = 32


UNKNOWN_KID: Final = "unknown kid"
"""The reason of a token signed with a key the verifier does not hold."""


class TokenError(TollwayError):
    """A token or key problem: root of this module's exceptions."""


class TokenInvalid(TokenError):
    """A token was refused; ``reason`` says why in a few words (safe to log, never the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid token: {reason}")
        self.reason = reason


class KeyMaterialError(TokenError):
    """A key, key file or secret that cannot be used (malformed, unsupported, unsafe)."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key and its ``kid``."""

    kid: str
    public_key: PublicKey

    @property
    def alg(self) -> str:
        """The JWS algorithm this key verifies."""
        return _alg_of(self.public_key)

    def to_jwk(self) -> dict[str, str]:
        """The public JWK (RFC 7517) with ``kid``, ``alg`` and ``use``."""
        return {**_jwk_members(self.public_key), "kid": self.kid, "alg": self.alg, "use": "sig"}

    def to_pem(self) -> bytes:
        """The public key as a SubjectPublicKeyInfo PEM."""
        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key and its ``kid``."""

    kid: str
    private_key: PrivateKey

    @property
    def alg(self) -> str:
        """The JWS algorithm this key signs with."""
        return _alg_of(self.private_key.public_key())

    def public(self) -> VerificationKey:
        """The matching verification key (same ``kid``)."""
        return VerificationKey(self.kid, self.private_key.public_key())

    def to_pem(self) -> bytes:
        """The private key as an unencrypted PKCS#8 PEM (keep it 0600)."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def sign(self, claims: Mapping[str, object]) -> str:
        """``claims`` signed with this key, ``kid`` in the header."""
        return sign(claims, self.private_key, self.kid, self.alg)


def _alg_of(public_key: PublicKey) -> str:
    if isinstance(public_key, Ed25519PublicKey):
        return ALG_EDDSA
    if isinstance(public_key.curve, ec.SECP256R1):
        return ALG_ES256
    raise KeyMaterialError(f"unsupported elliptic curve {public_key.curve.name}; use P-256 (ES256)")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _jwk_members(public_key: PublicKey) -> dict[str, str]:
    """The required JWK members of a public key (RFC 7638 §3.2), no ``kid``."""
    if isinstance(public_key, Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}
    _alg_of(public_key)  # refuses curves other than P-256
    numbers = public_key.public_numbers()
    size = _P256_COORDINATE_BYTES
    x, y = numbers.x.to_bytes(size, "big"), numbers.y.to_bytes(size, "big")
    return {"crv": "P-256", "kty": "EC", "x": _b64url(x), "y": _b64url(y)}


def thumbprint(public_key: PublicKey) -> str:
    """The RFC 7638 SHA-256 JWK thumbprint of ``public_key``: the default ``kid``."""
    canonical = json.dumps(_jwk_members(public_key), sort_keys=True, separators=(",", ":"))
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def generate_signing_key() -> SigningKey:
    """A fresh ES256 (P-256) signing key, ``kid`` = its thumbprint."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    return SigningKey(thumbprint(private_key.public_key()), private_key)


def signing_key_from_pem(pem: bytes, kid: str | None = None) -> SigningKey:
    """A signing key from a PKCS#8 or SEC1 PEM; ``kid`` defaults to the thumbprint."""
    try:
        private_key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyMaterialError(f"not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(private_key, PrivateKey):
        raise KeyMaterialError(f"unsupported private key type {type(private_key).__name__}")
    public_key = private_key.public_key()
    return SigningKey(kid or thumbprint(public_key), private_key)


def verification_key_from_pem(pem: bytes, kid: str | None = None) -> VerificationKey:
    """A verification key from a public-key PEM (or a private-key PEM, whose public half is used)."""
    if b"PRIVATE KEY" in pem:
        return signing_key_from_pem(pem, kid).public()
    try:
        public_key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise KeyMaterialError(f"not a PEM public key: {exc}") from exc
    if not isinstance(public_key, PublicKey):
        raise KeyMaterialError(f"unsupported public key type {type(public_key).__name__}")
    _alg_of(public_key)
    return VerificationKey(kid or thumbprint(public_key), public_key)


def verification_key_from_jwk(jwk: Mapping[str, object]) -> VerificationKey:
    """A verification key from a public JWK (EC P-256 or OKP Ed25519); ``kid`` defaults to the thumbprint."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    try:
        public_key: PublicKey
        if (kty, crv) == ("EC", "P-256"):
            x, y = (int.from_bytes(_b64url_decode(str(jwk[name])), "big") for name in ("x", "y"))
            public_key = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        elif (kty, crv) == ("OKP", "Ed25519"):
            public_key = Ed25519PublicKey.from_public_bytes(_b64url_decode(str(jwk["x"])))
        else:
            raise KeyMaterialError(f"unsupported JWK kty={kty!r} crv={crv!r}; use EC P-256 or OKP Ed25519")
    except (KeyError, ValueError) as exc:
        raise KeyMaterialError(f"malformed JWK: {exc}") from exc
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid):
        raise KeyMaterialError("a JWK kid must be a non-empty string")
    return VerificationKey(kid or thumbprint(public_key), public_key)


def keys_by_kid(keys: Iterable[VerificationKey]) -> dict[str, VerificationKey]:
    """Index ``keys`` by ``kid``; two different keys with one ``kid`` are refused."""
    index: dict[str, VerificationKey] = {}
    for key in keys:
        known = index.get(key.kid)
        if known is not None and known.to_jwk() != key.to_jwk():
            raise KeyMaterialError(f"two different keys share kid {key.kid!r}")
        index[key.kid] = key
    return index


def parse_verification_keys(data: bytes) -> list[VerificationKey]:
    """The keys in one file's bytes: a PEM (public or private), a JWK, or a JWKS ``{"keys": [...]}``."""
    if b"-----BEGIN" in data:
        return [verification_key_from_pem(data)]
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise KeyMaterialError(f"neither PEM nor JSON: {exc}") from exc
    if isinstance(document, dict) and isinstance(document.get("keys"), list):
        document = document["keys"]
    items = document if isinstance(document, list) else [document]
    if not items or not all(isinstance(item, dict) for item in items):
        raise KeyMaterialError("a JWK file holds a JSON object, a list of them, or {'keys': [...]}")
    return [verification_key_from_jwk(item) for item in items]


def load_verification_keys(paths: Iterable[Path]) -> dict[str, VerificationKey]:
    """Read PEM/JWK/JWKS files and index every key in them by ``kid``."""
    found: list[VerificationKey] = []
    for path in paths:
        try:
            found.extend(parse_verification_keys(_read_limited(path)))
        except KeyMaterialError as exc:
            raise KeyMaterialError(f"{path}: {exc}") from exc
    return keys_by_kid(found)


def sign(claims: Mapping[str, object], key: PrivateKey | bytes, kid: str | None, alg: str = ALG_ES256) -> str:
    """A compact JWS of ``claims``; ``key`` is a private key, or the secret for HS256.

    ``kid`` is required for asymmetric algorithms. Misuse (a key that does not fit ``alg``, a
    short secret, an unsupported algorithm) raises :class:`KeyMaterialError`.
    """
    if alg == ALG_HS256:
        if not isinstance(key, bytes):
            raise KeyMaterialError("HS256 signs with a secret (bytes)")
        check_hs256_secret(key)
    elif alg in (ALG_ES256, ALG_EDDSA):
        if isinstance(key, bytes) or _alg_of(key.public_key()) != alg:
            raise KeyMaterialError(f"{alg} needs a matching private key")
        if not kid:
            raise KeyMaterialError(f"{alg} tokens carry a kid")
    else:
        raise KeyMaterialError(f"refusing to sign with algorithm {alg!r}")
    headers = {"kid": kid} if kid else None
    return jwt.encode(dict(claims), key, algorithm=alg, headers=headers)


def check_hs256_secret(secret: bytes) -> bytes:
    """Return ``secret`` if it is long enough for HS256."""
    if len(secret) < MIN_HS256_SECRET_BYTES:
        raise KeyMaterialError(f"an HS256 secret needs at least {MIN_HS256_SECRET_BYTES} bytes")
    return secret


def verify(
    token: str,
    keys_by_kid: Mapping[str, VerificationKey],
    audience: str,
    allow_hs256: bool = False,
    hs256_secret: bytes | None = None,
    *,
    issuer: str | None = None,
    now_s: int | None = None,
    leeway_s: int = DEFAULT_LEEWAY_S,
) -> dict[str, Any]:
    """The claims of ``token`` once every check in the module docstring passed; else :class:`TokenInvalid`."""
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenInvalid(f"longer than {MAX_TOKEN_CHARS} characters")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenInvalid("malformed") from exc
    alg, key = _pick_key(header, keys_by_kid, allow_hs256, hs256_secret)
    options: Options = {
        "require": ["exp", "aud"],
        "verify_exp": False,  # checked below against the injected clock
        "verify_nbf": False,
        "verify_iat": False,
        "enforce_minimum_key_length": True,
    }
    try:
        claims = jwt.decode(token, key, algorithms=[alg], audience=audience, issuer=issuer, options=options)
    except jwt.PyJWTError as exc:
        raise TokenInvalid(_reason(exc)) from exc
    _check_times(claims, int(time.time()) if now_s is None else now_s, leeway_s)
    return claims


def _pick_key(
    header: Mapping[str, Any], keys: Mapping[str, VerificationKey], allow_hs256: bool, hs256_secret: bytes | None
) -> tuple[str, PublicKey | bytes]:
    """The algorithm and key to verify with, decided from the header against what is allowed."""
    alg = header.get("alg")
    if alg == ALG_HS256:
        if not allow_hs256 or hs256_secret is None:
            raise TokenInvalid("HS256 is not allowed")
        return alg, hs256_secret
    if alg not in (ALG_ES256, ALG_EDDSA):
        raise TokenInvalid(f"algorithm {str(alg)[:16]!r} is not allowed")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenInvalid("no kid")
    key = keys.get(kid)
    if key is None:
        raise TokenInvalid(UNKNOWN_KID)
    if key.alg != alg:
        raise TokenInvalid("alg does not match the key")
    return alg, key.public_key


def _check_times(claims: Mapping[str, Any], now_s: int, leeway_s: int) -> None:
    exp, nbf = claims.get("exp"), claims.get("nbf")
    if not _is_number(exp):
        raise TokenInvalid("exp is not a number")
    if now_s >= exp + leeway_s:
        raise TokenInvalid("expired")
    if nbf is not None and (not _is_number(nbf) or now_s < nbf - leeway_s):
        raise TokenInvalid("not yet valid")


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _reason(exc: jwt.PyJWTError) -> str:
    reasons: list[tuple[type[jwt.PyJWTError], str]] = [
        (jwt.InvalidSignatureError, "bad signature"),
        (jwt.MissingRequiredClaimError, f"missing claim {getattr(exc, 'claim', '')}"),
        (jwt.InvalidAudienceError, "wrong audience"),
        (jwt.InvalidIssuerError, "wrong issuer"),
        (jwt.InvalidAlgorithmError, "algorithm not allowed"),
        (jwt.InvalidKeyError, "unusable key"),
    ]
    return next((text for kind, text in reasons if isinstance(exc, kind)), "malformed")


# -- key files -------------------------------------------------------------------------------


def write_signing_key(directory: Path, key: SigningKey, filename: str = SIGNING_KEY_FILENAME) -> Path:
    """Write ``key`` as ``directory/filename`` (mode 0600), never replacing an existing file.

    The PEM is written to a temporary file, synced, then hard-linked into place, so a crash
    leaves either no key file or a whole one; a file already there raises ``FileExistsError``.
    """
    directory.mkdir(mode=KEY_DIR_MODE, parents=True, exist_ok=True)
    final = directory / filename
    temporary = directory / f".{filename}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(key.to_pem())
            file.flush()
            os.fsync(file.fileno())
        os.link(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(directory)
    return final


def read_signing_key(path: Path, *, strict_permissions: bool = True) -> SigningKey:
    """Load a signing key written by :func:`write_signing_key` (or any unencrypted PEM).

    With ``strict_permissions`` a file readable by group or others is refused, as ssh does.
    """
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyMaterialError(f"cannot read signing key {path}: {exc}") from exc
    if strict_permissions and os.name == "posix" and mode & 0o077:
        raise KeyMaterialError(f"signing key {path} is readable by others (mode {mode & 0o777:o}); chmod 600 it")
    try:
        return signing_key_from_pem(_read_limited(path))
    except KeyMaterialError as exc:
        raise KeyMaterialError(f"{path}: {exc}") from exc


def load_or_create_signing_key(directory: Path, filename: str = SIGNING_KEY_FILENAME) -> tuple[SigningKey, bool]:
    """The signing key kept in ``directory``, generated on first use; ``True`` when just created."""
    path = directory / filename
    if path.exists():
        return read_signing_key(path), False
    try:
        write_signing_key(directory, generate_signing_key(), filename)
    except FileExistsError:  # another process created it first: use theirs
        return read_signing_key(path), False
    return read_signing_key(path), True


def _read_limited(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyMaterialError(f"cannot read key file: {exc}") from exc
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyMaterialError(f"key file is larger than {MAX_KEY_FILE_BYTES} bytes")
    return data


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
