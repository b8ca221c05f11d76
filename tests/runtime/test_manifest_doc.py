"""docs/bundle-format.md §2 and the typed manifest say the same: every field, its Req. and its Default.

Each section of the page is a heading naming the dataclass in parentheses,
``### `model` (`ModelInfo`)``, followed by one table whose first column is the
JSON key in backticks. A field added to a dataclass without a row, a row for a
field that does not exist, or a default that differs fails here.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, fields
from fractions import Fraction
from pathlib import Path

import pytest

from edgekit_runtime.contract import manifest as mf

DOC = Path(__file__).resolve().parents[2] / "docs" / "bundle-format.md"
HEADING = re.compile(r"^### .*\(`(\w+)`\)\s*$")
FLATTENED_ROW = {"precision": "<precision>", "extra": "*other keys*"}


def doc_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Class name → its table's rows (column header → cell), from the headings that name a class."""
    tables: dict[str, list[dict[str, str]]] = {}
    current: str | None = None
    header: list[str] | None = None
    for line in text.splitlines():
        m = HEADING.match(line)
        if m:
            assert m.group(1) not in tables, f"{m.group(1)} is documented twice"
            current, header = m.group(1), None
            tables[current] = []
            continue
        if line.startswith("#"):
            current = None
        if current is None or not line.startswith("|"):
            if current is not None and header is not None and tables[current]:
                current = None  # the table ended: one table per section
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]  # "\|" is a | inside a cell
        if header is None:
            header = cells
        elif not set(line) <= set("|-: "):
            tables[current].append(dict(zip(header, cells)))
    return tables


def row_name(f) -> str:
    flatten = f.metadata.get("flatten")
    return FLATTENED_ROW[flatten] if flatten else f.name


def cell_key(cell: str) -> str:
    return cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell


def cell_value(cell: str):
    """A Default cell as a value: JSON in backticks, or a fraction such as ``1/255``."""
    text = cell_key(cell)
    if re.fullmatch(r"\d+/\d+", text):
        return float(Fraction(text))
    return json.loads(text)


TABLES = doc_tables(DOC.read_text())


def test_the_doc_has_one_table_per_section_type_and_no_other():
    assert sorted(TABLES) == sorted(cls.__name__ for cls in mf.SECTIONS)
    assert all(TABLES.values()), [name for name, rows in TABLES.items() if not rows]


@pytest.mark.parametrize("cls", mf.SECTIONS, ids=lambda c: c.__name__)
def test_every_field_is_documented_and_nothing_else(cls):
    documented = [cell_key(r["Field"]) if r["Field"].startswith("`") else r["Field"] for r in TABLES[cls.__name__]]
    assert documented == [row_name(f) for f in fields(cls)]


@pytest.mark.parametrize("cls", mf.SECTIONS, ids=lambda c: c.__name__)
def test_required_and_default_columns_are_the_dataclass_ones(cls):
    rows = {r["Field"]: r for r in TABLES[cls.__name__]}
    for f in fields(cls):
        flatten = f.metadata.get("flatten")
        row = rows[FLATTENED_ROW[flatten] if flatten == "extra" else f"`{row_name(f)}`"]
        where = f"{cls.__name__}.{f.name}"
        assert row["Req."] == ("yes" if mf.json_required(f) else "no"), where
        if flatten == "extra":
            continue
        if f.default is MISSING and f.default_factory is MISSING:
            assert row["Default"] == "—", where
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        value = cell_value(row["Default"])
        if isinstance(default, mf.Section):
            assert type(default).from_dict(value) == default, where
        elif isinstance(default, float):
            assert value == pytest.approx(default, rel=1e-12), where
        else:
            assert value == default, where


def test_the_scale_default_is_one_over_255_and_the_doc_says_so():
    # The one default both sides now share (the host had 1/255, the device 1.0).
    assert mf.defaults(mf.Preprocess)["scale"] == 1 / 255
    assert cell_value(next(r for r in TABLES["Preprocess"] if r["Field"] == "`scale`")["Default"]) == 1 / 255


def test_the_parser_finds_tables_written_the_documented_way():
    text = "### `x` (`ModelInfo`)\n\nwords\n\n| Field | Req. |\n|---|---|\n| `name` | yes |\n\nafter\n| `no` | x |\n"
    assert doc_tables(text) == {"ModelInfo": [{"Field": "`name`", "Req.": "yes"}]}
