"""Print a benchmark's table (one dict per row) and write it as benchmarks/results/<name>.csv."""
import csv
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_table(table, name: str) -> Path:
    """Print ``table`` as ``a | b | c`` lines and write it to results/<name>.csv; returns the CSV path."""
    cols = list(table[0])
    print(" | ".join(cols))
    for row in table:
        print(" | ".join(str(row[c]) for c in cols))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=cols)
        writer.writeheader()
        writer.writerows(table)
    return path
