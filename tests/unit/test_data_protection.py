"""Data protection pieces with no server: the Temporal payload codec (keys, rotation, plain
payloads passing through, tampering refused), TLS settings, PostgreSQL's sslmode reaching
asyncpg, and ClickHouse over https."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DefaultFailureConverterWithEncodedAttributes

from core.codec import ENCODING, KEY_ID, CodecKeyError, EncryptionCodec, new_key, parse_keys
from core.config import Settings
from core.db import async_url
from core.temporal import data_converter
from entrypoints.tls import _tls13_only, uvicorn_tls, with_tls
from services.history import ClickHouseServer

ADDRESS = "ada.lovelace@example.com"


def _settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def _plain(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=f'"{text}"'.encode())


def test_keys_are_parsed_in_order_and_bad_lists_refused() -> None:
    first, second = new_key("2025-06"), new_key("2024-01")
    keys = parse_keys(f"{first},\n {second}")
    assert [key_id for key_id, _ in keys] == ["2025-06", "2024-01"]
    assert all(len(key) == 32 for _, key in keys)
    url_safe = "k:" + base64.urlsafe_b64encode(b"\xfb" * 32).decode()  # '-' and '_' read as well
    assert parse_keys(url_safe) == [("k", b"\xfb" * 32)]
    assert parse_keys("  ") == []
    for bad, says in [
        ("no-separator", "id:base64key"),
        ("a:not base64!", "not base64"),
        ("a:" + base64.b64encode(b"short").decode(), "has 5 bytes"),
        (f"{first},{first}", "listed twice"),
        ("bad id:" + base64.b64encode(b"k" * 32).decode(), "id:base64key"),
    ]:
        with pytest.raises(CodecKeyError, match=says) as caught:
            parse_keys(bad)
        assert first.split(":")[1] not in str(caught.value)  # never echoes a key


async def test_payloads_are_encrypted_and_old_keys_still_decrypt() -> None:
    old_entry = new_key("old")
    [sealed] = await EncryptionCodec(parse_keys(old_entry)).encode([_plain(ADDRESS)])
    assert sealed.metadata["encoding"] == ENCODING
    assert sealed.metadata[KEY_ID] == b"old"
    assert ADDRESS.encode() not in sealed.SerializeToString()
    assert b"json/plain" not in sealed.SerializeToString()  # the inner metadata is sealed too

    # Rotation: a new key first; what the old one sealed still opens.
    rotated = EncryptionCodec(parse_keys(f"{new_key('new')},{old_entry}"))
    assert await rotated.decode([sealed]) == [_plain(ADDRESS)]
    [resealed] = await rotated.encode([_plain(ADDRESS)])
    assert resealed.metadata[KEY_ID] == b"new"

    # A process without the key says which one it lacks.
    with pytest.raises(CodecKeyError, match="'old'"):
        await EncryptionCodec(parse_keys(new_key("other"))).decode([sealed])


async def test_plain_payloads_pass_through_and_tampering_is_refused() -> None:
    keys = parse_keys(f"{new_key('a')},{new_key('b')}")
    codec = EncryptionCodec(keys)
    plain = _plain("recorded before the codec was on")
    assert await codec.decode([plain]) == [plain]

    [sealed] = await codec.encode([_plain(ADDRESS)])
    flipped = Payload()
    flipped.CopyFrom(sealed)
    flipped.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    with pytest.raises(CodecKeyError, match="does not decrypt"):
        await codec.decode([flipped])
    # The key id is authenticated: relabelled as the other key's, it does not open either.
    relabelled = Payload()
    relabelled.CopyFrom(sealed)
    relabelled.metadata[KEY_ID] = b"b"
    with pytest.raises(CodecKeyError, match="does not decrypt"):
        await codec.decode([relabelled])


async def test_the_data_converter_has_the_codec_only_when_keys_are_set() -> None:
    assert data_converter(_settings()) is pydantic_data_converter
    converter = data_converter(_settings(temporal_codec_keys=new_key("k1")))
    assert isinstance(converter.payload_codec, EncryptionCodec)
    # Failure messages (an SMTP reply may quote the address) are sealed with the payloads.
    assert converter.failure_converter_class is DefaultFailureConverterWithEncodedAttributes
    [payload] = await converter.encode([{"email": ADDRESS}])
    assert ADDRESS.encode() not in payload.SerializeToString()
    assert await converter.decode([payload], [dict]) == [{"email": ADDRESS}]
    with pytest.raises(CodecKeyError):
        data_converter(_settings(temporal_codec_keys="k1:????"))


def test_tls_settings(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-")
    key.write_text("-")
    assert uvicorn_tls(_settings()) == {}
    served = with_tls(_settings(api_port=8443), cert, key)
    assert served.served_over_tls
    assert served.public_url == "https://127.0.0.1:8443"  # the default URL (where it listens), now https
    options = uvicorn_tls(served)
    assert (options["ssl_certfile"], options["ssl_keyfile"]) == (str(cert), str(key))
    assert options["ssl_context_factory"] is _tls13_only
    context = _tls13_only(None, lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3
    # A configured public URL (a proxy's name) is kept.
    kept = with_tls(_settings(public_url="https://notify.example.com"), cert, key)
    assert kept.public_url == "https://notify.example.com"
    # Behind a TLS-terminating proxy the admin cookie is Secure too.
    assert _settings(public_url="https://notify.example.com").served_over_tls
    assert not _settings().served_over_tls
    with pytest.raises(ValueError, match="go together"):
        _settings(tls_cert=cert)
    with pytest.raises(SystemExit, match="go together"):
        with_tls(_settings(), cert, None)


def test_postgres_sslmode_reaches_asyncpg_as_ssl() -> None:
    # libpq's spelling (which pg_dump reads too) becomes asyncpg's keyword.
    url = "postgresql://marquee:s3cret@db.example.com:5432/marquee?sslmode=verify-full&application_name=marquee"
    assert async_url(url) == (
        "postgresql+asyncpg://marquee:s3cret@db.example.com:5432/marquee?ssl=verify-full&application_name=marquee"
    )
    assert async_url("postgresql://db/marquee?ssl=require") == "postgresql+asyncpg://db/marquee?ssl=require"
    assert async_url("postgresql://db/marquee") == "postgresql+asyncpg://db/marquee"


def test_clickhouse_https_url() -> None:
    server = ClickHouseServer.parse("https://writer:pw@clickhouse.example.com/marquee")
    assert (server.scheme, server.host, server.port, server.database) == (
        "https",
        "clickhouse.example.com",
        8443,  # ClickHouse's HTTPS port when the URL names none
        "marquee",
    )
    assert server.http_base == "https://clickhouse.example.com:8443/"
    assert ClickHouseServer.parse("https://clickhouse.example.com:9443").port == 9443
    assert ClickHouseServer.parse("http://clickhouse.example.com").port == 8123
