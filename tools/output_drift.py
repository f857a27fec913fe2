"""After re-executing chapters: which numbers did their outputs change, and where does the text still quote them?

    python tools/output_drift.py                         # every chapter, outputs of HEAD against the working tree
    python tools/output_drift.py --base 423cd60 chapters/02_gan_js.ipynb

CONTRIBUTING asks, after a re-execution (a new machine, a changed model), to re-read each chapter's text against its
new outputs. This lists, per chapter, every printed line whose numbers changed (old -> new) and every markdown cell
of the working tree that still contains one of the old numbers (also a printed fraction quoted as a percentage), with
its context: a checklist for that reading, not a replacement (a number the text derives, such as a difference of two
printed ones, or a ranking or per-seed story that changed without its digits, is not found). Cells tagged
``nbval-ignore-output`` (figures, widgets, the footer's wall time) are left out. Exit status 1 when the text quotes a
changed number, else 0.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"(?<![\w.,])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-+]?\d+)?%?(?![\w]|[.,]\d)")
"""A number as printed: optional sign, digits (thousands separated by commas or not), decimals, exponent, percent."""
IGNORED = "nbval-ignore-output"


class Drift(NamedTuple):
    """One printed line whose numbers changed: the code cell's index, the old and new line, the numbers gone."""

    cell: int
    old: str
    new: str
    gone: tuple[str, ...]


class Quote(NamedTuple):
    """A markdown cell (index) quoting a number that changed, with the text around it."""

    cell: int
    number: str
    context: str


def numbers(text: str) -> list[str]:
    """The numbers in ``text`` as written, without a trailing percent sign (``'0.219 and 1,024 (5%)'`` ->
    ``['0.219', '1,024', '5']``)."""
    return [match.group().rstrip("%") for match in NUMBER.finditer(text)]


def printed_lines(cell: nbformat.NotebookNode) -> list[str]:
    """The text a code cell printed (streams, then plain-text results), line by line."""
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        elif "text/plain" in output.get("data", {}):
            parts.append(output["data"]["text/plain"])
    return "".join(part if part.endswith("\n") else part + "\n" for part in parts if part).splitlines()


def checked_code_cells(nb: nbformat.NotebookNode) -> list[tuple[int, nbformat.NotebookNode]]:
    """(index, cell) of the code cells whose outputs strict nbval compares."""
    return [(index, cell) for index, cell in enumerate(nb.cells)
            if cell.cell_type == "code" and IGNORED not in cell.get("metadata", {}).get("tags", [])]


def drifts(old: nbformat.NotebookNode, new: nbformat.NotebookNode) -> list[Drift]:
    """Every printed line of ``new`` whose numbers differ from the matching line of ``old``. Code cells are paired
    by their source (a cell whose code changed pairs with nothing, so its outputs are all new); within a pair,
    lines are matched by difflib and a changed line lists the numbers of the old line that the new one lacks and
    that the cell prints nowhere else (a table's column headers, a setting printed twice)."""
    old_by_source: dict[str, list[nbformat.NotebookNode]] = {}
    for _, cell in checked_code_cells(old):
        old_by_source.setdefault(cell.source, []).append(cell)
    found = []
    for index, cell in checked_code_cells(new):
        twins = old_by_source.get(cell.source)
        if not twins:
            continue
        before, after = printed_lines(twins.pop(0)), printed_lines(cell)
        still_printed = {number for line in after for number in numbers(line)}
        matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
        for tag, a0, a1, b0, b1 in matcher.get_opcodes():
            if tag == "equal":
                continue
            for old_line, new_line in zip(before[a0:a1], after[b0:b1]):  # line by line where both sides have one
                remaining = numbers(new_line)
                gone = []
                for number in numbers(old_line):
                    if number in remaining:
                        remaining.remove(number)
                    elif number not in still_printed:
                        gone.append(number)
                if gone:
                    found.append(Drift(index, old_line, new_line, tuple(gone)))
            for old_line in before[a0 + (b1 - b0):a1]:  # old lines with no counterpart
                gone = [number for number in numbers(old_line) if number not in still_printed]
                if gone:
                    found.append(Drift(index, old_line, "", tuple(gone)))
    return found


def patterns(number: str) -> list[str]:
    """Regular expressions for the ways prose writes a printed number: as printed, with or without thousands
    separators, with a typographic minus, and a fraction printed with 3 or more decimals (0.187) as a percentage
    (18.7 % or 19 %)."""
    plain = number.replace(",", "")
    sign, unsigned = plain[:len(plain) - len(plain.lstrip("+-"))], plain.lstrip("+-")
    whole, dot, decimals = unsigned.partition(".")
    forms = {number, plain}
    if whole.isdigit() and len(whole) > 3:
        forms.add(sign + f"{int(whole):,}" + dot + decimals)
    forms |= {form.replace("-", "\N{MINUS SIGN}", 1) for form in forms if form.startswith("-")}
    found = [rf"(?<![\w.,]){re.escape(form)}(?![\w]|[.,]\d)" for form in sorted(forms)]
    if whole == "0" and len(decimals) >= 3 and decimals.isdigit():
        percent = 100 * float(unsigned)
        found += [rf"(?<![\w.,]){re.escape(f'{percent:.{places}f}')}\s?%" for places in (1, 0)]
    return found


def quotes(nb: nbformat.NotebookNode, changed: list[Drift], width: int = 70) -> list[Quote]:
    """Markdown cells of ``nb`` that contain a number that changed (one-digit numbers are too common to search
    for), each with ``width`` characters of context either side."""
    wanted = sorted({number for drift in changed for number in drift.gone if len(number.strip("+-").replace(",", "")
                                                                                 .replace(".", "")) > 1})
    found = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        text = " ".join(cell.source.split())
        for number in wanted:
            for pattern in patterns(number):
                for match in re.finditer(pattern, text):
                    start, end = max(0, match.start() - width), match.end() + width
                    found.append(Quote(index, number, text[start:end]))
    return sorted(set(found))


def committed(path: Path, base: str) -> nbformat.NotebookNode:
    """The notebook at ``path`` as git has it at revision ``base``."""
    relative = path.resolve().relative_to(ROOT).as_posix()
    text = subprocess.run(["git", "show", f"{base}:{relative}"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout
    return nbformat.reads(text, as_version=4)


def report(name: str, changed: list[Drift], quoted: list[Quote]) -> str:
    """The text printed for one chapter."""
    lines = [f"== {name}: {len(changed)} printed line(s) changed, {len(quoted)} quote(s) of an old number in the text"]
    lines += [f"  cell {drift.cell}: {drift.old.strip()}\n        -> {drift.new.strip() or '(gone)'}"
              for drift in changed]
    lines += [f"  markdown cell {quote.cell} quotes {quote.number}: ...{quote.context}..." for quote in quoted]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to compare (default: chapters/*.ipynb)")
    parser.add_argument("--base", default="HEAD", help="the git revision whose outputs are the old ones")
    args = parser.parse_args(argv)
    stale = 0
    for path in args.notebooks or sorted((ROOT / "chapters").glob("*.ipynb")):
        new = nbformat.read(path, as_version=4)
        changed = drifts(committed(path, args.base), new)
        quoted = quotes(new, changed)
        stale += len(quoted)
        print(report(path.name, changed, quoted))
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
