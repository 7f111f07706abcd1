"""What resolving a request's `model` costs on the hot path, per form: a name, a pinned version (`name@N`,
`name@sha256:HEX`), an alias, and an alias that splits traffic (hashed per user). A registry of --adapters
names with --versions versions each and --aliases aliases (half of them 90/10 splits), resolved through the
server's own AdapterManager from the registry's copy in memory, as a warm request is; the database is not
touched (the script counts reads to prove it).

    .venv/bin/python benchmarks/resolve_cost.py [--adapters 5000] [--versions 5] [--aliases 500]
"""

import argparse
import asyncio
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.registry import (AdapterRecord, AdapterRegistry, AliasRecord, AliasTarget, RegistryView,  # noqa: E402
                               VersionRecord)
from server.adapter_manager import AdapterManager  # noqa: E402
from server.host import detect_host  # noqa: E402


def build(root: Path, args) -> AdapterRegistry:
    """A registry whose copy in memory holds the names, versions and aliases (written there directly: the
    database's content does not enter a warm resolve, which is what is measured)."""
    registry = AdapterRegistry(root, keep_versions=args.versions)
    now, adapters, versions, aliases = time.time(), {}, {}, {}
    for n in range(args.adapters):
        name = f"a{n}"
        versions[name] = {v: VersionRecord(name=name, version=v, kind="lora", num_virtual_tokens=0,
                                           sha256=hashlib.sha256(f"{n}-{v}".encode()).hexdigest(),
                                           folder=f"sha256/{n}-{v}", num_bytes=1, source="bench", created_at=now,
                                           created_by=None)
                          for v in range(1, args.versions + 1)}
        newest = versions[name][args.versions]
        adapters[name] = AdapterRecord(name=name, kind="lora", num_virtual_tokens=0, version=newest.version,
                                       folder=newest.folder, num_bytes=1, is_pinned=False, source="bench",
                                       created_at=now, sha256=newest.sha256)
    for n in range(args.aliases):
        targets = [AliasTarget(adapter=f"a{n}", version=1, weight=90)]
        if n % 2:
            targets.append(AliasTarget(adapter=f"a{n}", version=2, weight=10))
        aliases[f"alias{n}"] = AliasRecord(name=f"alias{n}", targets=targets, updated_at=now, updated_by=None)
    registry.snapshot()  # the database's (empty) registry, at its version: the watcher sees no change to reload
    registry._cache = (registry._cache[0], RegistryView(adapters, versions, aliases))
    return registry


async def measure(manager: AdapterManager, models: list[str], users: list[str | None]) -> float:
    """Microseconds per resolve, over every model in turn."""
    start = time.perf_counter()
    for model, user in zip(models, users):
        assert await manager.resolve(model, user) is not None
    return (time.perf_counter() - start) / len(models) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=5000)
    parser.add_argument("--versions", type=int, default=5)
    parser.add_argument("--aliases", type=int, default=500)
    parser.add_argument("--resolves", type=int, default=50_000)
    args = parser.parse_args()
    print(detect_host().describe())
    with tempfile.TemporaryDirectory() as tmp:
        registry = build(Path(tmp), args)
        manager = AdapterManager(registry, engine=None, base_model="base", base_path=Path(tmp), max_pinned=0)
        reads = []
        registry.snapshot = lambda: reads.append(1)  # a resolve that went to the database would count here
        sha = {n: registry.cached_view().versions[f"a{n}"][3].sha256[:12] for n in range(args.adapters)}
        count, k = args.resolves, range(args.resolves)
        forms = {
            "name": ([f"a{i % args.adapters}" for i in k], [None] * count),
            "name@N": ([f"a{i % args.adapters}@3" for i in k], [None] * count),
            "name@sha256": ([f"a{i % args.adapters}@sha256:{sha[i % args.adapters]}" for i in k], [None] * count),
            "alias": ([f"alias{2 * (i % (args.aliases // 2))}" for i in k], [None] * count),
            "split, per user": ([f"alias{2 * (i % (args.aliases // 2)) + 1}" for i in k], [f"u{i}" for i in k]),
        }
        table = {form: round(asyncio.run(measure(manager, *lists)), 2) for form, lists in forms.items()}
        manager.close()
    assert not reads, "a warm resolve read the database"
    for form, us in table.items():
        print(f"{form:>16}: {us:6.2f} us per resolve")
    print(json.dumps({"host": detect_host().describe(), "adapters": args.adapters, "versions": args.versions,
                      "aliases": args.aliases, "us_per_resolve": table}))


if __name__ == "__main__":
    main()
