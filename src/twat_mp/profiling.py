"""Per-op timing of task graphs: ``with twat_mp.profile() as prof:``.

While a profile is open, every runtime records, for each task that finishes, how long it
waited between becoming ready and starting (``queue wait``) and how long it ran
(``latency``), and for every dependency the edge ``producer -> consumer`` between op
names.

>>> from twat_mp import op, profile
>>> @op(kind="inline")
... def one():
...     return 1
>>> @op(kind="inline")
... def inc(x):
...     return x + 1
>>> with profile() as prof:
...     inc.go(one.go()).result()
2
>>> prof.to_dict()["ops"]["inc"]["count"]
1
>>> prof.edges
{('one', 'inc'): 1}
"""

from __future__ import annotations

import collections
import threading
from typing import Any

__all__ = ["Profile", "profile"]

#: The profiles open now; runtimes record into each (read without a lock: a list swap).
active: list[Profile] = []
_lock = threading.Lock()


class Profile:
    """What a ``profile()`` block recorded: per op, the count, latencies and queue waits
    of its tasks; and the dependency edges between ops with how often each was seen."""

    def __init__(self) -> None:
        self._latencies: dict[str, list[float]] = collections.defaultdict(list)
        self._waits: dict[str, list[float]] = collections.defaultdict(list)
        self._failures: collections.Counter[str] = collections.Counter()
        self.edges: dict[tuple[str, str], int] = {}

    # -- recording (called by runtimes; list.append is atomic under the GIL) -------------
    def record(self, name: str, wait: float, latency: float, failed: bool) -> None:
        self._latencies[name].append(latency)
        self._waits[name].append(wait)
        if failed:
            self._failures[name] += 1

    def edge(self, producer: str, consumer: str) -> None:
        key = (producer, consumer)
        self.edges[key] = self.edges.get(key, 0) + 1

    def __enter__(self) -> Profile:
        global active
        with _lock:
            active = [*active, self]
        return self

    def __exit__(self, *exc: Any) -> None:
        global active
        with _lock:
            active = [p for p in active if p is not self]

    # -- reading ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"ops": {name: {count, failed, total_s, mean_s, p95_s, wait_mean_s,
        wait_p95_s}}, "edges": [{"from", "to", "count"}]}``."""
        ops: dict[str, Any] = {}
        for name, latencies in self._latencies.items():
            waits = self._waits[name]
            ops[name] = {
                "count": len(latencies),
                "failed": self._failures[name],
                "total_s": sum(latencies),
                "mean_s": sum(latencies) / len(latencies),
                "p95_s": _percentile(latencies, 0.95),
                "wait_mean_s": sum(waits) / len(waits),
                "wait_p95_s": _percentile(waits, 0.95),
            }
        edges = [{"from": a, "to": b, "count": n} for (a, b), n in sorted(self.edges.items())]
        return {"ops": ops, "edges": edges}

    def to_mermaid(self) -> str:
        """The dependency graph between ops as a Mermaid flowchart, each node with its
        task count and mean latency, each edge with how many dependencies it stands for."""
        ops = self.to_dict()["ops"]
        names = sorted(set(ops) | {n for edge in self.edges for n in edge})
        ids = {name: f"op{i}" for i, name in enumerate(names)}
        lines = ["flowchart TD"]
        for name in names:
            stats = ops.get(name)
            label = name if stats is None else f"{name}<br/>{stats['count']}x, mean {stats['mean_s'] * 1e3:.2f} ms"
            lines.append(f'    {ids[name]}["{label}"]')
        for (a, b), count in sorted(self.edges.items()):
            lines.append(f"    {ids[a]} -->|{count}| {ids[b]}")
        return "\n".join(lines)

    def __str__(self) -> str:
        ops = self.to_dict()["ops"]
        if not ops:
            return "Profile: no task finished"
        rows = [f"{'op':<24} {'count':>7} {'failed':>6} {'total ms':>10} {'mean ms':>9} {'p95 ms':>8} "
                f"{'wait ms':>8}"]
        for name, s in sorted(ops.items(), key=lambda kv: -kv[1]["total_s"]):
            rows.append(f"{name[:24]:<24} {s['count']:>7} {s['failed']:>6} {s['total_s'] * 1e3:>10.2f} "
                        f"{s['mean_s'] * 1e3:>9.3f} {s['p95_s'] * 1e3:>8.3f} {s['wait_mean_s'] * 1e3:>8.3f}")
        if self.edges:
            rows.append("edges: " + ", ".join(f"{a} -> {b} ({n})" for (a, b), n in sorted(self.edges.items())))
        return "\n".join(rows)

    def __repr__(self) -> str:
        ops = self.to_dict()["ops"]
        return f"<Profile {len(ops)} ops, {sum(s['count'] for s in ops.values())} tasks, {len(self.edges)} edges>"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def profile() -> Profile:
    """Record per-op counts, latencies (total, mean, p95), queue waits and dependency
    edges of every task that finishes inside the ``with`` block, on any runtime."""
    return Profile()
