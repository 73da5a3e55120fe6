"""Tables in the HTML report, for people: each header in words with its unit (the field name on
hover), a missing value as an em dash saying why, whole numbers as whole numbers, every text from
the results escaped."""

from __future__ import annotations

import re

import pandas as pd
from markupsafe import Markup, escape

from melt_bench.reporting.fields import label, missing_reason

NON_BREAKING_HYPHEN = "\u2011"


def html_table(frame: pd.DataFrame) -> Markup:
    """A sortable table for people: each header in words with its unit (the field name on hover),
    a missing value as an em dash saying why on hover, whole numbers as whole numbers. Every text
    from the results is escaped."""
    statuses = frame["status"].tolist() if "status" in frame else [None] * len(frame)
    # a header wraps between words only: its hyphens are non-breaking (U+2011), as its words are
    head = "".join(f'<th title="{escape(name)}">{escape(label(str(name)).replace("-", NON_BREAKING_HYPHEN))}</th>'
                   for name in frame.columns)
    body = []
    for row, status in zip(frame.itertuples(index=False), statuses):
        cells = []
        for name, value in zip(frame.columns, row):
            if _missing(value):
                cells.append(f'<td class="missing" title="{escape(missing_reason(str(name), status))}">\u2014</td>')
            else:
                text = _cell_text(value)
                kind = ' class="num"' if _numeric(value, text) else ""
                cells.append(f"<td{kind}>{escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return Markup(f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead>'
                  f'<tbody>{"".join(body)}</tbody></table></div>')


def _missing(value) -> bool:
    return value is None or value == "-" or (not isinstance(value, (str, list, dict, tuple)) and pd.isna(value))


# A cell that reads as a number, with its unit or a mark ("64.00 MiB", ">= 64", "12.5% cv", "+0.020"):
# kept on one line.
NUMBER = re.compile(r"^[<>=~±+\-]*\s*\d[\d,.]*(e[+-]?\d+)?\s*(%|[KMGT]i?B|B|ms|s|x|J)?\b")


def _numeric(value, text: str) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    return len(text) <= 40 and bool(NUMBER.match(text))


def _cell_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return f"{int(value):,}" if abs(value) >= 10_000 else str(int(value))
    return str(value)
