"""The machine-wide memory a command takes at its peak: MemAvailable (/proc/meminfo) sampled every 50 ms
while the command runs, its lowest point subtracted from its value at the start. Counts every process the
command starts (for `lorakit train --nproc N`, torchrun and all its workers).

    .venv/bin/python benchmarks/machine_memory.py lorakit train --model builtin:smollm2 --steps 6 --batch-size 4 \
        --max-length 128 --targets all-linear --rank 16 --eval-limit 16 --quiet --out /tmp/m --nproc 2 --shard

Other programs running at the same time are counted too: measure on an otherwise idle machine.
"""

from __future__ import annotations

import subprocess
import sys
import time


def available_kib() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise OSError("MemAvailable missing from /proc/meminfo")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    start = lowest = available_kib()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        lowest = min(lowest, available_kib())
        time.sleep(0.05)
    print(f"machine-wide peak {(start - lowest) / 2**20:.2f} GiB, wall {time.perf_counter() - t0:.0f} s, "
          f"exit status {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
