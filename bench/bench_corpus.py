#!/usr/bin/env python
"""Benchmark of corpus.iter_documents: documents per second and peak RSS growth at 1,000 vs 20,000 documents.

Run `python bench/bench_corpus.py` (~10 minutes on a busy 2-core machine, mostly writing 20,000 files). For each
source (.txt, .jsonl, .parquet with row groups of 1,000 rows, a folder of .txt files) and each size, a fresh
child process (`--child`) imports the reader, resets its peak RSS, streams every document (~1 KB each) and
prints JSON; the parent prints the figures side by side and how much more the peak grew for the larger
corpus than for the smaller one (flat: about 0 MB; Parquet has a fixed cost of ~20-30 MB, Arrow's allocator
and one decoded row group, which stays ~30 MB at 300,000 documents). read_corpus (the whole corpus as a
list) is measured too, for contrast: its growth follows the corpus size. It asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import proc_status_kb, reset_peak_rss  # noqa: E402

SIZES = (1_000, 20_000)
KINDS = ("txt", "jsonl", "parquet", "folder")
WORDS = "the red tram went past a small bakery in Paris while seven dogs watched from the old bridge".split()


def document(i: int) -> str:
    """About 1 KB of text, different for every i."""
    return f"Document {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(190))


def write_corpus(folder: Path, kind: str, n: int) -> Path:
    path = folder / f"c{n}.{kind}"
    if kind == "txt":
        path.write_text("\n".join(document(i) for i in range(n)), encoding="utf-8")
    elif kind == "jsonl":
        with path.open("w", encoding="utf-8") as out:
            out.writelines(json.dumps({"text": document(i)}) + "\n" for i in range(n))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [document(i) for i in range(n)]}), path, row_group_size=1_000)
    else:
        path.mkdir()
        for i in range(n):
            (path / f"{i:06d}.txt").write_text(document(i), encoding="utf-8")
    return path


def child(source: str, whole: bool) -> None:
    """Child process: stream (or, with whole, read_corpus) the source with the peak RSS reset first; print JSON."""
    import pyarrow.parquet  # noqa: F401  (imported before the baseline, as a scan would have it)

    from mechamap_core.corpus import iter_documents, read_corpus

    reset_ok = reset_peak_rss()
    baseline = proc_status_kb()["VmRSS"]
    began = time.perf_counter()
    if whole:
        documents = read_corpus(source)
        count, chars = len(documents), sum(map(len, documents))
    else:
        count = chars = 0
        for doc in iter_documents(source):
            count, chars = count + 1, chars + len(doc.text)
    seconds = time.perf_counter() - began
    growth = proc_status_kb()["VmHWM"] - baseline
    print(json.dumps({"documents": count, "chars": chars, "seconds": seconds, "growth_kb": growth, "reset_ok": reset_ok}))


def measure(source: Path, whole: bool = False) -> dict:
    command = [sys.executable, __file__, "--child", str(source)] + (["--whole"] if whole else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.whole)
    print(f"{'source':<22}{'documents':>10}{'docs/s':>10}{'MB/s':>8}{'peak RSS growth':>17}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(kind, False) for kind in KINDS] + [("jsonl", True)]
        for kind, whole in rows:
            growths = []
            for n in SIZES:
                source = write_corpus(Path(tmp), kind, n) if not whole else Path(tmp) / f"c{n}.{kind}"
                result = measure(source, whole)
                assert result["documents"] == n, result
                label = f"{kind} (read_corpus)" if whole else kind
                rate, mb_rate = n / result["seconds"], result["chars"] / result["seconds"] / 1e6
                print(f"{label:<22}{n:>10,}{rate:>10,.0f}{mb_rate:>8.1f}{result['growth_kb'] / 1024:>14.1f} MB")
                growths.append((result["growth_kb"] / 1024, result["chars"] / 1e6))
            (small, small_mb), (large, large_mb) = growths
            print(f"{'':<22}the corpus grew by {large_mb - small_mb:.1f} MB of text, the peak RSS by {large - small:.1f} MB")


if __name__ == "__main__":
    main()
