"""What every benchmark does at the end: a markdown table on stdout, raw rows as JSON."""
import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def report(name: str, columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    """``columns``: (title, key, format spec) per column; writes results/<name>.json."""
    print("| " + " | ".join(title for title, _, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(format(r[key], spec) for _, key, spec in columns) + " |")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump(rows, f, indent=1)
