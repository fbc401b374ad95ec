"""Bearer tokens: random, shown once, stored only as their sha256."""

from __future__ import annotations

import hashlib
import re
import secrets
import time

from feddiffuse.shared.errors import UserError

from .store.base import HubStore

TOKEN_PREFIX = "fdh_"
ADMIN = "admin"  # the name (and role) of the admin token created at init
CLIENT = "client"
ROLES = (ADMIN, CLIENT)
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe, with a prefix that makes it recognisable."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_client_name(name: str) -> str:
    """A client's name is its id in manifests, uploads and status; raise UserError if unfit."""
    if name == ADMIN:
        raise UserError("The name 'admin' belongs to the admin token; choose another name.")
    if not _CLIENT_NAME.fullmatch(name):
        raise UserError("A client name has 1 to 64 letters, digits, '.', '_' or '-', starting "
                        "with a letter or digit; choose another name.")
    return name


def create_client_token(store: HubStore, name: str, now: float | None = None) -> str:
    """Enrol a client: store the hash of a new token and return the token (shown once)."""
    check_client_name(name)
    token = new_token()
    try:
        store.add_token(name, CLIENT, hash_token(token), time.time() if now is None else now)
    except KeyError:
        raise UserError(f"A token named {name!r} exists already (names are never reused); "
                        "choose another name.") from None
    return token


def revoke_client_token(store: HubStore, name: str, now: float | None = None) -> None:
    if name == ADMIN:
        raise UserError("The admin token cannot be revoked.")
    if not store.revoke_token(name, time.time() if now is None else now):
        raise UserError(f"There is no active token named {name!r}; see `token list`.")
