"""Named API clients with quotas: the clients file, `hndsr keys`, and a real `hndsr serve` with two clients."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serving.clients import ClientsError, Quotas, key_hash, load_clients
from serving.errors import ClientError

BIN = Path(sys.executable).parent


def write_clients(path: Path, clients: dict) -> Path:
    path.write_text(yaml.safe_dump({"clients": clients}))
    return path


@pytest.mark.parametrize(("clients", "message"), [
    ({"a": {"key_sha256": "abc"}}, "key_sha256 must be the 64 hex digits"),
    ({"a": {"key_sha256": "0" * 64, "requests_per_minute": 0}}, "requests_per_minute must be a positive integer"),
    ({"a": {"key_sha256": "0" * 64, "requests_per_minute": 1.5}}, "requests_per_minute must be a positive integer"),
    ({"a": {"key_sha256": "0" * 64, "megapixels_per_minute": "lots"}}, "megapixels_per_minute must be a positive"),
    ({"a": {"key_sha256": "0" * 64, "key": "secret"}}, "unknown field(s) key"),
    ({"a b": {"key_sha256": "0" * 64}}, "a name is 1-64 letters"),
    ({"a": {"key_sha256": "0" * 64}, "b": {"key_sha256": "0" * 64}}, "the same key as client 'a'"),
    ({}, "must hold a `clients:` mapping"),
])
def test_a_bad_clients_file_says_where(tmp_path, clients, message):
    with pytest.raises(ClientsError, match=re.escape(message)):
        load_clients(write_clients(tmp_path / "clients.yaml", clients))


def test_quotas_take_nothing_when_refused_and_say_when_to_retry(tmp_path):
    quotas = Quotas(load_clients(write_clients(tmp_path / "c.yaml", {
        "a": {"key_sha256": key_hash("ka"), "requests_per_minute": 2, "megapixels_per_minute": 1}})))
    client = quotas.identify("ka")
    assert client.name == "a" and quotas.identify("other") is None
    quotas.take(client, "megapixels", 600_000)
    with pytest.raises(ClientError) as refused:
        quotas.take(client, "megapixels", 600_000)  # 1.2 MP > 1 MP: refused, and it takes nothing
    assert refused.value.status == 429 and 1 <= int(refused.value.headers["Retry-After"]) <= 60
    quotas.take(client, "megapixels", 400_000)  # so the remaining 0.4 MP are still there
    with pytest.raises(ClientError) as never:
        quotas.take(client, "megapixels", 2_000_000)
    assert never.value.code == "over_quota" and "Retry-After" not in never.value.headers
    headers = quotas.headers(client)
    assert headers["RateLimit-Policy"] == '"requests";q=2;w=60, "megapixels";q=1;w=60'
    assert re.fullmatch(r'"requests";r=2;t=\d+, "megapixels";r=0;t=\d+', headers["RateLimit"])


def test_keys_new_prints_the_key_once_and_an_entry_that_loads(tmp_path):
    made = subprocess.run([str(BIN / "hndsr"), "keys", "new", "team-a", "--requests-per-minute", "30"],
                          capture_output=True, text=True, check=True)
    key = made.stderr.strip().rsplit(" ", 1)[1]
    entry = yaml.safe_load(made.stdout)["clients"]
    assert key not in made.stdout and entry["team-a"] == {"key_sha256": key_hash(key), "requests_per_minute": 30}
    clients = load_clients(write_clients(tmp_path / "c.yaml", entry))
    assert clients[key_hash(key)].name == "team-a"
    hashed = subprocess.run([str(BIN / "hndsr"), "keys", "hash"], input=key + "\n", capture_output=True, text=True)
    assert hashed.stdout.strip() == key_hash(key)
    # --file: entries added to one clients file, a name only once.
    keys_file = tmp_path / "clients.yaml"
    made = [subprocess.run([str(BIN / "hndsr"), "keys", "new", name, "--megapixels-per-minute", "5", "--file",
                            str(keys_file)], capture_output=True, text=True) for name in ("one", "two", "one")]
    assert [m.returncode for m in made] == [0, 0, 2] and "already has a client 'one'" in made[2].stderr
    loaded = load_clients(keys_file)
    for m, name in zip(made[:2], ("one", "two"), strict=True):
        assert loaded[key_hash(m.stdout.strip().rsplit(" ", 1)[1])].name == name


@pytest.mark.slow
@pytest.mark.timeout(600)  # waits out per-minute quota windows: 63 s here
def test_two_clients_are_limited_independently(tmp_path):
    from tests.serving.test_server import Server, png, post, write_model

    keys = {"alpha": "alpha-key-" + "x" * 30, "beta": "beta-key-" + "y" * 30}
    clients = write_clients(tmp_path / "clients.yaml", {
        "alpha": {"key_sha256": key_hash(keys["alpha"]), "requests_per_minute": 3},
        "beta": {"key_sha256": key_hash(keys["beta"]), "megapixels_per_minute": 0.01}})  # 10,000 output px
    s = Server({"MODEL_URI": str(write_model(tmp_path / "models", seed=0)), "HNDSR_API_KEYS_FILE": str(clients)},
               tmp_path)
    s.wait_ready()
    try:
        def as_(name: str, **kwargs) -> httpx.Response:
            return post(s.url, png(16, 16), steps="0", headers={"Authorization": f"Bearer {keys[name]}"}, **kwargs)

        first = time.monotonic()
        answers = [as_("alpha") for _ in range(3)]  # 64x64 outputs: 4,096 px each
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert answers[0].headers["ratelimit-policy"] == '"requests";q=3;w=60'
        assert answers[2].headers["ratelimit"].startswith('"requests";r=0;')
        limited = as_("alpha")
        assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
        retry_after = int(limited.headers["retry-after"])
        assert 60 - (time.monotonic() - first) - 2 <= retry_after <= 60  # when alpha's window resets
        # beta is limited by output megapixels only, independently of alpha.
        assert [as_("beta").status_code for _ in range(2)] == [200, 200]  # 8,192 px
        over = as_("beta")
        assert over.status_code == 429 and "0.01 output megapixels" in over.json()["detail"]
        assert int(over.headers["retry-after"]) >= 1
        assert as_("alpha").status_code == 429  # still
        # Unknown or missing keys: 401; health probes need none.
        for headers in ({"Authorization": "Bearer not-a-key"}, {}):
            refused = post(s.url, png(16, 16), steps="0", headers=headers)
            assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
        assert httpx.get(f"{s.url}/readyz").status_code == 200
        metrics = httpx.get(f"{s.url}/metrics").text
        assert 'hndsr_client_requests_total{client="alpha",status="200"} 3.0' in metrics
        assert 'hndsr_client_requests_total{client="alpha",status="429"} 2.0' in metrics
        assert 'hndsr_client_output_pixels_total{client="beta"} 8192.0' in metrics
        # After Retry-After, alpha is served again.
        time.sleep(max(0.0, first + retry_after + 0.5 - time.monotonic()))
        assert as_("alpha").status_code == 200
        log = s.log.read_text()
        assert all(key not in log for key in keys.values())
    finally:
        s.stop()


def test_an_unreadable_clients_file_stops_start_up_with_one_line(tmp_path):
    bad = write_clients(tmp_path / "clients.yaml", {"a": {"key_sha256": "nope"}})
    result = subprocess.run([str(BIN / "hndsr"), "serve"], env={"PATH": str(BIN), "HNDSR_API_KEYS_FILE": str(bad)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"hndsr serve: error: HNDSR_API_KEYS_FILE={str(bad)!r}: {bad}: client 'a': key_sha256 must be the 64 hex "
        "digits of the key's SHA-256 (never the key)"]
