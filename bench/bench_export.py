"""Export speed: CSV, JSON and Parquet of a whole bundled-model scan (73,728 rows), each against the scan itself."""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401 - puts the repository on sys.path
from common import fmt_s, load_average, med, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from mechamap_core import export, load_config, load_model, scan

    torch.set_num_threads(1)
    print(f"# Export speed, 1 torch thread; load average at start {load_average()}\n")
    lm = load_model("bundled", device="cpu")
    cfg = load_config(common.CONFIG)
    started = time.perf_counter()
    result = scan(lm, cfg)
    scan_s = time.perf_counter() - started
    rows = []
    for name, write in (("CSV", export.to_csv), ("JSON", export.to_json), ("Parquet", export.to_parquet)):
        times, size = [], 0
        for _ in range(args.repeats):
            started = time.perf_counter()
            size = len(write(result))
            times.append(time.perf_counter() - started)
        rows.append([name, fmt_s(med(times)), f"{med(times) / scan_s:.2f}x", f"{size / 2**20:.1f} MiB"])
    rows.append(["(the scan itself)", fmt_s(scan_s), "1.00x", ""])
    print(f"bundled MiniLM, {len(result.scores):,} rows, median of {args.repeats}\n")
    print(table(["export", "time", "/ scan", "size"], rows))


if __name__ == "__main__":
    main()
