"""docs/course-map.md points at the right lines: each `mlm/file.py:N` of a row lands on the definition of a
function, class or method (`Class.method`) that the row's mlm column names, so the map cannot silently drift
as the code moves."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "docs" / "course-map.md"
LOCATION = re.compile(r"`(mlm/[\w/]+\.py):(\d+)`")
NAME = re.compile(r"`([A-Za-z_][\w.]*)")  # the dotted name a backticked span starts with


def definitions(path: Path) -> dict[str, int]:
    """name -> line of its `def` or `class` in `path`; methods also as `Class.method`."""
    found: dict[str, int] = {}
    current_class = None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = re.match(r"(\s*)(def|class)\s+(\w+)", line)
        if not match:
            continue
        indent, kind, name = match.groups()
        if not indent:
            current_class = name if kind == "class" else None
            found.setdefault(name, number)
        elif current_class and kind == "def":
            found.setdefault(f"{current_class}.{name}", number)
    return found


def named_lines(row: str, file: str) -> list[int]:
    """The definition lines in `file` of what the row's mlm column names, in the order it names them."""
    defined = definitions(ROOT / file)
    lines = []
    for dotted in NAME.findall(row.split(" | ")[1]):
        for candidate in (dotted, dotted.split(".")[0]):  # `Class.method`: the method's line, then the class's
            if candidate in defined and defined[candidate] not in lines:
                lines.append(defined[candidate])
    return lines


def test_course_map_locations_land_on_their_definitions():
    rows = [line for line in MAP.read_text().splitlines() if LOCATION.search(line)]
    assert len(rows) > 30
    wrong = []
    for row in rows:
        for file, number in LOCATION.findall(row.split(" | ")[-1]):
            lines = (ROOT / file).read_text().splitlines()
            assert 1 <= int(number) <= len(lines), f"{file}:{number} is past the end"
            candidates = named_lines(row, file)
            if candidates and int(number) not in candidates:
                wrong.append(f"{file}:{number} should be one of lines {candidates}")
    assert not wrong, "docs/course-map.md is out of date:\n" + "\n".join(wrong)
