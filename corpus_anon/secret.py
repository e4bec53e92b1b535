"""The project secret (`CORPUS_ANON_SECRET`): synthetic identities and pseudonyms, driver side only.

Seeds are HMAC(secret, "seed:" + signer_id), so every clip of one signer gets the same synthetic
identity and nobody without the secret can map an identity back to a signer. The secret never
leaves the driver: it is read here, the derived values travel in the rows, and the driver removes
it from its environment before it starts or joins Ray (local workers inherit the driver's
environment). Only a short key id (a hash of it) is recorded, in the output fingerprint.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from corpus_anon.config import ConfigError

SECRET_ENV = "CORPUS_ANON_SECRET"
MIN_SECRET_BYTES = 32
SEED_BITS = 31  # seeds fit every framework's generator and a Parquet int64 column


def read_secret(purpose: str) -> bytes:
    """The secret from the environment; a missing or short one is refused in one sentence."""
    value = os.environ.get(SECRET_ENV)
    if not value:
        raise ConfigError(
            f"{purpose} needs the secret in {SECRET_ENV} (at least {MIN_SECRET_BYTES} bytes, e.g. "
            f"`export {SECRET_ENV}=$(openssl rand -hex 32)`), kept safe and reused for every run of this corpus.")
    # A Kubernetes Secret made with --from-file from a file that ends in a newline carries it:
    # the same secret with and without it must derive the same seeds and pseudonyms.
    raw = value.rstrip("\r\n").encode("utf-8")
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigError(f"{SECRET_ENV} is {len(raw)} bytes; at least {MIN_SECRET_BYTES} are required.")
    return raw


def drop_secret_from_env() -> None:
    os.environ.pop(SECRET_ENV, None)


def key_id(secret: bytes) -> str:
    """A short, non-reversible id of the secret (goes into the output fingerprint)."""
    return hashlib.sha256(b"corpus-anon key id:" + secret).hexdigest()[:10]


def _hmac_int(secret: bytes, message: str, bits: int) -> int:
    digest = hmac.new(secret, message.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << bits) - 1)


def derive_seed(secret: bytes, signer_id: str) -> int:
    return _hmac_int(secret, "seed:" + str(signer_id), SEED_BITS)


def reseed(seed: int, attempt: int) -> int:
    """A new seed after a leak, from the row's seed and the attempt number (needs no secret)."""
    digest = hashlib.sha256(f"reseed:{int(seed)}:{int(attempt)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << SEED_BITS) - 1)


def pick_prompt(bank: list[str], seed: int) -> str:
    if not bank:
        raise ConfigError("diffusion.prompt_bank is empty; give at least one prompt.")
    return bank[int(seed) % len(bank)]
