"""What keeping freed host memory (``samflow.host_memory``) does to page faults, time and resident size.

Each case runs in a fresh process, with ``keep_freed_memory()`` (as ``samflow``'s commands call it) and
without (``SAMFLOW_KEEP_FREED_MEMORY=0``: glibc's defaults), and allocates float32 tensors over glibc's
32 MiB ``mmap`` threshold, writes them and frees them:

- ``fixed``: the same two sizes at every step (64 and 32 MiB), as a training step of fixed shapes;
- ``varied``: sizes drawn uniformly from 32-128 MiB, three alive at a time, as steps whose shapes change
  (e.g. a varying number of prompt rows).

Reported per case: minor page faults per step and milliseconds per step over the last ``--steps``
steps (after ``--warmup`` steps), and the resident size the process grew by (``VmRSS`` at the end minus
``VmRSS`` before the first step) against the most MiB alive at once.

Example::

    python benchmarks/host_memory.py --json runs/host_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASE = r"""
import json, random, resource, sys, time
import torch
from samflow.host_memory import keep_freed_memory

pattern, warmup, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kept = keep_freed_memory()
torch.set_num_threads(1)


def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


rng = random.Random(0)
alive, most_alive = [], 0.0


def step():
    global most_alive
    sizes = [16 << 20, 8 << 20] if pattern == "fixed" else [rng.randint(8 << 20, 32 << 20)]
    for n in sizes:
        t = torch.empty(n)
        t.fill_(1.0)
        alive.append(t)
    most_alive = max(most_alive, sum(a.numel() * 4 for a in alive) / 2**20)
    if pattern == "fixed":
        alive.clear()
    elif len(alive) > 3:
        alive.pop(rng.randrange(len(alive)))


base = rss_mib()
for _ in range(warmup):
    step()
faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
for _ in range(steps):
    step()
seconds = time.perf_counter() - start
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({
    "pattern": pattern, "kept": kept, "faults_per_step": faults / steps, "ms_per_step": 1000 * seconds / steps,
    "rss_growth_mib": rss_mib() - base, "most_alive_mib": most_alive,
}))
"""


def run_case(pattern: str, keep: bool, warmup: int, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["SAMFLOW_KEEP_FREED_MEMORY"] = "1" if keep else "0"
    done = subprocess.run(
        [sys.executable, "-c", CASE, pattern, str(warmup), str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"host_memory case {pattern} (keep={keep}) failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=100, help="steps before the timed ones (default 100)")
    p.add_argument("--steps", type=int, default=300, help="timed steps (default 300)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = [
        run_case(pattern, keep, args.warmup, args.steps)
        for pattern in ("fixed", "varied")
        for keep in (False, True)
    ]
    print(
        f"{'pattern':8} {'kept':5} {'faults/step':>11} {'ms/step':>8} {'RSS +MiB':>9} {'most alive MiB':>15}"
    )
    for r in rows:
        print(
            f"{r['pattern']:8} {r['kept']!s:5} {r['faults_per_step']:11.0f} {r['ms_per_step']:8.2f} "
            f"{r['rss_growth_mib']:9.0f} {r['most_alive_mib']:15.0f}"
        )
    result = {"rows": rows, "load_average": [round(x, 2) for x in os.getloadavg()]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
