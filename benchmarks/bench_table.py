"""Shared output of the benchmarks: print a result table and write it as CSV under benchmarks/results/."""
import csv
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_table(rows, name: str) -> Path:
    """Print ``rows`` (dicts) as a ' | '-separated table and write RESULTS/<name>; returns the CSV path."""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row.get(c, "")) for c in cols))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return path
