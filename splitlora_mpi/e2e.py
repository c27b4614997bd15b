"""The E2E NLG data as users get it: the official release's CSV files (`trainset.csv`,
`devset.csv`, `testset_w_refs.csv`, columns `mr,ref`), and meaning representations compared
across its two notations: the release's `name[The Eagle], eatType[pub]` and the converted
`name : The Eagle | Type : pub` of the packaged sample (values there are also tokenized:
`£ 20 - 25` for `£20-25`)."""

from __future__ import annotations

import csv
import io
import re

from .errors import ConfigError

COLUMNS = ("mr", "ref")
_BRACKETS = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")
_SAME_ATTRIBUTE = {"eattype": "type", "pricerange": "price"}  # release name -> converted name


def read_csv(text: str, path: object) -> list[tuple[str, str]]:
    """(mr, ref) of every row of a CSV with a header naming columns mr and ref (others are
    ignored). Quoted fields may hold commas and newlines. Errors name file:line."""
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"data file {path}: empty, expected a CSV header with columns mr and ref")
        names = [h.strip().lower() for h in header]
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise ConfigError(
                f"data file {path}:1: the header has no column {missing[0]!r} (got: {', '.join(header)}); "
                "expected a CSV header with columns mr and ref"
            )
        mr_at, ref_at = names.index("mr"), names.index("ref")
        rows = []
        line = reader.line_num + 1
        for row in reader:
            if any(field.strip() for field in row):
                rows.append(_row(row, mr_at, ref_at, f"{path}:{line}"))
            line = reader.line_num + 1
    except csv.Error as e:
        raise ConfigError(f"data file {path}:{reader.line_num}: not valid CSV ({e})") from None
    return rows


def _row(row: list[str], mr_at: int, ref_at: int, where: str) -> tuple[str, str]:
    if len(row) <= max(mr_at, ref_at):
        raise ConfigError(f"data file {where}: {len(row)} field(s), expected columns mr and ref as in the header")
    mr, ref = row[mr_at].strip(), row[ref_at].strip()
    if not mr or not ref:
        raise ConfigError(f"data file {where}: empty {'mr' if not mr else 'ref'}, expected a meaning representation "
                          "and its reference text")  # fmt: skip
    return mr, ref


def mr_key(mr: str) -> str:
    """The same key for one meaning representation in either notation: attribute names unified,
    values lowercased without spaces (the converted files are tokenized). Other text: itself,
    with runs of spaces made one."""
    if "[" in mr:
        pairs = _BRACKETS.findall(mr)
    else:
        pairs = [tuple(part.split(" : ", 1)) for part in mr.split(" | ")]
    if not pairs or any(len(p) != 2 for p in pairs):
        return " ".join(mr.split())
    items = []
    for name, value in pairs:
        name = "".join(name.split()).lower()
        items.append(f"{_SAME_ATTRIBUTE.get(name, name)}={''.join(value.split()).lower()}")
    return "|".join(sorted(items))
