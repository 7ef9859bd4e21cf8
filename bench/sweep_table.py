"""The range table of a bench/sweep_variants.sh run, as bench/RESULTS.md records it.

Reads what sweep_variants.sh printed (one or more files) and prints one markdown row per shape, group
size and zero-point kind, one column per build: the range of et_int4 us over the rounds, for each M,
"lo-hi / lo-hi / ..." (a single value where the rounds agree to the hundredth).

    python3 bench/sweep_table.py sweep.txt [--m 1 2 8] [--build LABEL=VARIANT ...]

VARIANT is the variant as the run's "## variant '...' (round N)" headers name it ("default" for the
tree as it is); without --build every variant is a column, in the order the run timed them.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

HEADER = re.compile(r"## variant '(.*)' \(round \d+\)")
ROW = re.compile(r"\|\s*(\d+ x \d+)\s*\|\s*(\d+)\s*\|\s*(\w+)\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|")


def read_sweeps(paths: list[str]) -> tuple[dict, list[str]]:
    """times[(shape, gs, zeros)][(variant, m)] = et_int4 us of each round, and the variants in order."""
    times: dict = defaultdict(lambda: defaultdict(list))
    variants: list[str] = []
    for path in paths:
        variant = None
        with open(path) as f:
            for line in f:
                if header := HEADER.match(line):
                    variant = header.group(1)
                    if variant not in variants:
                        variants.append(variant)
                elif (row := ROW.match(line)) and variant is not None:
                    shape, gs, zeros, m, us = row.groups()
                    times[(shape, gs, zeros)][(variant, int(m))].append(float(us))
    return times, variants


def value_range(values: list[float]) -> str:
    low, high = f"{min(values):.2f}", f"{max(values):.2f}"
    return low if low == high else f"{low}-{high}"


def table(times: dict, builds: list[tuple[str, str]], ms: list[int]) -> list[str]:
    lines = ["| K x N | gs, zeros | " + " | ".join(label for label, _ in builds) + " |",
             "| --- | --- | " + " | ".join("---" for _ in builds) + " |"]
    for (shape, gs, zeros), cells in times.items():
        columns = [" / ".join(value_range(cells[(variant, m)]) if cells.get((variant, m)) else "-" for m in ms)
                   for _, variant in builds]
        lines.append(f"| {shape} | {gs}, {zeros} | " + " | ".join(columns) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--m", type=int, nargs="+", help="the M of each cell (default: every M timed)")
    parser.add_argument("--build", action="append", default=[], metavar="LABEL=VARIANT",
                        help="a column: its heading and the variant it shows")
    args = parser.parse_args()
    times, variants = read_sweeps(args.files)
    builds = [tuple(b.split("=", 1)) for b in args.build] or [(v, v) for v in variants]
    unknown = [variant for _, variant in builds if variant not in variants]
    if unknown:
        parser.error(f"no variant {unknown} in the files; they have {variants}")
    ms = args.m or sorted({m for cells in times.values() for _, m in cells})
    print("\n".join(table(times, builds, ms)))


if __name__ == "__main__":
    main()
