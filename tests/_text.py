"""Reading the command line's and the reports' text back: markdown tables as rows of cells."""
from __future__ import annotations


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text``: a list of tables, each a list of rows (header first, the rule
    line left out), each row its stripped cells."""
    tables: list[list[list[str]]] = []
    previous_was_row = False
    for line in text.splitlines():
        if line.startswith("|") and line.endswith("|"):
            if not previous_was_row:
                tables.append([])
            previous_was_row = True
            cells = [c.strip() for c in line[1:-1].split("|")]
            if not all(set(c) <= set("-:") and c for c in cells):  # not the rule line
                tables[-1].append(cells)
        else:
            previous_was_row = False
    return tables


def assert_aligned(text: str) -> list[list[list[str]]]:
    """Every table in ``text`` has as many cells in each row as in its header, and its lines (rule
    included) are of one length, so that its columns line up in a terminal. Returns the tables."""
    tables = markdown_tables(text)
    assert tables, "no table found"
    for table in tables:
        width = len(table[0])
        assert all(len(row) == width for row in table), [len(row) for row in table]
    block: list[str] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            assert len({len(b) for b in block}) == 1, "columns do not line up:\n" + "\n".join(block)
            block = []
    return tables
