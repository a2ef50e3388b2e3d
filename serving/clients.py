"""API clients: named keys, each with its own quota (docs/how-to/quotas.md).

The clients file (`HNDSR_API_KEYS_FILE`, YAML) names each client, the SHA-256 of its key (the key itself is
never stored, logged or shown) and its quotas per minute; a quota left out is unlimited:

    clients:
      mapping-team:
        key_sha256: 3a7bd3e2360a3d29eea436fcfb7e44c735d117c42d1c1835420b6b9942dd4f1b
        requests_per_minute: 120
        megapixels_per_minute: 400      # output megapixels
      batch-archive:
        key_sha256: ...

`hndsr keys new NAME` makes a key and prints its entry. Quotas are counted per server process in fixed
one-minute windows (the `limits` library): a super-resolve request takes one request when it arrives and its
output megapixels once its size is known; a request the quota cannot take is answered 429 with `Retry-After`
(seconds until the window resets) and takes nothing. Every super-resolve answer carries the IETF draft
`RateLimit-Policy` and `RateLimit` headers (remaining quota `r`, seconds to reset `t`).
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from serving.errors import ClientError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
KEY_PREFIX = "hndsr_"


class ClientsError(ValueError):
    """The clients file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Client:
    name: str
    key_sha256: str
    requests_per_minute: int | None = None
    megapixels_per_minute: float | None = None


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A random key (256 bits): high entropy, so a plain SHA-256 of it is a safe thing to store."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def load_clients(path: str | Path) -> dict[str, Client]:
    """The clients in `path` by key hash; ClientsError naming the file and the entry at fault."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ClientsError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ClientsError(f"{path} is not valid YAML: {exc}") from None
    entries = (document or {}).get("clients") if isinstance(document, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ClientsError(f"{path} must hold a `clients:` mapping of client names to their key_sha256 and quotas "
                           "(`hndsr keys new NAME` prints an entry)")
    clients: dict[str, Client] = {}
    for name, entry in entries.items():
        where = f"{path}: client {name!r}"
        if not isinstance(name, str) or not NAME.match(name):
            raise ClientsError(f"{where}: a name is 1-64 letters, digits, '.', '_' or '-'")
        if not isinstance(entry, dict):
            raise ClientsError(f"{where}: expected key_sha256 and optional requests_per_minute, megapixels_per_minute")
        unknown = set(entry) - {"key_sha256", "requests_per_minute", "megapixels_per_minute"}
        if unknown:
            raise ClientsError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        digest = str(entry.get("key_sha256", "")).lower()
        if not HEX64.match(digest):
            raise ClientsError(f"{where}: key_sha256 must be the 64 hex digits of the key's SHA-256 (never the key)")
        if digest in clients:
            raise ClientsError(f"{where}: the same key as client {clients[digest].name!r}")
        requests = _quota(entry.get("requests_per_minute"), f"{where}: requests_per_minute", integer=True)
        megapixels = _quota(entry.get("megapixels_per_minute"), f"{where}: megapixels_per_minute", integer=False)
        clients[digest] = Client(name, digest, requests, megapixels)
    return clients


def _quota(value, where: str, *, integer: bool):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0 \
            or (integer and value != int(value)):
        raise ClientsError(f"{where} must be a positive {'integer' if integer else 'number'}, got {value!r}")
    return int(value) if integer else float(value)


class Quotas:
    """Each client's per-minute quotas in this process (fixed windows of the `limits` library)."""

    def __init__(self, clients: dict[str, Client]) -> None:
        self.clients = clients
        self._limiter = FixedWindowRateLimiter(MemoryStorage())
        self._items: dict[tuple[str, str], RateLimitItemPerMinute] = {}
        for client in clients.values():
            if client.requests_per_minute:
                self._items[client.name, "requests"] = RateLimitItemPerMinute(client.requests_per_minute)
            if client.megapixels_per_minute:  # counted in output pixels
                self._items[client.name, "megapixels"] = RateLimitItemPerMinute(
                    max(1, round(client.megapixels_per_minute * 1e6)))

    def identify(self, key: str) -> Client | None:
        return self.clients.get(key_hash(key))

    def take(self, client: Client, quota: str, amount: int) -> None:
        """Take `amount` (requests, or output pixels for "megapixels") from the client's quota, or raise a 429
        ClientError (taking nothing) saying when to retry."""
        item = self._items.get((client.name, quota))
        if item is None:
            return
        if amount > item.amount:  # could never fit, however long the client waits
            raise ClientError(429, "over_quota", f"this request needs {_amount(quota, amount)}, more than client "
                              f"{client.name!r}'s whole quota of {_amount(quota, item.amount)} per minute; send a "
                              "smaller image or scale", {**self.headers(client)})
        if not self._limiter.test(item, client.name, cost=amount):
            retry = self._reset_in(item, client.name)
            raise ClientError(429, "rate_limited", f"client {client.name!r} has used its quota of "
                              f"{_amount(quota, item.amount)} per minute; retry in {retry} s",
                              {"Retry-After": str(retry), **self.headers(client)})
        self._limiter.hit(item, client.name, cost=amount)

    def _reset_in(self, item: RateLimitItemPerMinute, name: str) -> int:
        return max(1, math.ceil(self._limiter.get_window_stats(item, name).reset_time - time.time()))

    def headers(self, client: Client | None) -> dict[str, str]:
        """`RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers) for this client's quotas."""
        if client is None:
            return {}
        policies, states = [], []
        for quota in ("requests", "megapixels"):
            item = self._items.get((client.name, quota))
            if item is None:
                continue
            stats = self._limiter.get_window_stats(item, client.name)
            quantity = item.amount if quota == "requests" else f"{item.amount / 1e6:g}"
            remaining = stats.remaining if quota == "requests" else f"{stats.remaining / 1e6:.6g}"
            policies.append(f'"{quota}";q={quantity};w=60')
            states.append(f'"{quota}";r={remaining};t={max(0, math.ceil(stats.reset_time - time.time()))}')
        return {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(states)} if policies else {}


def _amount(quota: str, amount: int) -> str:
    return f"{amount} requests" if quota == "requests" else f"{amount / 1e6:g} output megapixels"
