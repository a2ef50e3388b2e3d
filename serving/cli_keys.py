"""`hndsr keys`: make an API key for a named client of `hndsr serve` (docs/how-to/quotas.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hndsr.cli import Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Make a new random API key for a client and print it once, with the entry to add under `clients:` in the "
        "file HNDSR_API_KEYS_FILE names. The file holds only the key's SHA-256: give the key to the client and "
        "keep no other copy. Restart the server to apply the file.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = actions.add_parser("new", help="a new key and its clients-file entry")
    new.add_argument("name", help="the client's name (letters, digits, '.', '_', '-'); it labels the metrics")
    new.add_argument("--requests-per-minute", type=int, metavar="N", help="quota of super-resolve requests")
    new.add_argument("--megapixels-per-minute", type=float, metavar="M", help="quota of output megapixels")
    new.add_argument("--file", metavar="PATH", help="add the entry to this clients file (created if missing) "
                                                     "instead of printing it")
    digest = actions.add_parser("hash", help="the SHA-256 of an existing key, read from standard input")
    digest.set_defaults(name=None)


def main(args: argparse.Namespace) -> int:
    import yaml

    from serving.clients import NAME, key_hash, new_key

    if args.action == "hash":
        key = sys.stdin.readline().strip()
        if not key:
            print("hndsr keys hash: error: pass the key on standard input", file=sys.stderr)
            return 2
        print(key_hash(key))
        return 0
    if not NAME.match(args.name):
        print(f"hndsr keys new: error: {args.name!r}: a name is 1-64 letters, digits, '.', '_' or '-'", file=sys.stderr)
        return 2
    for flag, value in (("--requests-per-minute", args.requests_per_minute),
                        ("--megapixels-per-minute", args.megapixels_per_minute)):
        if value is not None and value <= 0:
            print(f"hndsr keys new: error: {flag} must be positive", file=sys.stderr)
            return 2
    key = new_key()
    entry = {"key_sha256": key_hash(key)}
    if args.requests_per_minute:
        entry["requests_per_minute"] = args.requests_per_minute
    if args.megapixels_per_minute:
        entry["megapixels_per_minute"] = args.megapixels_per_minute
    if args.file:
        path = Path(args.file)
        document = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {"clients": {}}
        clients = document.get("clients") if isinstance(document, dict) else None
        if not isinstance(clients, dict):
            print(f"hndsr keys new: error: {path} has no `clients:` mapping", file=sys.stderr)
            return 2
        if args.name in clients:
            print(f"hndsr keys new: error: {path} already has a client {args.name!r}", file=sys.stderr)
            return 2
        clients[args.name] = entry
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        print(f"key for {args.name} (shown once; give it to the client): {key}")
        print(f"added {args.name} to {path}; restart the server to apply it", file=sys.stderr)
        return 0
    print(f"key for {args.name} (shown once; give it to the client): {key}", file=sys.stderr)
    print(yaml.safe_dump({"clients": {args.name: entry}}, sort_keys=False).rstrip())
    return 0


keys = Command("make API keys for named clients of `hndsr serve` (with quotas)", add_arguments, main)
