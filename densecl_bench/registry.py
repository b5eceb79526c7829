"""Benchmark discovery through the `densecl_bench.benchmarks` entry-point group.

Built-ins are declared in this package's pyproject.toml exactly as a third-party package would
declare its own, so `run all` treats both alike.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from densecl_bench.benchmarks.base import Benchmark
from densecl_bench.errors import UserError

GROUP = "densecl_bench.benchmarks"
log = logging.getLogger(__name__)


class UnknownBenchmark(UserError, KeyError):
    """A benchmark name that no registered plugin answers to; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def available() -> dict[str, type[Benchmark]]:
    """Every registered benchmark class by canonical name, in registration order."""
    found: dict[str, type[Benchmark]] = {}
    for ep in entry_points(group=GROUP):
        try:
            cls = ep.load()
        except Exception as err:  # a broken plugin package must not take the whole suite down
            log.warning("benchmark plugin %s = %s failed to load: %s: %s", ep.name, ep.value, type(err).__name__, err)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Benchmark)):
            raise TypeError(f"entry point {ep.name} = {ep.value} is not a Benchmark subclass")
        found[cls.name] = cls
    return dict(sorted(found.items(), key=lambda item: (item[1].order, item[0])))


def resolve(names: list[str]) -> list[type[Benchmark]]:
    """Map command-line names (canonical, alias, or `all`) to benchmark classes, keeping order."""
    registry = available()
    by_alias = {alias: cls for cls in registry.values() for alias in (cls.name, *cls.aliases)}
    if "all" in names:
        return list(registry.values())
    chosen: list[type[Benchmark]] = []
    for name in names:
        if name not in by_alias:
            raise UnknownBenchmark(f"unknown benchmark {name!r}; registered: {', '.join(sorted(by_alias))}")
        if by_alias[name] not in chosen:
            chosen.append(by_alias[name])
    return chosen
