"""The key layout (common/keys.py) and what the source tree may do with Redis: every key as it is on the wire (a
change here is a migration); no module but the keys module builds a key string; nothing but the stores touches
a raw Redis client; every Lua script names in KEYS each key it touches and documents its KEYS and ARGV."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from common.keys import Keys

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ("common", "api", "worker", "client", "scripts")
KEYS_MODULE = "common/keys.py"
# The store classes: they alone hold a client and run commands (api/job_events.py holds the API's one pub/sub
# connection; common/redis_server.py pings the server it starts).
STORES = {
    "common/job_store.py",
    "common/dataset_store.py",
    "common/worker_registry.py",
    "common/batch_log.py",
    "common/api_keys.py",
    "common/rate_limit.py",
}
PUB_SUB_AND_SERVER = {"api/job_events.py", "common/redis_server.py"}
MIGRATION = {"common/key_migration.py"}  # renames keys by their names: SCAN and RENAMENX

# The names of the layout's parts, as a key string would carry them between colons.
PARTS = (
    "job|queued|running|recent|tenant-queued|ready|ready-tenants|workers|holders|idem|outbox|seq|ended|progress|worker|held|sweep-lock|"
    "image-sweep-lock|batches|dataset|datasets|dataset-idem|apikey|apikeys|rate|active|inflight|done|rows|failed|"
    "canceled|retry|lock"
)
KEY_BUILDING = {
    "an f-string joining a prefix and ':'": re.compile(r"\{[^{}\n]*prefix[^{}\n]*\}:"),
    "a prefix concatenated with ':'": re.compile(r"prefix\s*\+\s*['\"]:|['\"]:['\"]\s*\+\s*[\w.]*prefix"),
    "a ':'.join": re.compile(r"['\"]:['\"]\.join\("),
    "a key helper called with a part's name": re.compile(r"\.key\(\s*['\"]"),
    "a key helper of a store or record module": re.compile(
        r"\b(held_key|status_key|active_key|_hash_key|_idem_key|worker_status\.key)\b"
    ),
    "a key or prefix concatenated inside a Lua script": re.compile(r"(KEYS|ARGV)\[[^\]]+\]\s*\.\."),
}
RAW_CLIENT = {
    "a store's client (`.r`, `._r`)": re.compile(r"\.(_?r)\b(?!['\"(])"),
    "the API's client (`services.redis`)": re.compile(r"\bservices\.redis\b"),
    "a Redis command": re.compile(
        r"\.(hget|hset|hgetall|hmget|hdel|hincrby|hkeys|hvals|zadd|zrem|zcard|zrank|zrange|zrevrange|zrangebyscore|"
        r"zscore|sadd|srem|smembers|scard|lpush|rpush|lpop|lrange|ltrim|llen|lindex|lrem|incr|expire|persist|"
        r"scan_iter|mget|pipeline|register_script)\("
    ),
}


def sources(root: Path = ROOT) -> dict[str, str]:
    """Every Python file of the service (not tests, not benchmarks), by path from the repository root."""
    return {
        path.relative_to(root).as_posix(): path.read_text()
        for top in SOURCE
        for path in sorted((root / top).rglob("*.py"))
    }


LITERAL = "a string naming a part after a colon"
LITERAL_PART = re.compile(rf":({PARTS})(:|$)")  # e.g. "sdxl:batches", or f"{p}:job:{id}"'s ":job:"


def offences(root: Path, patterns: dict[str, re.Pattern], allowed: set[str], literals: bool = False) -> list[str]:
    """path:line: what: the line, for each line a pattern matches; with `literals`, also for each string in
    the code (docstrings aside) that names a part of the layout after a colon."""
    found = []
    for name, text in sources(root).items():
        if name in allowed:
            continue
        lines = text.splitlines()
        for number, line in enumerate(lines, 1):
            found += [f"{name}:{number}: {what}: {line.strip()}" for what, p in patterns.items() if p.search(line)]
        if literals:
            for node in _strings(ast.parse(text)):
                if LITERAL_PART.search(node.value):
                    found.append(f"{name}:{node.lineno}: {LITERAL}: {lines[node.lineno - 1].strip()}")
    return found


def _strings(tree: ast.AST) -> list[ast.Constant]:
    """The string constants of a module (the pieces of f-strings among them), docstrings aside."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def scripts(root: Path = ROOT) -> dict[str, str]:
    """Every Lua script in the source: string constants that call Redis, by module and name."""
    found = {}
    for name, text in sources(root).items():
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
                and "redis.call(" in node.value.value
            ):
                found[f"{name}:{node.targets[0].id}"] = node.value.value  # type: ignore[attr-defined]
    return found


def test_the_layout_on_the_wire():
    k = Keys("P")
    run = k.run("R")
    assert [
        k.job("j"),
        k.queued,
        k.running,
        k.recent("T"),
        k.tenant_queued("T"),
        k.ready("m", "T"),
        k.ready_tenants("m"),
        k.idempotency("T", "h"),
        k.outbox,
        k.seq,
        k.ended,
        k.progress,
        k.worker("w"),
        k.workers,
        k.held("w"),
        k.holders,
        k.sweep_lock,
        k.image_sweep_lock,
        k.batches,
        k.datasets_active,
        k.datasets_recent("T"),
        k.dataset_idempotency("T", "h"),
        k.api_key("h"),
        k.api_key_ids,
        k.rate_window("read", "id", 7),
        k.everything,
    ] == [
        "{P}:job:j",
        "{P}:queued",
        "{P}:running",
        "{P}:recent:T",
        "{P}:tenant-queued:T",
        "{P}:ready:m:T",
        "{P}:ready-tenants:m",
        "{P}:idem:T:h",
        "{P}:outbox",
        "{P}:seq",
        "P:ended",
        "P:progress",
        "{P}:worker:w",
        "{P}:workers",
        "{P}:held:w",
        "{P}:holders",
        "P:sweep-lock",
        "P:image-sweep-lock",
        "P:batches",
        "{P}:datasets:active",
        "{P}:datasets:recent:T",
        "P:dataset-idem:T:h",
        "{P}:apikey:h",
        "{P}:apikeys",
        "P:rate:read:id:7",
        ("{P}:*", "P:*"),
    ]
    parts = ("inflight", "done", "rows", "failed", "canceled", "retry", "rate", "lock")
    assert run.record == "{P}:dataset:R" and [getattr(run, p) for p in parts] == [f"{{P}}:dataset:R:{p}" for p in parts]
    kept = ("", ":done", ":failed", ":rate", ":rows", ":canceled")  # what _FINISH used to expire by suffix
    assert run.kept == tuple(f"{{P}}:dataset:R{suffix}" for suffix in kept)
    assert k.worker_name(b"{P}:worker:host-1-2") == "host-1-2" and k.held_worker("{P}:held:host-1-2") == "host-1-2"
    with pytest.raises(ValueError):
        Keys("a}b")  # the prefix is the hash tag: a brace in it would end the tag early


def test_each_tagged_key_is_renamed_from_its_name_before_the_tags_and_no_other():
    """Before hash tags every key was P:<part>...: `renamed` maps each tagged key's old name to its name now, and
    leaves those that kept theirs (and keys not of the layout, such as a queue named P:something) alone."""
    k = Keys("P")
    run = k.run("R")
    tagged = [k.job("j"), k.queued, k.running, k.recent("T"), k.tenant_queued("T"), k.ready("m", "T")]
    tagged += [k.ready_tenants("m"), k.idempotency("T", "h"), k.outbox, k.seq, k.worker("w"), k.workers]
    tagged += [k.held("w"), k.holders, k.datasets_active, k.datasets_recent("T"), k.api_key("h"), k.api_key_ids]
    tagged += [run.record, run.inflight, run.done, run.rows, run.failed, run.canceled, run.retry, run.rate, run.lock]
    alone = [k.sweep_lock, k.image_sweep_lock, k.batches, k.dataset_idempotency("T", "h"), k.rate_window("r", "i", 7)]
    assert all(key.startswith("{P}:") for key in tagged) and not any(key.startswith("{") for key in alone)
    assert [k.renamed("P:" + key.removeprefix("{P}:")) for key in tagged] == tagged
    assert [k.renamed(key) for key in alone] == [None] * len(alone)
    others = ("P:queue-name", "Q:job:j", "PP:job:j", b"P:job:j")
    assert [k.renamed(name) for name in others] == [None, None, None, "{P}:job:j"]


def test_no_key_string_is_built_outside_the_keys_module():
    assert offences(ROOT, KEY_BUILDING, {KEYS_MODULE}, literals=True) == []


def test_no_raw_redis_client_outside_the_stores():
    assert offences(ROOT, RAW_CLIENT, STORES | PUB_SUB_AND_SERVER | MIGRATION) == []


def test_the_checks_see_what_they_look_for(tmp_path):
    """Each pattern catches the kind of line it names (the ways keys were built before common/keys.py), and
    every such line is caught."""
    building = [
        'a = f"{self.prefix}:dataset:{run_id}"',
        'b = settings.key_prefix + ":batches"',
        'c = ":".join((self.prefix, *parts))',
        'd = store.key("sweep-lock")',
        "e = worker_status.key(prefix, name)",
        'f = BATCHES = "sdxl:batches"',
        "g = \"local q = ARGV[7] .. ':tenant-queued:' .. tenant\"",
    ]
    raw = ["h = store.r.set(lock, owner)", "i = services.redis.ping()", "j = client.scan_iter(match=pattern)"]
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker" / "bad.py").write_text("\n".join(building + raw) + "\n")
    caught = offences(tmp_path, KEY_BUILDING, set(), literals=True)
    assert {int(c.split(":")[1]) for c in caught} == set(range(1, len(building) + 1))
    assert {c.split(": ")[1] for c in caught} == {*KEY_BUILDING, LITERAL}
    caught = offences(tmp_path, RAW_CLIENT, set())
    assert {int(c.split(":")[1]) for c in caught} == set(range(len(building) + 1, len(building) + len(raw) + 1))
    assert {c.split(": ")[1] for c in caught} == set(RAW_CLIENT)


@pytest.mark.parametrize("name", sorted(scripts()))
def test_a_script_touches_only_keys_it_is_given_and_documents_them(name):
    script = scripts()[name]
    assert "-- KEYS" in script and "-- ARGV" in script, f"{name}: document its KEYS and ARGV in the script"
    calls = re.findall(r"redis\.call\(\s*'(\w+)'\s*,\s*([^,)]+)", script)
    assert calls, name
    for command, key in calls:
        if command.upper() == "PUBLISH":  # a channel, not a key
            continue
        assert key.strip().startswith("KEYS["), f"{name}: {command} on {key.strip()}, which is not in KEYS"
