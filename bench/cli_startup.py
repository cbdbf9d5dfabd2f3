"""Start-up time of the torch-free commands: ``qtool -h``, ``qtool plan --params 65e9 --rank 16``,
``qtool plan --list-models``, each run as a fresh process, next to the interpreter alone (``python -c pass``).

Prints, per command, the first run (cold-ish: the file cache may already be warm), then the median, min and max of
the next N runs, in seconds of wall time from spawn to exit, and the median CPU time (user + system) of the process,
which other load on the machine disturbs less than wall time. By default the worktree's qtool is run (this checkout,
first on sys.path); ``--qtool PATH`` times an installed console script instead. Numbers depend on the machine and its
load; the load average is printed with them.

    python bench/cli_startup.py            # 15 runs each
    python bench/cli_startup.py --runs 30
    python bench/cli_startup.py --qtool "$(which qtool)"
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["-h"], ["plan", "--params", "65e9", "--rank", "16"], ["plan", "--list-models"])
# what the console script does, with this checkout first on sys.path
LAUNCH = f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.argv[0] = 'qtool'; from qtool.cli import main; main()"


def seconds(argv: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per command after the first (default 15)")
    parser.add_argument("--qtool", help="an installed qtool console script to time instead of this checkout")
    args = parser.parse_args()
    prefix = [args.qtool] if args.qtool else [sys.executable, "-c", LAUNCH]
    cases = [("python -c pass (interpreter alone)", [sys.executable, "-c", "pass"])]
    cases += [("qtool " + " ".join(cmd), prefix + cmd) for cmd in COMMANDS]
    print(f"wall seconds: the first run, then median, min, max of {args.runs} more; CPU: median user + system "
          f"seconds (load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)")
    print(f"{'command':<44} {'first':>7} {'median':>7} {'min':>7} {'max':>7} {'CPU':>7}")
    for label, argv in cases:
        first, _ = seconds(argv)
        walls, cpus = zip(*(seconds(argv) for _ in range(args.runs)))
        print(f"{label:<44} {first:7.3f} {statistics.median(walls):7.3f} {min(walls):7.3f} {max(walls):7.3f} "
              f"{statistics.median(cpus):7.3f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}; code: {'installed ' + args.qtool if args.qtool else ROOT}")


if __name__ == "__main__":
    main()
