"""Every document the code cites is in the repository.

Modules, samples, benchmarks, scripts and tests cite Markdown documents by
path (`docs/formats.md`), sections of them by number (the section sign and
a number), and other modules by file name. A citation of something that is
not in the repository sends a reader nowhere, so each one is checked here:
the cited file must exist, and a cited section must be a heading of the
cited document. Outside sources are cited by name (qemu's `block/vpc.c`,
oslo.utils' `imageutils.format_inspector` module, the specs) and not checked,
so a Python file outside the repository is named as a module, not a path.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED_DIRS = ("diskpipe", "samples", "benchmarks", "scripts", "tests", "docs")
SCANNED_FILES = ("README.md",)
SCANNED_SUFFIXES = frozenset({".py", ".sh", ".md", ".toml"})
SKIPPED_DIRS = frozenset({"__pycache__", "build", "dist", "out", "node_modules"})
FORMATS_DOC = ROOT / "docs" / "formats.md"
# The file the example citations below are checked as if they stood in.
CITING = ROOT / "diskpipe" / "formats" / "raw.py"

# Written as an escape so this file cites no section itself.
SECTION_SIGN = "\u00a7"
SECTION = SECTION_SIGN + r"(\d+(?:\.\d+)*)"
# A file name or relative path ending in .md or .py. Not preceded by a path
# or template character, so URLs ("https://.../x.md") and templates
# ("{name}.md", "$here/x.md") are not taken for citations.
CITED_FILE = r"(?<![\w{}/.$-])((?:[\w.-]+/)*[\w-]+\.(?:md|py))\b"
# A document followed by one or more section numbers, comma separated.
SECTION_RUN = re.compile(CITED_FILE + r"((?:[ \t]*,?[ \t]*" + SECTION + r")+)")
SECTION_IN_RUN = re.compile(SECTION)
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*$")
ANCHOR_LINK = re.compile(r"\]\(#([^)]+)\)")


def scanned_files() -> list[Path]:
    files = [ROOT / name for name in SCANNED_FILES if (ROOT / name).is_file()]
    for directory in SCANNED_DIRS:
        for current, dirnames, filenames in os.walk(ROOT / directory):
            dirnames[:] = sorted(name for name in dirnames if not name.startswith(".") and name not in SKIPPED_DIRS)
            files.extend(Path(current) / name for name in sorted(filenames) if Path(name).suffix in SCANNED_SUFFIXES)
    return files


@cache
def repository_names() -> frozenset[str]:
    """Base names of every file in the working tree (caches and builds aside)."""
    names = set()
    for _current, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [
            name
            for name in dirnames
            if not name.startswith(".") and name not in SKIPPED_DIRS and not name.endswith(".egg-info")
        ]
        names.update(filenames)
    return frozenset(names)


def resolve(cited: str, citing: Path) -> Path | None:
    """The repository file a citation names: a path relative to the root or
    to the citing file; a bare name anywhere in the tree."""
    for base in (ROOT, citing.parent):
        candidate = base / cited
        if candidate.is_file():
            return candidate.resolve()
    if "/" not in cited and cited in repository_names():
        return Path(cited)
    return None


def markdown_headings(text: str) -> list[str]:
    """Heading texts outside fenced code blocks."""
    headings = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = HEADING.match(line)
        if match and not fenced:
            headings.append(match.group(2))
    return headings


@cache
def sections_of(document: Path) -> frozenset[str]:
    """Section numbers that head a section of a Markdown document."""
    numbers = set()
    for heading in markdown_headings(document.read_text(encoding="utf-8")):
        match = re.match(SECTION, heading)
        if match:
            numbers.add(match.group(1))
    return frozenset(numbers)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped,
    spaces turned into hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def citation_problems(text: str, citing: Path) -> list[str]:
    """Dangling citations in one file's text."""
    problems = []
    for match in re.finditer(CITED_FILE, text):
        if resolve(match.group(1), citing) is None:
            problems.append(f"cites {match.group(1)}, which is not in the repository")
    covered = set()
    for run in SECTION_RUN.finditer(text):
        document = resolve(run.group(1), citing)
        covered.update(range(run.start(2), run.end(2)))
        if document is None or document.suffix != ".md":
            continue  # reported above
        for section in SECTION_IN_RUN.finditer(run.group(2)):
            if section.group(1) not in sections_of(document):
                problems.append(f"cites {run.group(1)} {SECTION_SIGN}{section.group(1)}, which has no such section")
    for section in re.finditer(SECTION, text):
        if section.start() in covered:
            continue
        # In a Markdown document a bare section number refers to the document itself.
        if citing.suffix == ".md" and section.group(1) in sections_of(citing):
            continue
        problems.append(f"cites {SECTION_SIGN}{section.group(1)} of no document in the repository")
    return problems


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_cited_document_and_section_exists() -> None:
    problems = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        problems.extend(f"{relative(path)}: {problem}" for problem in citation_problems(text, path))
    assert not problems, "\n".join(problems)


def test_formats_doc_sections_are_unique_and_its_links_resolve() -> None:
    headings = markdown_headings(FORMATS_DOC.read_text(encoding="utf-8"))
    numbers = [match.group(1) for heading in headings if (match := re.match(SECTION, heading))]
    assert len(numbers) == len(set(numbers)), f"a section number heads two sections: {sorted(numbers)}"
    anchors = {github_anchor(heading) for heading in headings}
    links = ANCHOR_LINK.findall(FORMATS_DOC.read_text(encoding="utf-8"))
    assert links, "the table of contents links the sections"
    assert [link for link in links if link not in anchors] == []


def test_the_formats_modules_cite_the_formats_doc() -> None:
    """Each inspector names the section that documents its format."""
    modules = sorted((ROOT / "diskpipe" / "formats").glob("*.py"))
    inspectors = [path for path in modules if re.search(r"^FORMAT = ContainerFormat\(", path.read_text(), re.MULTILINE)]
    assert len(inspectors) >= 11
    citation = re.compile(r"docs/formats\.md[ \t]*" + SECTION)
    assert [relative(path) for path in inspectors if not citation.search(path.read_text())] == []


# Names that exist nowhere, put together so this file does not cite them.
GONE_DOC = "GONE" + ".md"
GONE_MODULE = "gone_app" + ".py"
GONE_BENCHMARK = "benchmarks/no_such_bench" + ".py"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"see {GONE_DOC} {SECTION_SIGN}2", [f"cites {GONE_DOC}, which is not in the repository"]),
        (f"see docs/formats.md {SECTION_SIGN}99", [f"cites docs/formats.md {SECTION_SIGN}99, which has no such"]),
        (f"see docs/formats.md {SECTION_SIGN}3, {SECTION_SIGN}42.7", [f"{SECTION_SIGN}42.7, which"]),
        (f"({SECTION_SIGN}3.4)", [f"cites {SECTION_SIGN}3.4 of no document"]),
        (f"the app (see {GONE_MODULE})", [f"cites {GONE_MODULE}, which is not"]),
        (f"see {GONE_BENCHMARK}", [f"cites {GONE_BENCHMARK}, which is not"]),
    ],
)
def test_dangling_citations_are_reported(text: str, expected: list[str]) -> None:
    problems = citation_problems(text, CITING)
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start) or start in problem, problem


@pytest.mark.parametrize(
    "text",
    [
        f"see docs/formats.md {SECTION_SIGN}0, {SECTION_SIGN}11 and README.md",
        "the Celery app is built in factory.py; benchmarks/convert_speed.py measured it",
        'RESULTS / f"{name}.md", "$here/redis-stop.md", https://example.org/a/b/FORMATS.md',
        "qemu docs/interop/qcow2.rst and docs/interop/parallels.txt are outside sources",
    ],
)
def test_valid_citations_pass(text: str) -> None:
    assert citation_problems(text, CITING) == []
