"""The fault benches' one table: fixed-width columns, a PASS/MISS/n/a verdict per row,
then each row's notes (bench/chaos.py, bench/cluster.py)."""

from __future__ import annotations

VERDICT = {True: "PASS", False: "MISS", None: "n/a"}


def print_table(columns: list[tuple[str, int]], rows: list[list],
                notes: list[tuple[str, list[str]]]) -> None:
    """columns: (title, width); rows: one cell per column; notes: (row name, lines)."""
    head = " | ".join(f"{c:<{w}}" for c, w in columns)
    print("\n" + head + "\n" + "-" * len(head))
    for cells in rows:
        print(" | ".join(f"{str(x):<{w}}" for x, (_, w) in zip(cells, columns, strict=True)))
    print()
    for name, lines in notes:
        if lines:
            print(f"{name}:")
            for n in lines:
                print(f"  - {n}")
