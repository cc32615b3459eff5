"""Print saved benchmark runs as one markdown table (the README's tables are made with it).

    python3 scripts/bench_table.py bench/results/RUN.json [bench/results/RUN2.json ...]

A row per run and mode: tok/s, the ratios to our AR and to transformers, TPF, acceptance length,
exactness against AR and peak memory (orthrus.bench.report.markdown_table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orthrus.bench.report import SCHEMA, markdown_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="print saved benchmark runs as one markdown table")
    ap.add_argument("runs", nargs="+", type=Path, metavar="RUN.json")
    args = ap.parse_args(argv)
    reports = {}
    for path in args.runs:
        try:
            rep = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"error: cannot read the benchmark report '{path}': {e}", file=sys.stderr)
            return 2
        if not isinstance(rep, dict) or rep.get("schema") != SCHEMA:
            print(f"error: '{path}' is not a benchmark report (no schema {SCHEMA})", file=sys.stderr)
            return 2
        reports[path.stem] = rep
    print(markdown_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
