"""Markdown tables for the reports: one spelling of a table everywhere."""

from __future__ import annotations


def table(header: list, rows: list[list]) -> list[str]:
    """Lines of a Markdown table (and a blank line after it)."""
    lines = ["| " + " | ".join(str(c) for c in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]
