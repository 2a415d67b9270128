"""JWT primitives: keys and kids, sign/verify round trips, every refusal, key files."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tollway.core.errors import TollwayError
from tollway.tokens import (
    ALG_EDDSA,
    ALG_HS256,
    KEY_FILE_MODE,
    MAX_TOKEN_CHARS,
    KeyMaterialError,
    SigningKey,
    TokenInvalid,
    VerificationKey,
    generate_signing_key,
    keys_by_kid,
    load_or_create_signing_key,
    load_verification_keys,
    read_signing_key,
    sign,
    signing_key_from_pem,
    thumbprint,
    verification_key_from_jwk,
    verification_key_from_pem,
    verify,
    write_signing_key,
)

NOW_S = 1_767_225_600
AUD = "arrakis"
SECRET = b"s" * 32


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """One ES256 key for the module (generation is cheap, but one is enough)."""
    return generate_signing_key()


@pytest.fixture(scope="module")
def other() -> SigningKey:
    """A second, unrelated ES256 key."""
    return generate_signing_key()


def claims(**changes: object) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "acct-1", "aud": AUD, "iat": NOW_S, "exp": NOW_S + 300}
    base.update(changes)
    return {name: value for name, value in base.items() if value is not None}


def keyset(*keys: SigningKey) -> dict[str, VerificationKey]:
    return keys_by_kid(k.public() for k in keys)


def refusal(token: str, keys: dict[str, VerificationKey], **kwargs: Any) -> str:
    with pytest.raises(TokenInvalid) as caught:
        verify(token, keys, AUD, now_s=kwargs.pop("now_s", NOW_S), **kwargs)
    return caught.value.reason


def test_es256_round_trip(key: SigningKey) -> None:
    """A token signed with a key verifies with its public half and returns the claims."""
    token = key.sign(claims(tenant_id="t1"))
    assert claims(tenant_id="t1") == verify(token, keyset(key), AUD, now_s=NOW_S)
    assert {"alg": "ES256", "kid": key.kid, "typ": "JWT"} == jwt.get_unverified_header(token)


def test_kid_is_the_rfc7638_thumbprint(key: SigningKey) -> None:
    """The kid survives PEM and JWK round trips, because it is the key's thumbprint."""
    assert key.kid == thumbprint(key.private_key.public_key())
    assert key.kid == signing_key_from_pem(key.to_pem()).kid
    assert key.kid == verification_key_from_pem(key.public().to_pem()).kid
    jwk = key.public().to_jwk()
    assert {"kty": "EC", "crv": "P-256", "kid": key.kid, "alg": "ES256", "use": "sig"} == {
        name: jwk[name] for name in ("kty", "crv", "kid", "alg", "use")
    }
    assert key.public() == verification_key_from_jwk({k: v for k, v in jwk.items() if k != "kid"})


def test_rfc7638_thumbprint_of_a_known_key() -> None:
    """The thumbprint matches one computed independently from the JWK's canonical JSON."""
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
    }
    # The expected value is the base64url SHA-256 of the members' canonical JSON, computed by hand.
    assert "oKIywvGUpTVTyxMQ3bwIIeQUudfr_CkLMjCE19ECD-U" == verification_key_from_jwk(jwk).kid


def test_kid_selects_the_key(key: SigningKey, other: SigningKey) -> None:
    """With several keys, each token is checked against the key its kid names."""
    keys = keyset(key, other)
    assert "acct-1" == verify(key.sign(claims()), keys, AUD, now_s=NOW_S)["sub"]
    assert "acct-1" == verify(other.sign(claims()), keys, AUD, now_s=NOW_S)["sub"]
    impostor = sign(claims(), other.private_key, key.kid)  # other's signature under key's kid
    assert "bad signature" == refusal(impostor, keys)


def test_unknown_or_missing_kid_is_refused(key: SigningKey, other: SigningKey) -> None:
    """A kid outside the key set, or no kid at all, is refused."""
    assert "unknown kid" == refusal(other.sign(claims()), keyset(key))
    no_kid = jwt.encode(claims(), key.private_key, algorithm="ES256")
    assert "no kid" == refusal(no_kid, keyset(key))


def test_alg_none_is_refused(key: SigningKey) -> None:
    """An unsigned token is refused even when it names a known kid."""
    unsigned = jwt.encode(claims(), "", algorithm="none", headers={"kid": key.kid})
    assert "algorithm 'none' is not allowed" == refusal(unsigned, keyset(key))
    assert "algorithm 'none' is not allowed" == refusal(unsigned, keyset(key), allow_hs256=True, hs256_secret=SECRET)


def test_hs256_only_when_allowed(key: SigningKey) -> None:
    """HS256 is refused unless allowed with a secret; then the secret must match."""
    token = sign(claims(), SECRET, None, ALG_HS256)
    assert "HS256 is not allowed" == refusal(token, keyset(key))
    assert "HS256 is not allowed" == refusal(token, keyset(key), allow_hs256=True)
    assert "bad signature" == refusal(token, keyset(key), allow_hs256=True, hs256_secret=b"t" * 32)
    assert "acct-1" == verify(token, keyset(key), AUD, True, SECRET, now_s=NOW_S)["sub"]


def test_public_key_as_hmac_secret_is_refused(key: SigningKey) -> None:
    """The classic algorithm confusion (HS256 keyed with the public PEM) gets nowhere."""
    forged = jwt.encode(claims(), b"x" * 32, algorithm="HS256", headers={"kid": key.kid})
    assert "HS256 is not allowed" == refusal(forged, keyset(key))


def test_alg_must_match_the_key(key: SigningKey) -> None:
    """An EdDSA token under the kid of an ES256 key is refused before its signature is read."""
    ed = Ed25519PrivateKey.generate()
    token = sign(claims(), ed, key.kid, ALG_EDDSA)
    assert "alg does not match the key" == refusal(token, keyset(key))


def test_eddsa_round_trip() -> None:
    """Ed25519 keys sign and verify as EdDSA, with a JWK round trip."""
    ed_key = signing_key_from_pem(SigningKey("x", Ed25519PrivateKey.generate()).to_pem())
    assert ALG_EDDSA == ed_key.alg
    assert ed_key.public() == verification_key_from_jwk(ed_key.public().to_jwk())
    assert "acct-1" == verify(ed_key.sign(claims()), keyset(ed_key), AUD, now_s=NOW_S)["sub"]


def test_exp_is_required_and_enforced(key: SigningKey) -> None:
    """No exp, a non-numeric exp, or a past exp (beyond the leeway) is refused."""
    assert "missing claim exp" == refusal(key.sign(claims(exp=None)), keyset(key))
    assert "exp is not a number" == refusal(key.sign(claims(exp="soon")), keyset(key))
    token = key.sign(claims())
    assert "acct-1" == verify(token, keyset(key), AUD, now_s=NOW_S + 300 + 29)["sub"]
    assert "expired" == refusal(token, keyset(key), now_s=NOW_S + 300 + 30)
    assert "expired" == refusal(token, keyset(key), now_s=NOW_S + 301, leeway_s=0)


def test_nbf_in_the_future_is_refused(key: SigningKey) -> None:
    """A token not valid yet (beyond the leeway) is refused."""
    assert "not yet valid" == refusal(key.sign(claims(nbf=NOW_S + 31)), keyset(key))
    assert "acct-1" == verify(key.sign(claims(nbf=NOW_S + 30)), keyset(key), AUD, now_s=NOW_S)["sub"]


def test_audience_is_required_and_checked(key: SigningKey) -> None:
    """A missing or different aud is refused; a list containing ours is accepted."""
    assert "missing claim aud" == refusal(key.sign(claims(aud=None)), keyset(key))
    assert "wrong audience" == refusal(key.sign(claims(aud="someone-else")), keyset(key))
    assert "acct-1" == verify(key.sign(claims(aud=["x", AUD])), keyset(key), AUD, now_s=NOW_S)["sub"]


def test_issuer_checked_when_expected(key: SigningKey) -> None:
    """With an expected issuer, another iss is refused."""
    token = key.sign(claims(iss="tollway"))
    assert "tollway" == verify(token, keyset(key), AUD, issuer="tollway", now_s=NOW_S)["iss"]
    assert "wrong issuer" == refusal(token, keyset(key), issuer="someone")


def test_malformed_and_oversized_tokens_are_refused(key: SigningKey) -> None:
    """Garbage and tokens over the size limit are refused without parsing."""
    assert "malformed" == refusal("not.a.token", keyset(key))
    assert f"longer than {MAX_TOKEN_CHARS} characters" == refusal("a" * (MAX_TOKEN_CHARS + 1), keyset(key))


def test_refusals_are_tollway_errors(key: SigningKey) -> None:
    """TokenInvalid belongs to the one exception tree and names its reason."""
    with pytest.raises(TollwayError, match="invalid token: unknown kid"):
        verify(generate_signing_key().sign(claims()), keyset(key), AUD, now_s=NOW_S)


def test_sign_refuses_misuse(key: SigningKey) -> None:
    """Short secrets, missing kids, mismatched keys and `none` are programming errors."""
    with pytest.raises(KeyMaterialError, match="at least 32 bytes"):
        sign(claims(), b"short", None, ALG_HS256)
    with pytest.raises(KeyMaterialError, match="carry a kid"):
        sign(claims(), key.private_key, None)
    with pytest.raises(KeyMaterialError, match="matching private key"):
        sign(claims(), key.private_key, key.kid, ALG_EDDSA)
    with pytest.raises(KeyMaterialError, match="refusing to sign"):
        sign(claims(), key.private_key, key.kid, "none")


def test_other_curves_are_refused() -> None:
    """Only P-256 among the elliptic curves: a P-384 key is refused with a clear message."""
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(KeyMaterialError, match="unsupported elliptic curve secp384r1"):
        signing_key_from_pem(SigningKey("k", p384).to_pem())


def test_write_and_read_a_signing_key(tmp_path: Path, key: SigningKey) -> None:
    """The key file is 0600, reads back as the same key, and is never overwritten."""
    path = write_signing_key(tmp_path / "data", key)
    assert KEY_FILE_MODE == stat.S_IMODE(path.stat().st_mode)
    assert key.to_pem() == read_signing_key(path).to_pem()
    with pytest.raises(FileExistsError):
        write_signing_key(tmp_path / "data", generate_signing_key())
    assert [path] == list((tmp_path / "data").iterdir())  # no temporary file left behind


def test_load_or_create_signing_key(tmp_path: Path) -> None:
    """The first call creates the key, later calls load the same one."""
    first, created = load_or_create_signing_key(tmp_path)
    again, created_again = load_or_create_signing_key(tmp_path)
    assert (True, False, first.kid) == (created, created_again, again.kid)


def test_group_readable_key_file_is_refused(tmp_path: Path, key: SigningKey) -> None:
    """A private key readable by others is refused unless the check is waived."""
    path = write_signing_key(tmp_path, key)
    path.chmod(0o644)
    with pytest.raises(KeyMaterialError, match="chmod 600"):
        read_signing_key(path)
    assert key.kid == read_signing_key(path, strict_permissions=False).kid


def test_load_verification_keys_from_pem_jwk_and_jwks(tmp_path: Path, key: SigningKey, other: SigningKey) -> None:
    """Public keys load from a PEM, a single JWK and a JWKS, indexed by kid."""
    third = generate_signing_key()
    (tmp_path / "a.pem").write_bytes(key.public().to_pem())
    (tmp_path / "b.jwk").write_text(json.dumps(other.public().to_jwk()))
    (tmp_path / "c.jwks").write_text(json.dumps({"keys": [third.public().to_jwk()]}))
    loaded = load_verification_keys(sorted(tmp_path.iterdir()))
    assert keyset(key, other, third) == loaded


def test_conflicting_kids_and_bad_files_are_refused(tmp_path: Path, key: SigningKey, other: SigningKey) -> None:
    """Two different keys under one kid, or a file that is no key, are startup errors."""
    with pytest.raises(KeyMaterialError, match="share kid"):
        keys_by_kid([key.public(), VerificationKey(key.kid, other.private_key.public_key())])
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(KeyMaterialError, match=r"junk\.pem: neither PEM nor JSON"):
        load_verification_keys([tmp_path / "junk.pem"])
