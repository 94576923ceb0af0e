"""``make bench``: forseti_celery side by side with a plain Celery task and Ray named actors.

    python -m benchmarks.run [--broker redis|rabbitmq|both] [--signing off|on|both] [--quick] [--no-ray]

For each broker it starts a cluster of three real workers of :mod:`benchmarks.app` (a
namespace and hostnames of their own), measures every row and prints one table with
medians, p90s, ratios and the issues' targets, beside the floor of each broker (a plain
client-library relay, :mod:`benchmarks.floor`) and a solo-pool Celery task
(:mod:`benchmarks.solo`). With ``--signing both`` (the default) it does so twice per
broker, without and then with a worker secret (``forseti_worker_secret``: every worker
message signed and checked), and prints the cost of signing on every row. Ray runs once
(it needs no broker) and its figures appear in every table. See ``docs/benchmarks.rst``.

Broker URLs: ``FORSETI_BROKER_URL`` replaces the default of its kind; otherwise the local
Redis (db 10) and RabbitMQ when they answer, else an embedded Redis (and no RabbitMQ table).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import shlex
import sys
import time

from benchmarks import aio, async_process, handoff, state, zygote
from benchmarks.cluster import ForsetiBench
from benchmarks.common import Brokers, ForsetiRun, Results, Row, Sizes, log, measure
from benchmarks.probe import probe_main
from benchmarks.ray_bench import bench_ray
from benchmarks.table import machine, render, render_signing, revision


def _half_of_task(value: float, task: float | None) -> bool:
    return task is not None and value <= task / 2


def _twice_the_floor(value: float, floor: float | None) -> bool:
    return floor is not None and value <= 2 * floor


def _at_most(value: float, other: float | None) -> bool:
    return other is not None and value <= other


ROWS = [
    # Targets of rows 1, 2, 3, 3a and 4: issue 15 (the others: issues 5 and 12).
    Row("cold", "1  cold get_key + first call", "ms", target="<= 3 ms", check=lambda v, _: v <= 3, ray="cold",
        floor="floor_rt"),
    Row("batch", "2  batch of 50 new keys, sequential", "keys/s", True, ">= 400/s", lambda v, _: v >= 400,
        ray="batch"),
    Row("batch_threads", "2b batch of 50 new keys, 8 threads", "keys/s", True, ">= 200/s", lambda v, _: v >= 200,
        ray="batch_threads"),
    Row("cold_exec", "1e   row 1, zygote started by exec", "ms", target="<= 3 ms", check=lambda v, _: v <= 3,
        ray="cold", floor="floor_rt"),
    Row("batch_exec", "2e   row 2, zygote started by exec", "keys/s", True, ">= 400/s", lambda v, _: v >= 400,
        ray="batch"),
    Row("lookup_fresh", "3  lookup, fresh client process", "ms", target="<= 2x floor", check=_twice_the_floor,
        celery="task_rt", ray="lookup_fresh", floor="floor_rt", versus="floor_rt"),
    Row("lookup_fresh_connect", "3a   same, first request (connects)", "ms", target="<= ray", check=_at_most,
        ray="lookup_fresh_connect", floor="floor_first", versus="ray.lookup_fresh_connect"),
    Row("lookup_warm", "3b lookup, warm client (same key)", "ms", target="<= 0.05 ms", check=lambda v, _: v <= 0.05,
        ray="lookup_warm"),
    Row("close_fresh", "3c fresh client process: close()", "ms"),
    Row("call", "4  call round trip", "ms", target="<= 2x floor, ray/2", check=_twice_the_floor, celery="task_rt",
        ray="call", floor="floor_rt", versus="floor_rt"),
    Row("send", "5  send to one key", "msg/s", True, ">= 20000/s", lambda v, _: v >= 20_000, celery="task_tput",
        ray="send"),
    Row("uss", "6  USS per keyed process", "MiB", target="<= 5 MiB", check=lambda v, _: v <= 5, ray="uss"),
    Row("create_many", "7a creating the N live keys, 8 threads", "keys/s", True),
    Row("lookup_many", "7  lookup among N keys, new client", "ms", target="<= task/2", check=_half_of_task,
        celery="task_rt", ray="lookup_many", floor="floor_rt"),
    Row("lookup_many_warm", "7b lookup among N keys, warm client", "ms", target="<= 0.05 ms",
        check=lambda v, _: v <= 0.05, ray="lookup_many"),
    Row("failover", "8  leader kill -> serving, N keys", "s", ray="failover"),
    Row("failover_role", "8a   kill -> role passed (event)", "s"),
    Row("failover_serve", "8b   role passed -> serving", "s", target="<= 3 s", check=lambda v, _: v <= 3),
    Row("failover_new", "8c   role passed -> new key created", "s"),
    Row("cli_get", "9  `celery forseti get`, whole command", "ms"),
    Row("cli_help", "9a   start-up alone (`forseti --help`)", "ms"),
    Row("ka_call", "10 key-addressed call, live key", "ms", target="<= 1.1x row 4",
        check=lambda v, base: base is not None and v <= 1.1 * base, versus="call", floor="floor_rt"),
    Row("ka_revive", "11 passivated key, key-addressed call", "ms", target="<= 2x row 1",
        check=lambda v, base: base is not None and v <= 2 * base, versus="cold"),
    Row("ka_revive_held", "11a   same, sends were on its route", "ms", target="<= 2x row 1",
        check=lambda v, base: base is not None and v <= 2 * base, versus="cold"),
    Row("restart", "12 restart after kill -9, transient", "ms", target="<= 100 ms + 0.1 s",
        check=lambda v, _: v <= 200),
    Row("checkpoint", "13 checkpoint added to a call", "ms", target="<= 0.3 ms", check=lambda v, _: v <= 0.3),
    Row("handoff_pause", "14 handoff pause per key, p99 (rolling restart)", "ms", target="<= 50 ms",
        check=lambda v, _: v <= 50),
    Row("rebalance_rate", "15 keys moved per second by a rebalance", "keys/s", True, ">= 200/s",
        lambda v, _: v >= 200),
    Row("async_call", "16 call round trip, async keyed process", "ms", target="<= 1.1x row 4",
        check=lambda v, base: base is not None and v <= 1.1 * base, versus="call"),
    Row("async_uss", "16a USS per idle async keyed process", "MiB", target="<= 1.1x row 6",
        check=lambda v, base: base is not None and v <= 1.1 * base, versus="uss"),
    *aio.ROWS,  # rows 17-17d: the async client (issue 14)
]


def measure_more(bench: ForsetiBench) -> None:
    """Rows measured after :meth:`ForsetiBench.measure_all`, on the same cluster: each topic's own
    module (``benchmarks/<topic>.py``) adds one line here, and its ``Row`` to :data:`ROWS` above::

        measure(bench.run.results, "my_row", lambda: mytopic.my_row(bench))
    """
    r = bench.run.results
    measure(r, "checkpoint", lambda: state.checkpoint_cost(bench))
    handoff.measure_rows(bench)  # rows 14 and 15: one cluster of movable keys of their own
    async_process.measure_rows(bench)  # row 16a (row 16 is sampled with row 4): idle "async-echo" processes
    aio.measure_rows(bench)  # rows 17-17d: the async client
    zygote.measure_rows(bench)  # rows 1e, 2e: rows 1 and 2 on a cluster whose zygotes are started by exec


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        probe_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["redis", "rabbitmq", "both"], default="both",
                        help="which broker(s) to measure forseti_celery and Celery on (default both)")
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run with fewer repetitions")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray column")
    parser.add_argument("--signing", choices=["off", "on", "both"], default="both",
                        help="workers without a worker secret, with one (every worker message signed), or both "
                             "runs and the cost of signing per row (default both)")
    parser.add_argument("--keys", type=int, default=None, help="live keys for rows 7-8 (default 1000, quick 150)")
    args = parser.parse_args(argv)
    sizes = Sizes.pick(args.quick, args.keys)
    command = "python -m benchmarks.run " + shlex.join(argv)
    header = [f"forseti_celery benchmark: {command.strip()}", f"machine: {machine()}",
              f"forseti_celery: {revision()}"]
    log(header[0])
    kinds = ["redis", "rabbitmq"] if args.broker == "both" else [args.broker]
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.signing]
    started = time.monotonic()
    brokers = Brokers()
    runs: list[ForsetiRun] = []
    try:
        for kind in kinds:
            url = brokers.url(kind)
            if url is None:
                log(f"{kind}: no broker reachable, skipped")
                runs.append(ForsetiRun(kind, "not reachable", notes=["skipped: broker not reachable"]))
                continue
            for signed in modes:
                log(f"{kind}: {'with' if signed else 'without'} a worker secret")
                bench = ForsetiBench(kind, url, brokers.result_redis(url), sizes, signed=signed)
                with bench:
                    try:
                        bench.start()
                        bench.measure_all()
                        measure_more(bench)
                    except Exception as exc:
                        first = str(exc).splitlines()[0] if str(exc) else ""
                        bench.run.notes.append(f"aborted: {type(exc).__name__}: {first}"[:300])
                        log(f"{kind}: aborted: {exc}")
                runs.append(bench.run)
        ray_results: Results = {}
        ray_notes: list[str] = []
        if args.no_ray:
            ray_status = "ray skipped"
        else:
            # Ray's raylet warnings are printed to stdout, which carries only the tables.
            with contextlib.redirect_stdout(sys.stderr):
                ray_results, ray_notes, ray_status = bench_ray(sizes)
    finally:
        brokers.close()
    header.append(f"ray: {ray_status}; whole run {time.monotonic() - started:.0f} s")
    print("\n".join(header))
    for run in runs:
        print()
        print(render(ROWS, run, ray_results, ray_status, ray_notes))
    for off, on in itertools.pairwise(runs):
        if off.kind == on.kind and not off.signed and on.signed:
            print()
            print(render_signing(ROWS, off, on))
    return 0


if __name__ == "__main__":
    sys.exit(main())
