"""Manage API keys:

python -m api.keys create --tenant acme --name ci     # prints the key once
python -m api.keys list
python -m api.keys revoke KEY_ID
"""

from __future__ import annotations

import argparse
import sys

from common import redis_connection
from common.api_keys import ApiKeyStore
from common.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m api.keys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a key for a tenant")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="")
    sub.add_parser("list", help="list keys (ids, tenants, names; never the keys)")
    revoke = sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    args = parser.parse_args(argv)
    settings = get_settings()
    store = ApiKeyStore(redis_connection.sync_client(settings), settings.key_prefix)
    if args.command == "create":
        try:
            record, key = store.create(args.tenant, args.name)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(key)
        print(
            f"key id {record.key_id}, tenant {record.tenant}: store the key now, it is not shown again", file=sys.stderr
        )
    elif args.command == "list":
        for k in store.list():
            print(f"{k.key_id}\t{k.tenant}\t{'revoked' if k.revoked else 'active'}\t{k.name}")
    elif not store.revoke(args.key_id):
        print(f"error: no key with id {args.key_id}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
