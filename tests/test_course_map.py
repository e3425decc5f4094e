"""docs/course-map.md points at the right lines: every `mlm/file.py:N` of a row whose mlm column names a function
or class defined in that file lands on that definition (so the map cannot silently drift as the code moves)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCATION = re.compile(r"`(mlm/[\w/]+\.py):(\d+)`")
NAME = re.compile(r"`([A-Za-z_][\w.]*)")  # the dotted name a backticked span starts with


def definitions(path: Path) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = re.match(r"\s*(?:def|class)\s+(\w+)", line)
        if match:
            found.setdefault(match.group(1), []).append(number)
    return found


def test_course_map_locations_land_on_their_definitions():
    rows = [line for line in (ROOT / "docs" / "course-map.md").read_text().splitlines() if LOCATION.search(line)]
    assert len(rows) > 30
    wrong = []
    for row in rows:
        cells = row.split(" | ")
        mlm_cell, where = cells[1], cells[-1]
        names = {part for dotted in NAME.findall(mlm_cell) for part in dotted.split(".")}
        for file, number in LOCATION.findall(where):
            path = ROOT / file
            assert path.is_file(), f"{file} does not exist"
            lines = path.read_text().splitlines()
            assert 1 <= int(number) <= len(lines), f"{file}:{number} is past the end"
            defined = {n: at for n, at in definitions(path).items() if n in names}
            if defined and not any(int(number) in at for at in defined.values()):
                wrong.append(f"{file}:{number} should be one of {sorted(defined.items())}")
    assert not wrong, "docs/course-map.md is out of date:\n" + "\n".join(wrong)
