"""Plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence


def format_columns(headers: Sequence[str], rows: Sequence[Sequence[object]], aligned: Sequence[bool]) -> str:
    """Rows under a header, columns padded to their widest cell; ``aligned[i]`` True right-aligns column i."""
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    lines = [
        "  ".join(cell.rjust(width) if right else cell.ljust(width) for cell, width, right in zip(row, widths, aligned))
        for row in cells
    ]
    return "\n".join(line.rstrip() for line in lines)
