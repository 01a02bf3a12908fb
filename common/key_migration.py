"""A one-off rename for a deployment upgraded from the layout before hash tags, where every key was `P:<part>...`:
the keys that now carry the tag (common/keys.py TAGGED_PARTS) become `{P}:<part>...`, their values and expiries
unchanged (RENAMENX); the rest keep their names. Celery's keys are not the layout's and are left alone.

Run it once on the single Redis the deployment used, with the API and every worker stopped (a process of either
version running meanwhile would write keys under the names the other does not read), then start the new version:

    python -m common.key_migration --dry-run   # how many keys would be renamed
    python -m common.key_migration

A second run finds nothing to do. A key whose new name exists already (the new version was started before the
rename) is not overwritten: it is listed, and both are left for an operator to choose.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import redis

from common.keys import Keys

BATCH = 1000  # names per SCAN call and per pipeline of renames


@dataclass
class Migration:
    renamed: int = 0
    clashes: list[str] = field(default_factory=list)  # old names whose new name was taken: left as they are


def migrate(client: redis.Redis, prefix: str, dry_run: bool = False) -> Migration:
    keys, done = Keys(prefix), Migration()
    pairs: list[tuple[str, str]] = []
    for name in client.scan_iter(match=keys.untagged, count=BATCH):
        new = keys.renamed(name)
        if new is not None:
            pairs.append((name.decode() if isinstance(name, bytes) else name, new))
        if len(pairs) >= BATCH:
            _rename(client, pairs, dry_run, done)
            pairs = []
    _rename(client, pairs, dry_run, done)
    return done


def _rename(client: redis.Redis, pairs: list[tuple[str, str]], dry_run: bool, done: Migration) -> None:
    if not pairs:
        return
    pipe = client.pipeline(transaction=False)
    for old, new in pairs:
        if dry_run:
            pipe.exists(new)
        else:
            pipe.renamenx(old, new)
    for (old, _), answer in zip(pairs, pipe.execute(), strict=True):
        moved = not answer if dry_run else bool(answer)  # a dry run asks whether the new name is free
        done.renamed += moved
        if not moved:
            done.clashes.append(old)


def main(argv: list[str] | None = None) -> int:
    from common import redis_connection
    from common.settings import get_settings

    parser = argparse.ArgumentParser(
        prog="python -m common.key_migration", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="count, rename nothing")
    args = parser.parse_args(argv)
    settings = get_settings()
    done = migrate(redis_connection.sync_client(settings), settings.key_prefix, dry_run=args.dry_run)
    verb = "would rename" if args.dry_run else "renamed"
    print(f"{verb} {done.renamed} keys under {settings.key_prefix!r}")
    for old in done.clashes:
        print(f"not renamed, its new name exists: {old}", file=sys.stderr)
    return 1 if done.clashes else 0


if __name__ == "__main__":
    sys.exit(main())
