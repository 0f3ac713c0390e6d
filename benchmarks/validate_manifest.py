"""How long the Great Expectations suite takes on a full-size (101,000-row) manifest.

The rows are synthesised (101 classes x 750 train + 250 test, realistic sizes, modes and hashes,
a few converted and quarantined rows) so the figure does not depend on having the 5 GB archive.
The suite is timed with and without building Data Docs; a naive baseline runs the same checks as
a Python loop over `DataFrame.iterrows()` in the same process. Budget: 10 s (issue 3).
The last line printed is one JSON object; `ratio` = budget / suite-with-Data-Docs seconds (>1 is
within budget), `speedup_vs_naive_loop` = naive loop seconds / suite-without-docs seconds.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.validate import ALLOWED_MODES, MANIFEST_COLUMNS, Expected, run_expectations  # noqa: E402

BUDGET_S = 10.0
CLASSES = 101
PER_CLASS = {"train": 750, "test": 250}


def synthesise(seed: int = 0) -> tuple[pd.DataFrame, Expected]:
    rng = np.random.default_rng(seed)
    names = [f"class_{i:03d}" for i in range(CLASSES)]
    rows = []
    image = 0
    for split, per_class in PER_CLASS.items():
        for label, name in enumerate(names):
            for _ in range(per_class):
                image += 1
                rows.append((f"images/{name}/{image}.jpg", f"{name}/{image}", name, label, split))
    frame = pd.DataFrame.from_records(rows, columns=["path", "image_id", "class", "label", "split"])
    n = len(frame)
    frame["bytes"] = rng.integers(20_000, 120_000, n)
    frame["sha256"] = [f"{v:064x}" for v in rng.integers(0, 2**63, n, dtype=np.int64)]
    frame["width"] = rng.choice([512, 384, 341], n)
    frame["height"] = rng.choice([512, 384, 288], n)
    frame["mode"] = np.where(rng.random(n) < 0.001, "L", "RGB")
    frame["format"] = "JPEG"
    frame["decodable"] = True
    frame["error"] = None
    frame["status"] = np.where(frame["mode"].eq("RGB"), "ok", "converted")
    bad = rng.choice(n, 20, replace=False)
    frame.loc[bad, ["decodable", "width", "height", "status", "error"]] = [False, 0, 0, "quarantined",
                                                                           "truncated image: synthetic"]
    counts = {(name, split): per for name in names for split, per in PER_CLASS.items()}
    return frame[MANIFEST_COLUMNS], Expected(names, counts, 32, 512, 0.01)


def naive_loop(frame: pd.DataFrame, expected: Expected) -> bool:
    """The same checks, one row at a time: what one would write without a vectorised engine."""
    seen_paths: set[str] = set()
    counts: dict[tuple[str, str], int] = {}
    hash_splits: dict[str, set[str]] = {}
    split_hashes: set[tuple[str, str]] = set()
    ok = True
    quarantined = 0
    for _, row in frame.iterrows():
        ok &= 0 <= row["label"] < len(expected.classes) and row["split"] in ("train", "test")
        ok &= row["path"] not in seen_paths
        seen_paths.add(row["path"])
        counts[(row["class"], row["split"])] = counts.get((row["class"], row["split"]), 0) + 1
        if row["status"] == "quarantined":
            quarantined += 1
            continue
        ok &= bool(row["decodable"])
        ok &= expected.min_side <= row["width"] <= expected.max_side
        ok &= expected.min_side <= row["height"] <= expected.max_side
        ok &= row["mode"] in ALLOWED_MODES
        hash_splits.setdefault(row["sha256"], set()).add(row["split"])
        ok &= (row["split"], row["sha256"]) not in split_hashes
        split_hashes.add((row["split"], row["sha256"]))
    ok &= counts == expected.counts
    ok &= all(len(s) == 1 for s in hash_splits.values())
    return ok and quarantined <= expected.max_quarantine_fraction * len(frame)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    frame, expected = synthesise()
    start = time.perf_counter()
    import great_expectations  # noqa: F401  (import time reported apart: paid once per process)
    import_s = time.perf_counter() - start
    run_expectations(frame.head(1000), expected)  # warm-up: first-use costs inside GX
    with tempfile.TemporaryDirectory() as tmp:
        with_docs = timed(lambda: run_expectations(frame, expected, docs_dir=Path(tmp) / "docs"), 3)
    without_docs = timed(lambda: run_expectations(frame, expected), 3)
    results = run_expectations(frame, expected)
    naive = timed(lambda: naive_loop(frame, expected), 1)
    suite_s = statistics.median(with_docs)
    print(f"rows={len(frame)} suite+docs={suite_s:.2f}s suite={statistics.median(without_docs):.2f}s "
          f"naive loop={naive[0]:.2f}s gx import={import_s:.2f}s", file=sys.stderr)
    print(json.dumps({
        "benchmark": "validate_manifest",
        "rows": len(frame),
        "expectations": len(results),
        "expectations_passed": sum(r["success"] for r in results),
        "suite_with_data_docs_s": [round(s, 3) for s in with_docs],
        "suite_without_data_docs_s": [round(s, 3) for s in without_docs],
        "naive_loop_s": round(naive[0], 3),
        "gx_import_s": round(import_s, 3),
        "budget_s": BUDGET_S,
        "ratio": round(BUDGET_S / suite_s, 2),
        "speedup_vs_naive_loop": round(naive[0] / statistics.median(without_docs), 2),
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count(),
                    "platform": platform.platform()},
    }))


if __name__ == "__main__":
    main()
