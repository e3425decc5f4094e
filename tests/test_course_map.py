"""docs/course-map.md points at the right lines: each `mlm/file.py:N` of a row lands on the definition of a
function, class or method (`Class.method`) that the row's mlm column names, so the map cannot silently drift
as the code moves. A location that lands elsewhere fails, and so does one whose file defines none of the names
the row gives (renamed, moved to another file, or misspelt): nothing is skipped."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "docs" / "course-map.md"
LOCATION = re.compile(r"`(mlm/[\w/]+\.py):(\d+)`")
SPAN = re.compile(r"`([^`]*)`")
DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")  # every dotted name inside a span, not just the first


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


def named(row: str) -> list[str]:
    """The dotted names in the backticked spans of the row's mlm column (the second), in order."""
    return [name for span in SPAN.findall(row.split(" | ")[1]) for name in DOTTED.findall(span)]


def named_lines(names: list[str], file: str) -> dict[int, str]:
    """line -> name, for the names defined in `file`. `A.b.c` stands for `A.b.c`, `A.b` and `A`: a method's
    line and its class's both count (a row may cite the two)."""
    defined = definitions(ROOT / file)
    lines: dict[int, str] = {}
    for dotted in names:
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in defined:
                lines.setdefault(defined[candidate], candidate)
    return lines


def stale_locations(text: str) -> list[str]:
    """What is wrong with the map `text`, one line per stale location (empty when the map is current)."""
    wrong = []
    for row in (line for line in text.splitlines() if LOCATION.search(line)):
        names = named(row)
        for file, number in LOCATION.findall(row.split(" | ")[-1]):
            if not (ROOT / file).is_file():
                wrong.append(f"{file}:{number}: no such file")
                continue
            lines = named_lines(names, file)
            if not lines:
                wrong.append(f"{file}:{number}: defines none of {names}")
            elif int(number) not in lines:
                where = ", ".join(f"{name} at line {line}" for line, name in sorted(lines.items()))
                wrong.append(f"{file}:{number} lands on no named definition; {file} has {where}")
    return wrong


def test_course_map_locations_land_on_their_definitions():
    text = MAP.read_text()
    assert len([line for line in text.splitlines() if LOCATION.search(line)]) > 30
    wrong = stale_locations(text)
    assert not wrong, "docs/course-map.md is out of date:\n" + "\n".join(wrong)


def test_stale_rows_are_reported_not_skipped():
    # A row moved by a line, one whose name is defined nowhere in the cited file, and one naming a second
    # symbol after the first in the same span: each must be caught.
    def row(mlm_column: str, where: str) -> str:
        return f"| course | {mlm_column} | {where} |"

    evaluate_line = definitions(ROOT / "mlm" / "evaluate.py")["evaluate"]
    assert stale_locations(row("`evaluate(model, ids)`", f"`mlm/evaluate.py:{evaluate_line}`")) == []
    assert stale_locations(row("`evaluate(model, ids)`", f"`mlm/evaluate.py:{evaluate_line + 1}`"))
    assert stale_locations(row("`renamed_function(x)`", f"`mlm/evaluate.py:{evaluate_line}`"))
    assert stale_locations(row("`evaluate(model)`", "`mlm/no_such_file.py:1`"))
    # `EvalResult` is named second in its span: the location of its class line is accepted through it.
    result_line = definitions(ROOT / "mlm" / "evaluate.py")["EvalResult"]
    assert stale_locations(row("`x = f(EvalResult)`", f"`mlm/evaluate.py:{result_line}`")) == []
