"""BENCHMARKS.md's sections: a benchmark rewrites its own and keeps every other."""

from __future__ import annotations

from pathlib import Path

from bench.report import PREAMBLE, sections_of, write_sections

OLD = (
    "# Benchmarks\n\nold preamble\n\n"
    "## Serving\n\nold serving\n\n"
    "## Orchestration\n\nold orchestration\n\n"
    "## mini: real shape\n\n| measure | value |\n|---|---|\n| tokens/s | 8.1 |\n"
)


def test_make_bench_keeps_the_mini_section_and_bench_mini_keeps_the_others(
    tmp_path: Path,
) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(OLD)

    write_sections(
        path, {"Serving": "## Serving\n\nnew serving\n"}, order=["Serving", "Orchestration"]
    )
    sections = sections_of(path.read_text())
    assert list(sections) == ["Serving", "Orchestration", "mini: real shape"]
    assert sections["Serving"] == "## Serving\n\nnew serving\n"
    assert sections["Orchestration"] == "## Orchestration\n\nold orchestration\n"
    assert "| tokens/s | 8.1 |" in sections["mini: real shape"]
    assert path.read_text().startswith(PREAMBLE)

    write_sections(path, {"mini: real shape": "## mini: real shape\n\nnew mini\n"})
    sections = sections_of(path.read_text())
    assert list(sections) == ["Serving", "Orchestration", "mini: real shape"]
    assert sections["Serving"] == "## Serving\n\nnew serving\n"
    assert sections["mini: real shape"] == "## mini: real shape\n\nnew mini\n"


def test_a_first_run_writes_the_preamble_and_its_sections(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    write_sections(path, {"B": "## B\n\nb\n", "A": "## A\n\na\n"}, order=["A", "B"])
    assert path.read_text() == PREAMBLE + "\n## A\n\na\n\n## B\n\nb\n"
