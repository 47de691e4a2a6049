"""Check a training CSV before a long run: every row, in parallel, with the trainer's own loader.

Each image goes through `volume_io.load_volume`, the function the training data set calls, so a row
that passes here loads in training. Rows are numbered as data rows counted from 1 (the header is not
a row; with multi-line reports this differs from the file's line number), as in every error message.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from .errors import DataError
from .volume_io import SHAPE_HINT, load_volume, shape_outliers

DEFAULT_SPLITS = ("train", "val", "test")
RESULT_COLUMNS = ["row", "img_path", "split", "ok", "checks", "reason", "shape", "dtype"]


def _image_check(problem: str) -> str:
    """Short name of the failed image check, for the summary (the full text stays in `reason`)."""
    p = problem.lower()
    for needle, name in (
        ("not found", "exists"),
        ("is a folder", "exists"),
        ("not a regular file", "exists"),
        ("cannot read", "loads"),
        ("plain .npy", "loads"),
        ("not an npz archive", "loads"),
        ("member '", "loads"),
        ("empty array", "size"),
        ("key '", "key"),
        ("4-d", "ndim"),
        ("channels", "channels"),
        ("dtype", "dtype"),
        ("nan", "finite"),
        ("outside [0, 1]", "range"),
    ):
        if needle in p:
            return name
    return "image"


def _check_image(path: str, npz_key: str, channels: int | None, check_values: bool) -> dict[str, Any]:
    try:
        arr = load_volume(path, npz_key, channels, check_values=check_values)
    except DataError as e:
        return {"ok": False, "check": _image_check(e.problem), "reason": e.problem, "shape": "", "dtype": ""}
    except Exception as e:  # anything the loader did not anticipate is still this row's problem, not a crash
        return {"ok": False, "check": "loads", "reason": f"{type(e).__name__}: {e}", "shape": "", "dtype": ""}
    return {"ok": True, "check": "", "reason": "", "shape": "x".join(map(str, arr.shape)), "dtype": str(arr.dtype)}


def read_table(csv_file: Path, columns: dict[str, str]) -> pd.DataFrame:
    """Read the CSV as the trainer does; one `DataError` for a missing file or column."""
    if not csv_file.is_file():
        raise DataError("CSV file not found", path=str(csv_file), hint="check --csv_file")
    try:
        df = pd.read_csv(csv_file, dtype={c: str for c in columns.values()})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"cannot parse CSV ({' '.join(str(e).split())})", path=str(csv_file)) from None
    missing = [f"'{col}' ({flag})" for flag, col in columns.items() if col not in df.columns]
    if missing:
        raise DataError(
            f"required column missing: {', '.join(missing)}; columns are: {', '.join(map(str, df.columns))}",
            path=str(csv_file),
            hint="rename the column or pass the flag with the right name",
        )
    if df.empty:
        raise DataError("CSV has no data rows", path=str(csv_file))
    return df


def validate_csv(
    csv_file: str | Path,
    *,
    img_path_column: str = "img_path",
    findings_column: str = "findings",
    split_column: str = "split",
    npz_key: str = "image",
    channels: int | None = 2,
    splits: tuple[str, ...] | list[str] = DEFAULT_SPLITS,
    train_split: str = "train",
    val_split: str | None = "val",
    workers: int | None = None,
    check_values: bool = True,
    bad_rows_file: str | Path | None = None,
    report: bool = True,
) -> pd.DataFrame:
    """Check every row; return one result per row (columns `RESULT_COLUMNS`), bad rows written to a file.

    Per row: image path given, file exists and loads, key, 4-D, channel count, float dtype, finite
    values in [0, 1] (all through `load_volume`), the shape of most files (one batch stacks one shape), report present, split known, not a repeat of an
    earlier row (same image and report) nor an image of another split. Table-wide problems (no
    `train_split` rows, or no `val_split` rows unless it is '' or None, as the trainer requires) go
    to `result.attrs["problems"]`.
    Raises `DataError` when the CSV itself is unusable (missing file or column).
    With `report`, prints a summary and writes the bad rows to `bad_rows_file` (default
    `<csv stem>_bad_rows.csv` beside the CSV); its path is in `result.attrs["bad_rows_file"]`.
    """
    csv_file = Path(csv_file)
    cols = {"--img_path_column": img_path_column, "--findings_column": findings_column, "--split_column": split_column}
    df = read_table(csv_file, cols)
    n = len(df)
    root = csv_file.resolve().parent
    raw = df[img_path_column].fillna("").astype(str).str.strip()
    # normpath: "a.npz" and "./a.npz" are one file, for the duplicate check as for the loader
    resolved = [os.path.normpath(Path(p) if Path(p).is_absolute() else root / p) if p else "" for p in raw]
    split_values = df[split_column].fillna("").astype(str).str.strip()
    texts = df[findings_column]

    problems: list[list[tuple[str, str]]] = [[] for _ in range(n)]  # (check, reason) per row
    first_seen: dict[str, int] = {}
    shared_images = 0
    for i, path in enumerate(resolved):
        if not path:
            problems[i].append(("path", "empty image path"))
            continue
        if path in first_seen:
            # A second report for the same scan in the same split is allowed (and counted in the summary);
            # a repeated row, or one scan in two splits (a leak into validation), is not.
            j = first_seen[path]
            if split_values.iloc[i] != split_values.iloc[j]:
                problems[i].append(
                    (
                        "duplicate",
                        f"same image as row {j + 1}, in split '{split_values.iloc[j]}' there: leaks between splits",
                    )
                )
            elif texts.iloc[i] == texts.iloc[j] or (pd.isna(texts.iloc[i]) and pd.isna(texts.iloc[j])):
                problems[i].append(("duplicate", f"duplicate of row {j + 1}"))
            else:
                shared_images += 1
        else:
            first_seen[path] = i
    allowed = list(dict.fromkeys([*splits, train_split, *([val_split] if val_split else [])]))
    for i, value in enumerate(split_values):
        if not value:
            problems[i].append(("split", "empty split"))
        elif value not in allowed:
            problems[i].append(("split", f"unknown split '{value}' (expected one of: {', '.join(allowed)})"))
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            problems[i].append(("report", "empty report"))

    # Each distinct file is loaded once, in forked processes: numpy parses NPZ headers with `ast`, which is
    # not thread-safe on every Python 3.11 release (a rare SystemError under a thread pool).
    unique = list(first_seen)
    workers = workers or min(8, os.cpu_count() or 1)
    images: dict[str, dict[str, Any]] = {}
    ctx = multiprocessing.get_context("fork")
    with cf.ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx) as pool:
        futures = {pool.submit(_check_image, p, npz_key, channels, check_values): p for p in unique}
        for fut in tqdm(
            cf.as_completed(futures),
            total=len(futures),
            desc="Checking volumes",
            unit="file",
            disable=not report,
            dynamic_ncols=True,
        ):
            images[futures[fut]] = fut.result()
    shapes = {p: [int(n) for n in img["shape"].split("x")] for p, img in images.items() if img["ok"]}
    for path, problem in shape_outliers(shapes)[1].items():
        images[path] = {**images[path], "ok": False, "check": "shape", "reason": f"{problem} ({SHAPE_HINT})"}

    records = []
    for i, path in enumerate(resolved):
        img = images.get(path)
        row_problems = list(problems[i])
        if img is not None and not img["ok"]:
            row_problems.insert(0, (img["check"], img["reason"]))
        records.append(
            {
                "row": i + 1,
                "img_path": raw.iloc[i],
                "split": split_values.iloc[i],
                "ok": not row_problems,
                "checks": ",".join(c for c, _ in row_problems),
                "reason": "; ".join(r for _, r in row_problems),
                "shape": img["shape"] if img else "",
                "dtype": img["dtype"] if img else "",
            }
        )
    result = pd.DataFrame.from_records(records, columns=RESULT_COLUMNS)

    table_problems = []
    found = ", ".join(sorted(set(split_values) - {""})) or "none"
    if not (split_values == train_split).any():
        table_problems.append(f"no rows in split '{train_split}' (splits present: {found}; see --train_split)")
    if val_split and not (split_values == val_split).any():
        table_problems.append(
            f"no rows in split '{val_split}' (splits present: {found}; pass --val_split '' to train without validation)"
        )
    result.attrs["problems"] = table_problems
    result.attrs["rows_sharing_an_image"] = shared_images
    result.attrs["csv_file"] = str(csv_file)
    if report:
        bad_path = Path(bad_rows_file) if bad_rows_file else csv_file.with_name(f"{csv_file.stem}_bad_rows.csv")
        write_bad_rows(result, df, bad_path)
        result.attrs["bad_rows_file"] = str(bad_path) if not result["ok"].all() else ""
        print_summary(result)
    return result


def write_bad_rows(result: pd.DataFrame, df: pd.DataFrame, path: Path) -> None:
    """The failing rows as they are in the CSV, with `row` and `reason` in front; removes a stale file."""
    bad = ~result["ok"].to_numpy()
    if not bad.any():
        if path.exists():
            path.unlink()
        return
    out = df[bad].copy()
    out.insert(0, "reason", result.loc[bad, "reason"].to_numpy())
    out.insert(0, "row", result.loc[bad, "row"].to_numpy())
    out.to_csv(path, index=False)


def print_summary(result: pd.DataFrame, file=None) -> None:
    """Rows per split, failures per check, the first bad rows, and where the full list is."""
    file = file or sys.stdout
    n_bad = int((~result["ok"]).sum())
    print(
        f"\nCSV check: {result.attrs.get('csv_file', '')}: {len(result)} rows, {len(result) - n_bad} ok, {n_bad} bad",
        file=file,
    )
    by_split = result.groupby(result["split"].replace("", "(empty)"), sort=True)["ok"].agg(rows="size", ok="sum")
    by_split["bad"] = by_split["rows"] - by_split["ok"]
    print(by_split.reset_index().to_string(index=False), file=file)
    if n_bad:
        checks = result.loc[~result["ok"], "checks"].str.split(",").explode().value_counts()
        print("\nfailed check    rows", file=file)
        for name, count in checks.items():
            print(f"{name:<15} {count:>4}", file=file)
        print("\nfirst bad rows (row = data row, header not counted):", file=file)
        for r in result.loc[~result["ok"]].head(10).itertuples():
            print(f"  row {r.row}: {r.img_path}: {r.reason}", file=file)
        if n_bad > 10:
            print(f"  ... and {n_bad - 10} more", file=file)
        if result.attrs.get("bad_rows_file"):
            print(f"bad rows written to {result.attrs['bad_rows_file']}", file=file)
    shapes = result.loc[result["shape"] != "", "shape"].value_counts()
    if len(shapes) > 1:  # not an error (the trainer may crop or pad), but batches need one size
        print(
            f"note: {len(shapes)} different volume shapes: " + ", ".join(f"{s} x{c}" for s, c in shapes.items()),
            file=file,
        )
    if result.attrs.get("rows_sharing_an_image"):
        print(
            f"note: {result.attrs['rows_sharing_an_image']} rows repeat an earlier row's image with another report",
            file=file,
        )
    for p in result.attrs.get("problems", []):
        print(f"problem: {p}", file=file)
    print("CSV OK" if is_valid(result) else "CSV has problems: fix them before training", file=file)


def is_valid(result: pd.DataFrame) -> bool:
    return bool(result["ok"].all()) and not result.attrs.get("problems")


def run(csv_file: str | Path, **kwargs: Any) -> int:
    """Validate and report; the exit code: 0 clean, 1 bad rows or table problems, 2 CSV unusable."""
    try:
        result = validate_csv(csv_file, **kwargs)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if is_valid(result) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ct_siglip.validate",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("csv_file")
    p.add_argument("--img_path_column", default="img_path")
    p.add_argument("--findings_column", default="findings")
    p.add_argument("--split_column", default="split")
    p.add_argument("--train_split", default="train")
    p.add_argument("--val_split", default="val", help="'' when the run has no validation split")
    p.add_argument("--splits", nargs="+", default=list(DEFAULT_SPLITS), help="allowed split values")
    p.add_argument("--npz_key", default="image")
    p.add_argument("--in_channels", type=int, default=2, help="expected channels (0 = any)")
    p.add_argument("--workers", type=int, default=None, help="parallel readers (default: min(8, CPUs))")
    p.add_argument("--bad_rows_file", default=None, help="default: <csv stem>_bad_rows.csv beside the CSV")
    a = p.parse_args(argv)
    return run(
        a.csv_file,
        img_path_column=a.img_path_column,
        findings_column=a.findings_column,
        split_column=a.split_column,
        npz_key=a.npz_key,
        channels=a.in_channels or None,
        splits=a.splits,
        train_split=a.train_split,
        val_split=a.val_split,
        workers=a.workers,
        bad_rows_file=a.bad_rows_file,
    )


if __name__ == "__main__":
    sys.exit(main())
