"""The tables ``make bench`` prints: one per broker and worker secret, and the cost of signing."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time

from benchmarks.common import ROOT, ForsetiRun, Results, Row, Stat, mem_available_mib


def fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def cell(stat: Stat | None) -> str:
    if stat is None:
        return "-"
    if not stat.ok:
        return stat.note or "-"
    if len(stat.samples) == 1:
        return fmt(stat.median)
    return f"{fmt(stat.median)} ({fmt(stat.p90)})"


def ratio(row: Row, mine: Stat | None, other: Stat | None) -> str:
    """How forseti compares: '3.1x better' or '2.0x worse' (rates: more is better; times: less)."""
    if mine is None or other is None or not mine.ok or not other.ok or other.median == 0 or mine.median == 0:
        return "-"
    factor = mine.median / other.median
    better = factor >= 1 if row.higher_is_better else factor <= 1
    size = factor if factor >= 1 else 1 / factor
    return f"{size:.1f}x {'better' if better else 'worse'}"


def _half_of(mine: Stat, other: Stat | None) -> bool:
    return other is None or not other.ok or mine.median <= other.median / 2


def times_floor(mine: Stat | None, floor: Stat | None) -> str:
    """forseti's median in floors: '2.3x' (how far from what the broker's client library alone does)."""
    if mine is None or floor is None or not mine.ok or not floor.ok or floor.median == 0:
        return "-"
    return f"{mine.median / floor.median:.1f}x"


def render(rows: list[Row], run: ForsetiRun, ray_results: Results, ray_status: str, ray_notes: list[str]) -> str:
    r = run.results
    head = ["row", "unit", "forseti med (p90)", "floor", "celery task", "celery solo", "ray actors",
            "vs floor", "vs task", "vs solo", "vs ray", "target", "ok"]
    lines = []
    for row in rows:
        mine = r.get(row.id)
        floor = r.get(row.floor) if row.floor else None
        task = r.get(row.celery) if row.celery else None
        solo = r.get(f"{row.celery}_solo") if row.celery else None
        ray = ray_results.get(row.ray) if row.ray else None
        ray_cell = cell(ray) if ray_results else (ray_status if row.ray else "-")
        base = (ray_results.get(row.versus[4:]) if row.versus.startswith("ray.") else r.get(row.versus)) \
            if row.versus else task
        mark = ""
        if row.check is not None and mine is not None and mine.ok:
            mark = "PASS" if row.check(mine.median, base.median if base and base.ok else None) else "FAIL"
            if row.id == "call" and mark == "PASS" and not _half_of(mine, ray_results.get("call")):
                mark = "FAIL"  # issue 15: and at most half Ray's call in the same run
        lines.append([row.label.replace(" N ", f" {run.many:,} ") if run.many else row.label, row.unit,
                      cell(mine), cell(floor), cell(task), cell(solo), ray_cell, times_floor(mine, floor),
                      ratio(row, mine, task), ratio(row, mine, solo), ratio(row, mine, ray), row.target, mark])
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]

    def join(cols: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) if i < 11 else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cols, widths, strict=True))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    signing = "worker secret set, messages signed" if run.signed else "no worker secret"
    out = [f"== {run.kind}: {run.url.replace('guest:guest@', '')} ({signing}) ==", join(head), sep]
    out += [join(line) for line in lines]
    out.append("")
    out.append("Medians with p90 in parentheses. vs floor: forseti's median in floors (benchmarks/floor.py: "
               "a plain client library relay through a pipe to a child and back, same broker, same run). "
               "vs task / vs solo / vs ray: forseti's median against that column's.")
    out += [f"- {note}" for note in run.notes + ray_notes]
    return "\n".join(out)


#: The most signing may cost on a row (issue 10): past it, the secret would not be on by default.
SIGNING_BUDGET = 0.05


def render_signing(rows: list[Row], off: ForsetiRun, on: ForsetiRun) -> str:
    """The cost of signing on every row: the median of the run without a worker secret against
    the one with it (positive: slower with the secret; a rate's change is counted the same way)."""
    head = ["row", "unit", "no secret", "secret set", "cost"]
    lines = []
    for row in rows:
        a, b = off.results.get(row.id), on.results.get(row.id)
        cost = "-"
        if a is not None and b is not None and a.ok and b.ok and a.median and b.median:
            change = (a.median / b.median if row.higher_is_better else b.median / a.median) - 1
            cost = f"{change * 100:+.1f} %{'  (over 5 %)' if change > SIGNING_BUDGET else ''}"
        lines.append([row.label, row.unit, cell(a), cell(b), cost])
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]

    def join(cols: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cols, widths, strict=True))).rstrip()

    sign, check = signing_cost()
    out = [f"== {off.kind}: the cost of signing (forseti_worker_secret), budget 5 % per row ==", join(head),
           "  ".join("-" * w for w in widths), *[join(line) for line in lines], "",
           "Medians (p90) of two runs one after the other on the same machine: a row's noise between runs "
           "(see its p90, and rows 3b and 9a, which no worker takes part in) can exceed the budget by itself.",
           f"- measured in this process, free of that noise: {sign:.1f} us to sign a broker message of 200 bytes, "
           f"{check:.1f} us to check one (HMAC-SHA256, header, replay memory)."]
    call, cold = off.results.get("call"), off.results.get("cold")
    if call is not None and call.ok:
        # A call: one signed broker message (the reply; the request is a client's, unsigned).
        out.append(f"- a call signs its reply: {sign / 1000:.4f} ms = {sign / 10 / call.median:.2f} % of row 4")
    if cold is not None and cold.ok:
        # A new key: spawn order (signed, checked), start report (signed, checked), reply (signed).
        per_key = 3 * sign + 2 * check
        out.append(f"- a new key signs 3 broker messages and checks 2: {per_key / 1000:.4f} ms = "
                   f"{per_key / 10 / cold.median:.2f} % of row 1")
    return "\n".join(out)


def signing_cost(n: int = 20_000) -> tuple[float, float]:
    """Microseconds to sign, and to check, one broker message of 200 bytes."""
    from types import SimpleNamespace

    from forseti_celery.core.signing import Signer

    body = b"x" * 200
    signer, checker = Signer(["s" * 43], "w1@host", 8.0), Signer(["s" * 43], "w2@host", 8.0)
    t0 = time.perf_counter()
    for _ in range(n):
        headers = signer.headers("", "forseti.node.w2@host", body)
    sign = (time.perf_counter() - t0) / n * 1e6
    messages = [SimpleNamespace(headers=signer.headers("", "forseti.node.w2@host", body), body=body,
                                delivery_info={"exchange": "", "routing_key": "forseti.node.w2@host"})
                for _ in range(n)]
    t0 = time.perf_counter()
    for m in messages:
        checker.admit(m, [])
    check = (time.perf_counter() - t0) / n * 1e6
    assert headers and not checker.dropped, "the signing benchmark's own messages did not verify"
    return sign, check


def revision() -> str:
    """The commit measured, and whether the package had uncommitted changes (figures move with them)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "forseti_celery"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes in forseti_celery/' if dirty else ''}"


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    import celery

    return (f"{os.cpu_count()} cores ({model}), {mem_available_mib() / 1024:.1f} GiB free, "
            f"Linux {platform.release()}, Python {platform.python_version()}, Celery {celery.__version__}, "
            f"load average {os.getloadavg()[0]:.2f} at start")

