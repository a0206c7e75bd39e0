"""Temporal payload encryption: what Temporal stores (workflow inputs, activity arguments and
results, signals, queries, failure messages) is AES-GCM ciphertext, so its database, its
Web UI and `temporal workflow show` never hold a recipient's address or a message in clear.

Keys come from MARQUEE_TEMPORAL_CODEC_KEYS, "id:base64key,id:base64key": the first one
encrypts, every one decrypts (rotation: put the new key first, drop the old one once no
retained history uses it). Payloads not marked as encrypted pass through decode unchanged:
histories recorded before the codec was on (and the tests' recorded histories) still replay.
docs/data-protection.md.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
CIPHER = b"AES-GCM"
KEY_ID = "encryption-key-id"
CIPHER_KEY = "encryption-cipher"
_NONCE_BYTES = 12  # GCM's standard nonce; random per payload
_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class CodecKeyError(ValueError):
    """The key list is malformed, or a payload names a key this process does not have."""


def parse_keys(text: str) -> list[tuple[str, bytes]]:
    """ "id:base64key,id2:base64key2" (commas or newlines) -> [(id, key)]; keys of 16, 24 or
    32 bytes (AES-128/192/256), standard or URL-safe base64; ids unique."""
    keys: list[tuple[str, bytes]] = []
    for entry in re.split(r"[,\s]+", text.strip()):
        if not entry:
            continue
        key_id, sep, encoded = entry.partition(":")
        if not sep or not _KEY_ID.match(key_id):
            raise CodecKeyError("each key must be written id:base64key, the id of letters, digits, '.', '_', '-'")
        try:
            key = base64.b64decode(encoded.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError) as err:
            raise CodecKeyError(f"key {key_id!r} is not base64") from err
        if len(key) not in (16, 24, 32):
            raise CodecKeyError(f"key {key_id!r} has {len(key)} bytes; AES-GCM takes 16, 24 or 32 (32 recommended)")
        if any(key_id == known for known, _ in keys):
            raise CodecKeyError(f"key id {key_id!r} is listed twice")
        keys.append((key_id, key))
    return keys


def new_key(key_id: str | None = None) -> str:
    """A new key entry for MARQUEE_TEMPORAL_CODEC_KEYS (AES-256)."""
    key_id = key_id or f"k{secrets.token_hex(4)}"
    if not _KEY_ID.match(key_id):
        raise CodecKeyError("a key id is letters, digits, '.', '_' and '-' (at most 64)")
    return f"{key_id}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"


class EncryptionCodec(PayloadCodec):
    """AES-GCM over each whole serialized payload (its metadata included, so the original
    encoding and message type are hidden too). The key id is authenticated data: ciphertext
    moved under another key's id does not decrypt."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise CodecKeyError("the codec needs at least one key")
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys}
        self.encrypting_key_id = keys[0][0]

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(payload) for payload in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(payload) for payload in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        key_id = self.encrypting_key_id
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._ciphers[key_id].encrypt(nonce, payload.SerializeToString(), key_id.encode())
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID: key_id.encode(), CIPHER_KEY: CIPHER}, data=nonce + sealed
        )

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload  # written without the codec: plain already
        key_id = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise CodecKeyError(f"payload encrypted with key {key_id!r}, which MARQUEE_TEMPORAL_CODEC_KEYS lacks")
        data = payload.data
        try:
            plain = cipher.decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], key_id.encode())
        except InvalidTag as err:
            raise CodecKeyError(f"payload does not decrypt with key {key_id!r} (altered, or another key)") from err
        decoded = Payload()
        decoded.ParseFromString(plain)
        return decoded
