"""Control-plane timings of fastfwd with 8,000 forwarded ports, printed as one JSON object.

Run by ``bench.run`` in a fresh process (``python -m bench.control``): loading 8,000 ports
as one range rule, as 800 rules of 10 and as 8,000 rules of one port, and one-rule reloads
(one rule added, one rule re-pointed in the 800-rule table; one rule added to the 8,000-rule
table). Each is ``Forwarder.apply`` timed until it returns, which is when the workers forward
on the new table.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import uvloop

import fastfwd

# Below the ephemeral range, even as widened by the connection-rate run; 8,000 listeners fit
# the open-files limit.
PORTS, FIRST, TARGET = 8000, 3000, 40000
SPAN = 10


def range_rule() -> list[fastfwd.Rule]:
    return [fastfwd.Rule(proto="tcp", listen_port=FIRST, count=PORTS, target_host="127.0.0.1", target_port=TARGET)]


def small_rules(span: int = SPAN) -> list[fastfwd.Rule]:
    return [fastfwd.Rule(proto="tcp", listen_port=FIRST + i, count=span, target_host="127.0.0.1", target_port=TARGET + i)
            for i in range(0, PORTS, span)]


async def timed(fw: fastfwd.Forwarder, rules: list[fastfwd.Rule]) -> float:
    start = time.perf_counter()
    await fw.apply(rules)
    return (time.perf_counter() - start) * 1000


async def once(workers: int) -> dict[str, float]:
    out = {}
    async with fastfwd.Forwarder(workers=workers) as fw:
        out["load_range_8000_ms"] = await timed(fw, range_rule())
    async with fastfwd.Forwarder(workers=workers) as fw:
        table = small_rules()
        out["load_rules_800x10_ms"] = await timed(fw, table)
        # Below the table: FIRST + PORTS (11000) opens the widened ephemeral range, where the
        # connection-rate run leaves its client sockets in TIME_WAIT.
        extra = fastfwd.Rule(proto="tcp", listen_port=FIRST - 1, target_host="127.0.0.1", target_port=TARGET)
        out["reload_add_one_ms"] = await timed(fw, [*table, extra])
        moved = [*table[:-1], table[-1].with_target("127.0.0.2"), extra]
        out["reload_retarget_one_ms"] = await timed(fw, moved)
    async with fastfwd.Forwarder(workers=workers) as fw:
        table = small_rules(span=1)
        out["load_rules_8000x1_ms"] = await timed(fw, table)
        out["reload_add_one_8000x1_ms"] = await timed(fw, [*table, extra])
    return out


async def main(repeats: int, workers: int) -> dict:
    runs = [await once(workers) for _ in range(repeats)]
    return {"workers": workers, "repeats": repeats, **{k: [r[k] for r in runs] for k in runs[0]}}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args()
    print(json.dumps(uvloop.run(main(args.repeats, args.workers))))
