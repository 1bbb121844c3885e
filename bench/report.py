"""BENCHMARKS.md as ``## `` sections: each benchmark rewrites its own and keeps every other.

`make bench` (`bench.__main__`) writes its sections in a fixed order; `make bench-mini`
(`bench.mini`) writes one section of its own. Either run leaves the other's sections as they
were, so neither erases what only the other measures.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PREAMBLE", "merged", "sections_of", "write_sections"]

PREAMBLE = (
    "# Benchmarks\n\n"
    "Contenders are measured side by side in one process: the ratios are what counts; absolute "
    "numbers move with the machine's load. `make bench` runs every section but `mini`; "
    "`make bench-mini` (on demand, Phi-3-mini's real shape) writes its own.\n"
)


def sections_of(text: str) -> dict[str, str]:
    """Section title -> the section's text, from its ``## title`` line to the next one."""
    sections = {}
    for block in ("\n" + text).split("\n## ")[1:]:
        title = block.split("\n", 1)[0].strip()
        sections[title] = "## " + block.rstrip("\n") + "\n"
    return sections


def merged(old: str, fresh: dict[str, str], *, order: list[str]) -> str:
    """The report: ``fresh`` sections (title -> text) replacing the old ones of that title.

    Titles in ``order`` come first, in that order (fresh or as they were); any other section,
    old or fresh, follows in the order it was found.
    """
    kept = sections_of(old)
    titles = [*order, *(t for t in [*kept, *fresh] if t not in order)]
    chosen = [fresh.get(title) or kept.get(title) for title in dict.fromkeys(titles)]
    return "\n".join([PREAMBLE, *(text for text in chosen if text)])


def write_sections(path: Path, fresh: dict[str, str], *, order: list[str] | None = None) -> str:
    """Rewrites ``path`` with ``fresh`` merged in (see `merged`); returns the new text."""
    old = path.read_text() if path.exists() else ""
    report = merged(old, fresh, order=order or [])
    path.write_text(report)
    return report
