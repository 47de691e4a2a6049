"""The input table of a split: CSV mode (`img_path, findings, split` and label columns) or the legacy directory
of `*.npz` with a JSON of reports, read and checked once, with one-line errors naming the file and the row.

A `Table` is a pandas frame with fixed column names (`path`, `text`, `row`, labels...); the data set
(`ct_siglip.data`) keeps numpy arrays of those columns, not per-row Python objects, so forked workers share them.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Table:
    """One split: resolved NPZ paths, report texts, source row numbers, optional label columns."""

    frame: pd.DataFrame  # columns: path, text, row (+ pair_text with a pair column, + label columns)
    source: str  # the CSV file or directory it came from
    label_columns: list[str]
    missing_reports: int = 0
    missing_report_rows: list[int] = field(default_factory=list)  # source rows that got the placeholder
    report_source: str = ""  # where the reports come from, for a message about missing ones
    known_bad: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # path -> (problem, hint), preflight

    def __len__(self) -> int:
        return len(self.frame)


def _clean_reports(texts: pd.Series, placeholder: str) -> tuple[pd.Series, pd.Series]:
    missing = texts.isna() | texts.astype(str).str.strip().eq("")
    return texts.where(~missing, placeholder).astype(str), missing


def rows_text(rows: Sequence[int], limit: int = 5) -> str:
    """'row 3' / 'rows 3, 8, 12 and 4 more': messages name rows without printing thousands of them."""
    rows = [int(r) for r in rows]
    head = ", ".join(map(str, rows[:limit]))
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"row{'s' if len(rows) > 1 else ''} {head}{more}"


def read_csv_table(
    csv_file: str | Path,
    split: str,
    *,
    img_path_column: str = "img_path",
    findings_column: str = "findings",
    split_column: str = "split",
    label_columns: list[str] | None = None,
    missing_report_text: str = "No report available.",
    on_bad_rows: str = "error",
    known_splits: Sequence[str] = (),
    pair_column: str | None = None,
) -> Table:
    """The rows of `split`; relative image paths resolve against the CSV's folder.

    Rows are numbered as data rows counted from 1 (the header is not a row), the numbering that
    `--validate_csv` and every error message use. Table problems, as `--validate_csv` defines them:
    a repeated row (same image and report) is an error, or dropped (after the first) with
    `on_bad_rows="skip"`; one image in two splits leaks into validation and is an error, or a warning
    with "skip". Rows the run will not use (empty or unknown split value, given `known_splits`) and
    missing reports (replaced by `missing_report_text`) are named in warnings. `pair_column` adds each row's
    second text (`pair_text`; an empty one falls back to the row's report, with a warning).
    """
    csv_file = Path(csv_file)
    src = str(csv_file)
    if not csv_file.is_file():
        raise DataError("CSV file not found", path=src, hint="check --csv_file")
    try:
        df = pd.read_csv(
            csv_file, dtype={img_path_column: str, split_column: str, findings_column: str}, keep_default_na=True
        )
    except pd.errors.EmptyDataError:
        raise DataError("CSV file is empty", path=src, hint="it needs a header and one row per scan") from None
    except UnicodeDecodeError:
        raise _not_utf8(csv_file) from None
    except pd.errors.ParserError as e:
        raise DataError(
            f"cannot parse CSV ({' '.join(str(e).split())})",
            path=src,
            hint="check quoting and the file encoding (UTF-8)",
        ) from None
    used = [img_path_column, findings_column, split_column, *([pair_column] if pair_column else [])]
    _refuse_repeated_columns(csv_file, used)
    for flag, col in (
        ("--img_path_column", img_path_column),
        ("--findings_column", findings_column),
        ("--split_column", split_column),
        *((("--text_pair_column", pair_column),) if pair_column else ()),
    ):
        if col not in df.columns:
            raise DataError(
                f"column '{col}' missing (columns: {', '.join(map(str, df.columns))})",
                path=src,
                hint=f"pass {flag} with the right name",
            )
    if df.empty:
        raise DataError("CSV has no data rows", path=src, hint="add one row per scan under the header")
    df["__row"] = np.arange(1, len(df) + 1)
    splits = df[split_column].fillna("").astype(str).str.strip()
    if known_splits:
        _warn_unused_rows(df["__row"], splits, known_splits, src)
    in_split = (splits == split).to_numpy()
    if not in_split.any():
        found = sorted(set(splits) - {""})
        close = difflib.get_close_matches(split, found, n=1, cutoff=0.6) or [
            f for f in found if f.lower() == split.lower()
        ]
        raise DataError(
            f"split '{split}' has no rows (splits present: {', '.join(found) or 'none'})"
            + (f"; did you mean '{close[0]}'?" if close else ""),
            path=src,
            hint="check --train_split/--val_split and --split_column",
        )
    labels = resolve_label_columns(
        df, label_columns or [], exclude={img_path_column, findings_column, split_column, pair_column}, source=src
    )
    raw = df[img_path_column].fillna("").astype(str).str.strip()
    root = csv_file.resolve().parent
    # normpath: "a.npz" and "./a.npz" are one file, for the duplicate checks as for the loader
    df["__path"] = [os.path.normpath(p if os.path.isabs(p) else root / p) if p else "" for p in raw]
    part = df[in_split]
    empty = part["__path"].eq("")
    if empty.any():
        if on_bad_rows == "error":
            raise DataError(
                "empty image path",
                path=src,
                row=int(part["__row"][empty].iloc[0]),
                hint=f"fill the {img_path_column} column{_more(int(empty.sum()) - 1)}",
            )
        log.warning("%s, %s: empty image path; rows dropped", src, rows_text(part["__row"][empty]))
        part = part[~empty]
    part = _check_repeats(df, part, splits, split, findings_column, on_bad_rows, src)
    texts, missing = _clean_reports(part[findings_column], missing_report_text)
    frame = pd.DataFrame({"path": part["__path"].to_numpy(), "text": texts.to_numpy(), "row": part["__row"].to_numpy()})
    if pair_column:
        empty = (part[pair_column].isna() | part[pair_column].astype(str).str.strip().eq("")).to_numpy()
        if empty.any():
            log.warning("%s, %s: empty %s; the report itself is used as its pair", src,
                        rows_text(part["__row"][empty]), pair_column)  # fmt: skip
        frame["pair_text"] = np.where(empty, frame["text"].to_numpy(), part[pair_column].astype(str).to_numpy())
    for c in labels:
        frame[c] = part[c].to_numpy()
    return Table(
        frame.reset_index(drop=True),
        src,
        labels,
        int(missing.sum()),
        part["__row"][missing.to_numpy()].astype(int).tolist(),
        report_source=f"the '{findings_column}' column is empty there (--findings_column names the report column)",
    )


def _not_utf8(csv_file: Path) -> DataError:
    """Where a CSV stops being UTF-8: the data row (and file line) of the first bad byte."""
    data = csv_file.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return DataError(
            f"not UTF-8 text at line {line} (byte {data[e.start]:#04x})",
            path=str(csv_file),
            row=line - 1 if line > 1 else None,
            hint="save the CSV as UTF-8 (most spreadsheet programs offer 'CSV UTF-8')",
        )
    return DataError("not UTF-8 text", path=str(csv_file), hint="save the CSV as UTF-8")


def _refuse_repeated_columns(csv_file: Path, used: Sequence[str]) -> None:
    """pandas renames a second `findings` column to `findings.1`, so one of two report columns would be read
    without a word: a column the run uses must appear once."""
    with open(csv_file, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    for name in used:
        where = [i + 1 for i, h in enumerate(header) if h.strip() == name]
        if len(where) > 1:
            raise DataError(
                f"column '{name}' appears {len(where)} times (columns {', '.join(map(str, where))})",
                path=str(csv_file),
                hint="rename or remove the extra one, or name the column to read with its flag",
            )


def _more(n: int) -> str:
    return f"; {n} more such rows" if n > 0 else ""


def _warn_unused_rows(rows: pd.Series, splits: pd.Series, known: Sequence[str], src: str) -> None:
    """Rows whose split value is empty or a likely typo are silently unused otherwise: name them."""
    known = [k for k in dict.fromkeys(known) if k]
    empty = splits.eq("")
    if empty.any():
        log.warning("%s, %s: empty split value; these rows are not used", src, rows_text(rows[empty]))
    for value in sorted(set(splits) - set(known) - {"", "test"}):  # a test split is held out on purpose
        hit = splits.eq(value)
        log.warning(
            "%s, %s: unknown split value '%s' (this run uses %s); these rows are not used",
            src,
            rows_text(rows[hit]),
            value,
            ", ".join(known),
        )


def _check_repeats(
    df: pd.DataFrame,
    part: pd.DataFrame,
    splits: pd.Series,
    split: str,
    findings_column: str,
    on_bad_rows: str,
    src: str,
) -> pd.DataFrame:
    """Repeated rows (same image and report) and images shared with another split (a leak)."""
    keys = list(zip(part["__path"], part[findings_column].fillna("")))
    first_row: dict[tuple[str, str], int] = {}
    repeats: list[tuple[int, int]] = []  # (row, the earlier row it repeats)
    keep = []
    for key, row in zip(keys, part["__row"]):
        earlier = first_row.setdefault(key, int(row))
        keep.append(earlier == row)
        if earlier != row:
            repeats.append((int(row), earlier))
    if repeats:
        if on_bad_rows == "error":
            raise DataError(
                f"duplicate of row {repeats[0][1]} (same image and report){_more(len(repeats) - 1)}",
                path=src,
                row=repeats[0][0],
                hint="remove the repeated rows, or pass --on_bad_sample skip to drop them",
            )
        log.warning(
            "%s, %s: duplicates of earlier rows (same image and report); dropped",
            src,
            rows_text([r for r, _ in repeats]),
        )
        part = part[np.array(keep)]
    others = (splits != split) & splits.ne("")
    elsewhere = {p: (int(r), s) for p, r, s in zip(df["__path"][others], df["__row"][others], splits[others])}
    leaks = [(int(r), elsewhere[p]) for p, r in zip(part["__path"], part["__row"]) if p in elsewhere]
    if leaks:
        (row, (other_row, other_split)) = leaks[0]
        msg = f"same image as row {other_row} in split '{other_split}': leaks between splits{_more(len(leaks) - 1)}"
        if on_bad_rows == "error":
            raise DataError(msg, path=src, row=row, hint="give each scan one split")
        log.warning(
            "%s, %s: images also in another split (validation metrics will be optimistic)",
            src,
            rows_text([r for r, _ in leaks]),
        )
    return part


def resolve_label_columns(df: pd.DataFrame, names: list[str], *, exclude: set[str], source: str) -> list[str]:
    """`names`, or with ['auto'] every other column whose values are all in {0, 1, -1}."""
    if names == ["auto"]:
        return [
            c
            for c in df.columns
            if c not in exclude
            and not str(c).startswith("__")
            and pd.api.types.is_numeric_dtype(df[c])
            and df[c].dropna().isin([0, 1, -1]).all()
            and df[c].notna().all()
        ]
    for c in names:
        if c not in df.columns:
            raise DataError(f"label column '{c}' missing", path=source, hint="check --label_columns")
        values = df[c]
        if not (pd.api.types.is_numeric_dtype(values) and values.isin([0, 1, -1]).all()):
            raise DataError(f"label column '{c}' must hold only 0, 1 or -1 (unknown)", path=source)
    return list(names)


def read_directory_table(
    data_dir: str | Path, reports_json: str | Path | None = None, *, missing_report_text: str = "No report available."
) -> Table:
    """Legacy mode: every `*.npz` of a directory, reports from a JSON {file stem: report}."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError("directory not found", path=str(data_dir), hint="check --train_data_dir/--val_data_dir")
    files = sorted(data_dir.glob("*.npz"))
    if not files:
        raise DataError("no *.npz files in directory", path=str(data_dir))
    reports: dict[str, str] = {}
    if reports_json is not None:
        try:
            reports = json.loads(Path(reports_json).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(
                f"cannot read reports JSON ({e})", path=str(reports_json), hint="it must map file stem -> report text"
            ) from None
        if not isinstance(reports, dict):
            raise DataError("reports JSON must be an object {file stem: report}", path=str(reports_json))
        wrong = [k for k, v in reports.items() if v is not None and not isinstance(v, str)]
        if wrong:
            raise DataError(
                f"report for '{wrong[0]}' is a {type(reports[wrong[0]]).__name__}, not text{_more(len(wrong) - 1)}",
                path=str(reports_json),
                hint="each value must be the report string",
            )
    texts = pd.Series([reports.get(f.stem) for f in files], dtype=object)
    texts, missing = _clean_reports(texts, missing_report_text)
    rows = np.arange(1, len(files) + 1)
    frame = pd.DataFrame({"path": [str(f) for f in files], "text": texts.to_numpy(), "row": rows})
    table = Table(frame, str(data_dir), [], int(missing.sum()), rows[missing.to_numpy()].tolist())
    if reports_json is None:
        table.report_source = "no reports file was given: pass --text_reports_path REPORTS.json"
    else:
        stems = {f.stem for f in files}
        expected = [f.stem for f, m in zip(files, missing) if m][:2]
        unmatched = [k for k in reports if k not in stems][:2]
        table.report_source = (
            f"{reports_json}: its keys must be the NPZ file stems, such as {', '.join(map(repr, expected))}"
            + (f"; it has keys such as {', '.join(map(repr, unmatched))}" if unmatched else "")
        )
    return table


def table_fingerprint(table: Table) -> str:
    """SHA-256 of the split's (image path, report) pairs, in order. Paths count relative to the CSV's folder
    (or the data directory), so moving the whole data set keeps the fingerprint; editing a row changes it."""
    src = Path(table.source).resolve()
    root = src if src.is_dir() else src.parent
    h = hashlib.sha256()
    for path, text in zip(table.frame["path"], table.frame["text"]):
        h.update(f"{os.path.relpath(path, root)}\0{text}\n".encode())
    return h.hexdigest()
