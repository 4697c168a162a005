#!/usr/bin/env python3
"""Figures of a long fuzz run from its log (written by run_long.sh).

Usage: python fuzz/run_stats.py /work/fuzz_run [--pid DRIVER_PID]
Prints the runs (restarts), executions (each run's final ``stat::number_of_executed_units``,
or its last ``#N`` status line when it was cut short), crash/hang/oom inputs by kind, the
known-crash hits, and with ``--pid`` the CPU seconds of run_long.sh's finished children plus
the running one.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path


def executions(log: str) -> tuple[int, int]:
    runs = re.split(r"^=== run \d+ started.*$", log, flags=re.M)[1:]
    total = 0
    for run in runs:
        final = re.findall(r"stat::number_of_executed_units: (\d+)", run)
        status = re.findall(r"^#(\d+)\s", run, flags=re.M)
        total += int(final[-1]) if final else (int(status[-1]) if status else 0)
    return len(runs), total


def cpu_seconds(pid: int) -> float:
    ticks = 100.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[13]) + int(fields[14])) / ticks  # children that finished (cutime, cstime)
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for cpid in child.read_text().split():
            f = Path(f"/proc/{cpid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / ticks
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--pid", type=int)
    args = parser.parse_args()
    log = (args.out / "log.txt").read_text(errors="replace")
    runs, execs = executions(log)
    kinds = Counter(p.name.split("-")[0] for p in (args.out / "crashes").iterdir())
    known = Counter(m for m in re.findall(r"known crash \(open, not stopping\) x\d+: (.*)", log))
    print(f"runs {runs}, executions {execs}, corpus {len(list((args.out / 'corpus').iterdir()))} inputs")
    print("inputs saved: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    print(f"known-crash signatures hit (reported, not stopping): {len(known)}")
    if args.pid:
        print(f"CPU seconds so far: {cpu_seconds(args.pid):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
