"""Finding and reading the texts of a corpus: a Hub dataset repo, a local folder (the Hub layout, or any files at
any depth), a glob, or one file. The files are read by mlm/files/corpus_files.py."""

from __future__ import annotations

import glob
import json
import os
import stat
import warnings
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path

from mlm.errors import MLMError, listed
from mlm.files.corpus_files import COMPRESSIONS, FORMATS, file_format, iter_texts
from mlm.files.hub import resolve_repo

# The names that make a folder a split layout where they lie: the Hub's usual splits and IMDb's unsupervised. Once
# a folder is one, a split of any other name is read too (`--eval-split dev` reads dev.jsonl).
SPLIT_NAMES = ("train", "validation", "test", "unsupervised")
# Data formats and compressions mlm does not read: a folder's files in them are named in a warning, not left out
# without a word.
UNREAD_FORMATS = (".ndjson", ".jsonlines", ".tsv", ".arrow", ".feather")
UNREAD_COMPRESSIONS = (".bz2", ".xz", ".lz4", ".lzma", ".zip", ".7z", ".br", ".snappy", ".gzip", ".zstd")
# Documents in formats other than .txt: in a folder of .txt documents (or of these alone) they are named in a warning
# rather than left out without a word; beside parquet, JSON or CSV data they are notes about it (a README.md).
DOCUMENT_FORMATS = (".md", ".markdown", ".rst", ".html", ".htm", ".tex", ".pdf", ".doc", ".docx", ".odt", ".rtf",
                    ".epub")
ABOUT_THE_FOLDER = ("readme", "license", "licence", "changelog", "contributing", "notice", "authors")  # not documents
NAMED = 3  # files named in a warning or an error before "and N more"


def find_data_files(source: str | Path, split: str = "train", *, revision: str | None = None) -> list[Path]:
    """The files that hold `split` of `source`, sorted by path (shard order); see `find_corpus`."""
    return find_corpus(source, split, revision=revision)[0]


def find_corpus(source: str | Path, split: str = "train", *,
                revision: str | None = None) -> tuple[list[Path], bool]:
    """(the files that hold `split` of `source` in shard order, whether each .txt file is one document).

    `source` is a single data file, a glob, a local folder, or a Hub dataset repo id. Folders and globs are walked
    alike (`_walk`). A folder (or a downloaded snapshot) is laid out by split when split files lie where the Hub
    puts them (`_split_places`): then the files of a split are those named `{split}-*.{ext}` or `{split}.{ext}`
    there, as the Hub's `plain_text/train-00000-of-00001.parquet`. Any other folder, and a glob, is one corpus, the
    'train' split: every data file at any depth, and there a .txt file is one document (its lines joined by their
    newlines); elsewhere a .txt file holds one document per line. A single file has one split, "train", as
    `datasets.load_dataset("parquet", data_files=path)` names it.
    """
    path = Path(source).expanduser()
    if not path.exists() and glob.has_magic(str(source)):
        return _only_train(_globbed(path), split, str(source)), True
    if path.is_file():
        return _only_train([path], split, str(path)), False
    downloaded = not path.is_dir()
    # Download only this split's files. In huggingface_hub's patterns `*` also matches "/", so "*/train-*"
    # finds plain_text/train-00000-of-00001.parquet at any depth; those below a split's place are left out here.
    patterns = [f"{prefix}{split}{rest}{zipped}" for prefix in ("", "*/") for ext in FORMATS
                for rest in (f"-*{ext}", ext) for zipped in ("", *COMPRESSIONS)]
    folder = resolve_repo(source, repo_type="dataset", revision=revision, allow_patterns=patterns)
    unread: list[str] = []  # named like data, in a format or compression mlm does not read: said, not skipped quietly
    documents: list[str] = []

    def data_file(parts: tuple[str, ...]) -> bool:
        name = Path(parts[-1])
        if name.suffix.lower() in DOCUMENT_FORMATS and name.stem.lower() not in ABOUT_THE_FOLDER:
            documents.append("/".join(parts))
        if (known := file_format(name) is not None) or not _unread_data(name):
            return known
        unread.append("/".join(parts))
        return False

    every = _walk(folder, data_file)
    if unread:
        warnings.warn(f"{folder}: {len(unread)} file{'s' * (len(unread) > 1)} named like data but in a format mlm does "
                      f"not read, left out: {listed(sorted(unread), NAMED)}. Use .parquet, .jsonl, .json, .csv or "
                      ".txt, plain or compressed as .gz or .zst (.parquet uncompressed); rename a .tsv file to .csv: "
                      "its tab-separated header is read as such.", stacklevel=2)
    places = _split_places(folder, every)
    if places is None and documents and all(file_format(file)[0] == ".txt" for file in every):
        warnings.warn(f"{folder}: {len(documents)} document{'s' * (len(documents) > 1)} not in .txt left out: "
                      f"{listed(sorted(documents), NAMED)}. Each .txt file of a folder is one document: save the "
                      "others' text as .txt (a Markdown file can be renamed).", stacklevel=2)
    if places is None and every and not downloaded:
        return _only_train(_read_once(every), split, f"{folder} has no split names where the Hub layout puts them "
                           "(at its top level or one folder down, as plain_text/), so it"), True
    if not every and not downloaded:  # a Hub snapshot holds only the split's files: said below
        raise MLMError(f"No data files (.parquet, .jsonl, .json, .csv or .txt, optionally .gz or .zst) in {folder} "
                       "or below it (hidden files and folders are skipped). Pass the folder that holds them.")
    # A download is never one corpus of documents: with another split's files fetched beside it later, that
    # corpus would mix the two.
    return _checked(_split_files(folder, places or [], every, split)), False


def check_validation_file(path: str | Path) -> None:
    """Raise MLMError unless --validation-file `path` is one file."""
    if Path(path).expanduser().is_dir():
        raise MLMError(f"--validation-file {path} is a folder: pass one file of it (a .parquet, .jsonl, .csv or "
                       ".txt), or use --eval-split with a folder that has split names.")
    if not Path(path).expanduser().is_file():
        raise MLMError(f"--validation-file {path}: no such file (a .parquet, .jsonl, .csv or .txt).")


def _walk(root: Path, wanted: Callable[[tuple[str, ...]], bool], max_depth: int | None = None) -> list[Path]:
    """The files below `root` whose path parts (relative to `root`) are `wanted`, sorted by relative path, at most
    `max_depth` folders deep.

    Symlinks are followed, to files and folders alike, but a folder link that leads back to a folder above it
    (`sub/loop -> ..`) is not entered: glob's `**` went round such a loop until the OS refused the path, reading
    each file 41 times. A file reached by two paths is listed under both; `_read_once` keeps one. Names starting
    with "." are skipped, as glob and the Hub's own data-file patterns skip them. A wanted link that leads nowhere
    (or to itself) is left out with a warning naming it.
    """
    found: list[tuple[str, Path]] = []
    broken: list[str] = []

    def visit(folder: Path, parts: tuple[str, ...], above: set[tuple[int, int]]) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            raise MLMError(f"Cannot read the folder {folder} ({err.strerror}); fix its permissions or move it out "
                           f"of {root}.") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            inside = (*parts, entry.name)
            try:
                if entry.is_dir():
                    folder_id = _identity(entry.stat())
                    if (folder_id not in above and (max_depth is None or len(inside) < max_depth)
                            and not _mlms_own(Path(entry.path))):
                        visit(Path(entry.path), inside, above | {folder_id})
                elif wanted(inside) and stat.S_ISREG(entry.stat().st_mode):
                    found.append(("/".join(inside), Path(entry.path)))
            except OSError:
                if not entry.is_symlink():
                    raise
                if wanted(inside):  # a data file's link to nothing, or to itself: nothing there to read
                    broken.append("/".join(inside))

    if root.is_dir():
        visit(root, (), {_identity(root.stat())})
    if broken:
        them = "it" if len(broken) == 1 else "them"
        # Attributed to _walk's caller, inside mlm, so that run_cli prints it as one "warning:" line.
        warnings.warn(f"{root}: {len(broken)} symlink{'s' * (len(broken) > 1)} leading nowhere or in a loop left "
                      f"out: {listed(sorted(broken), NAMED)}. Point {them} at a file, or remove {them}.", stacklevel=2)
    return [file for _, file in sorted(found)]


def _unread_data(file: Path) -> bool:
    """A data file in a format or compression mlm does not read (a.tsv, a.jsonl.bz2), not a sidecar (a.csv.license)."""
    suffixes = [suffix.lower() for suffix in file.suffixes[-2:]]
    if suffixes[-1:] and suffixes[-1] in UNREAD_FORMATS:
        return True
    # .gz too: file_format reads a .jsonl.gz, so one here is a .parquet.gz, which pyarrow does not read.
    compressed = (*UNREAD_COMPRESSIONS, *COMPRESSIONS)
    return len(suffixes) == 2 and suffixes[0] in (*FORMATS, *UNREAD_FORMATS) and suffixes[1] in compressed


def _mlms_own(folder: Path) -> bool:
    """A chunk store, or a run folder or checkpoint (its run.json an mlm run record), that mlm wrote inside a corpus
    folder (`--dataset .` with the output or cache folder below it): its header.json, run.json and vocab.txt are
    no texts of the corpus."""
    if (folder / "ids.bin").is_file() and (folder / "header.json").is_file():
        return True
    try:
        record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or a data file of that name
        return False
    return isinstance(record, dict) and {"run_id", "settings", "segments"} <= record.keys()


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _read_once(files: list[Path]) -> list[Path]:
    """`files` without those that are a file listed before them (a symlink or a hard link to it)."""
    once = {}
    for file in files:
        once.setdefault(_identity(file.stat()), file)
    return list(once.values())


def _globbed(pattern: Path) -> list[Path]:
    """The files matching `pattern`, as glob.glob(recursive=True) matches them, walked as a folder is walked."""
    parts = pattern.parts
    fixed = next(index for index, part in enumerate(parts) if glob.has_magic(part))
    wild = parts[fixed:]
    files = _walk(Path(*parts[:fixed]) if fixed else Path("."), lambda inside: _matches(inside, wild),
                  max_depth=None if "**" in wild else len(wild))
    if not files:
        raise MLMError(f"No files match {pattern}; check the pattern (use ** for any depth, quoted in the shell).")
    return _read_once(files)


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether path `parts` match glob `pattern` part by part, `**` standing for any number of folders."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[skip:], pattern[1:]) for skip in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


def _split_places(folder: Path, every: list[Path]) -> list[Path] | None:
    """The files of `every` that lie where the Hub layout puts split files, or None when `folder` is not laid out
    by split but is one corpus.

    Split names count at the top level, as train.jsonl beside test.jsonl, and one folder down, in a folder that
    holds split files directly, as the Hub's plain_text/. One folder down they make the folder a split layout only
    when they name two splits or more, or are the only data files there are: a lone notes/2024/train-schedule.txt
    or docs/library/test.txt among other documents is a document. Deeper, a split name never counts.
    """
    depth = {file: len(file.relative_to(folder).parts) for file in every}
    top = [file for file in every if depth[file] == 1]
    named = [file for file in every if depth[file] == 2 and _split_of(file.name) in SPLIT_NAMES]
    if not (any(_split_of(file.name) in SPLIT_NAMES for file in top)
            or len({_split_of(file.name) for file in named}) > 1 or (named and len(named) == len(every))):
        return None
    configurations = {folder} | {file.parent for file in named}
    return [file for file in every if file.parent in configurations]


def _split_files(folder: Path, places: list[Path], every: list[Path], split: str) -> list[Path]:
    """The files of `split` among `places`, checked to lie in one folder; a warning names the files left out."""
    files = [file for file in places if file.name.startswith(split + "-") or file.name.split(".", 1)[0] == split]
    if not files:
        found = sorted({_split_of(file.name) for file in places}, key=lambda name: (name not in SPLIT_NAMES, name))
        named = [str(file.relative_to(folder)) for file in places if _split_of(file.name) in SPLIT_NAMES]
        # No train split, but documents beside a file named like another split: most likely a corpus of documents.
        if split == "train" and named and len(named) < len(places):
            raise MLMError(f"No files for split {split!r} in {folder}: {listed(named, NAMED)} made it a folder of "
                           f"split files (splits there: {listed(found, NAMED)}). If it is one corpus, rename "
                           f"{'it' if len(named) == 1 else 'them'} or give its files as a glob: "
                           f"'{folder}/**/*{Path(named[0]).suffix}'.")
        raise MLMError(f"No files for split {split!r} in {folder} (looked for {split}-*.parquet and {split}.parquet, "
                       ".jsonl, .csv, .txt at its top level and in folders like plain_text/). Splits found there: "
                       f"{listed(found, 2 * NAMED) or 'none'}.")
    parents = list(dict.fromkeys(file.parent for file in files))
    if len(parents) > 1:
        # A repo with several configurations (e.g. plain_text/ and another/) would otherwise be silently mixed.
        odd = next(file for file in files if file.parent == parents[1])
        names = [str(parent.relative_to(folder)) if parent != folder else "the top level" for parent in parents]
        raise MLMError(f"Split {split!r} has files in several folders of {folder}: {listed(names, NAMED)}. "
                       f"{odd.relative_to(folder)} makes it ambiguous: pass the one folder to use, or move the "
                       "others out.")
    read = set(files) | {file for file in places if _split_of(file.name) in SPLIT_NAMES}
    if left_out := [file for file in every if file not in read]:
        names = listed([str(file.relative_to(folder)) for file in left_out], NAMED)
        suffixes = left_out[0].suffixes  # the format's, and the compression's after it (.jsonl.gz)
        ext = "".join(suffixes[-2:]) if suffixes[-1:] and suffixes[-1].lower() in COMPRESSIONS else left_out[0].suffix
        are = "file is" if len(left_out) == 1 else "files are"
        # Attributed to find_corpus, inside mlm, so that run_cli prints it as one "warning:" line.
        # Not "in no split": archive.jsonl is split 'archive', read when asked for by name (--splits train,archive).
        warnings.warn(f"{folder}: {len(left_out)} data {are} not in split {split!r} and left out of it: {names}. To "
                      f"read them with it, name them {split}-*{ext} at the top level or one folder "
                      "down, as in plain_text/; a split is read only when asked for by name.", stacklevel=2)
    return _read_once(files)


def _only_train(files: list[Path], split: str, what: str) -> list[Path]:
    if split != "train":
        raise MLMError(f"{what} is a single corpus, which holds only the 'train' split, but split {split!r} was asked "
                       "for. Pass a folder with one file per split to use other splits.")
    return _checked(files)


def _checked(files: list[Path]) -> list[Path]:
    """`files`, refused unless each is a corpus file, all of one format (compression aside) as a corpus is."""
    for file in files:
        if (found := file_format(file)) is None:
            raise MLMError(f"{file} is not a corpus file: use .parquet, .jsonl, .json, .csv or .txt files, "
                           "optionally compressed as .gz or .zst.")
        # .json and .jsonl are both read as JSON lines: one format.
        if (first := file_format(files[0])[0]).removesuffix("l") != found[0].removesuffix("l"):
            raise MLMError(f"{file} is a {found[0][1:]} file but {files[0]} is {first[1:]}: a corpus is one format. "
                           "Move the odd files out or pass one folder or glob per format.")
    return files


def _split_of(name: str) -> str:
    return name.split(".", 1)[0].split("-", 1)[0]


def load_texts(source: str | Path, split: str = "train", *, text_column: str = "text",
               revision: str | None = None) -> list[str]:
    """The reviews of one split of `source` (see `find_corpus`), as a list of str in file order; `text_column` names
    the column in parquet, JSON lines and CSV files."""
    files, one_document_per_file = find_corpus(source, split, revision=revision)
    return read_texts(files, text_column=text_column, one_document_per_file=one_document_per_file)


def read_texts(files: list[Path], *, text_column: str = "text", one_document_per_file: bool = False) -> list[str]:
    """The text of every row of `files`, concatenated in order (one review per row or per text line)."""
    texts: list[str] = []
    for batch, _ in iter_texts(files, text_column=text_column, one_document_per_file=one_document_per_file):
        texts += batch
    if not texts:
        raise MLMError(f"No reviews in {', '.join(map(str, files))}: the split is empty.")
    return texts
