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


KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}


def keep_freed_memory() -> None:
    """Re-run this benchmark with glibc told to keep freed memory (once, before anything is timed).

    By default glibc returns large freed buffers to the OS, and the first write into a fresh one
    pays a page fault per 4 KiB: 0 to 43,000 faults per DeiT forward at batch 16, varying with the
    order the models run in, since they share the allocator.  Timing models against each other
    then measures the allocator.  jemalloc / tcmalloc keep memory as well; set the variables
    yourself (to anything) to time with the default allocator.
    """
    import sys

    if sys.platform.startswith("linux") and not any(k in os.environ for k in KEEP_FREED_MEMORY):
        print("timing with " + " ".join(f"{k}={v}" for k, v in KEEP_FREED_MEMORY.items()), flush=True)
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **KEEP_FREED_MEMORY})
