"""Write a student starter repository: python -m assignments.make OUT

OUT gets the project's product files (parts.product_files: git's list, less tests/ and assignments/), with
every function that parts.py lists cut down to its signature, decorators and docstring and a body of
`raise NotImplementedError("Part N: ...")`. Everything else in those files stays byte for byte as it is. It
also gets the handout (HANDOUT.md), the public tests (tests/test_partN.py) and what they need
(assignments/cases.py, checks.py and the instructor's numbers for the public cases, assignments/expected.pt).
"""

import argparse
import shutil
import sys
from pathlib import Path

from assignments import splice
from assignments.parts import PARTS, functions_in, part_files, product_files
from plumbing import outputs
from plumbing.errors import UserError, reported

ROOT = Path(__file__).resolve().parents[1]
KIT = Path(__file__).resolve().parent

STARTER_INIT = '''"""The assignment's test kit: checks.py runs each case, expected.pt holds the instructor's numbers.

Run the public tests of one part with: python -m pytest tests/test_part1.py -q (see HANDOUT.md).
"""
'''

TEST_TEMPLATE = '''"""Part {number}: {title}. Run: python -m pytest tests/test_part{number}.py -q

Each test runs one public case of assignments/checks.py on your code and compares its numbers with the
instructor's (assignments/expected.pt). The grader runs these cases and held-out ones (other shapes and
seeds), and gives the part's {points} points when all of them pass.
"""

import pytest

from assignments import checks


@pytest.mark.parametrize("case", checks.public_cases({number}))
def test_part{number}(case):
    problems = checks.check_public(case)
    assert not problems, "\\n".join(problems)
'''


def stub_message(part):
    return f"Part {part.number}: {part.title} (see HANDOUT.md)"


def blanked(file, text):
    """The starter's text of one file: every listed function's body replaced by its part's stub."""
    by_number = {part.number: part for part in PARTS}
    messages = {name: stub_message(by_number[n]) for name, n in functions_in(file).items()}
    return splice.blank(text, messages, file)


def expected_numbers():
    """The instructor's numbers on every public case, computed here from this checkout."""
    sys.path.insert(0, str(ROOT))
    from assignments import checks

    return {name: checks.run_case(case, seconds=600) for name, case in checks.PUBLIC.items()}


def lines_to_write():
    """{part number: lines of code in the bodies that the starter blanks}."""
    counts = {part.number: 0 for part in PARTS}
    for file in part_files():
        text = (ROOT / file).read_text(encoding="utf-8")
        for name, number in functions_in(file).items():
            counts[number] += splice.code_lines(text, name, file)
    return counts


def make(out):
    """Write the starter into the new (or empty) folder out, made whole under a temporary name."""
    out = Path(out)
    outputs.check_new_folder(out, option="OUT", empty_ok=True)
    files = product_files(ROOT)
    missing = [file for file in part_files() if file not in files]
    if missing:
        raise UserError(f"parts.py names functions in {', '.join(missing)}, which the project does not have")
    texts = {}
    for file in files:
        source = ROOT / file
        if file in part_files():
            try:
                texts[file] = blanked(file, source.read_text(encoding="utf-8"))
            except KeyError as e:  # a function renamed or moved since parts.py was written
                raise UserError(f"parts.py is out of date: {e.args[0]}") from None
        else:
            texts[file] = None
    expected = expected_numbers()
    with outputs.new_folder(out, option="OUT", empty_ok=True) as tmp:
        write_starter(tmp, texts, expected)
    counts = lines_to_write()
    print(f"wrote the starter to {out}: {len(files)} product files, the handout, the public tests")
    for part in PARTS:
        names = [f"{file}:{name}" for file, names in part.functions.items() for name in names]
        print(f"  part {part.number} ({part.points} points, {counts[part.number]} lines to write): {', '.join(names)}")


def write_starter(out, texts, expected):
    """The starter's files into the folder out: {file: its blanked text, or None to copy it as it is}, the kit,
    the instructor's numbers, the handout and the public tests."""
    import torch

    for file, text in texts.items():
        (out / file).parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            shutil.copy2(ROOT / file, out / file)
        else:
            (out / file).write_text(text, encoding="utf-8")
    (out / "assignments").mkdir(exist_ok=True)
    (out / "assignments" / "__init__.py").write_text(STARTER_INIT)
    for kit_file in ("cases.py", "checks.py", "tiny_model.py"):
        shutil.copy2(KIT / kit_file, out / "assignments" / kit_file)
    torch.save(expected, out / "assignments" / "expected.pt")
    shutil.copy2(KIT / "HANDOUT.md", out / "HANDOUT.md")
    (out / "tests").mkdir(exist_ok=True)
    for part in PARTS:
        (out / "tests" / f"test_part{part.number}.py").write_text(
            TEST_TEMPLATE.format(number=part.number, title=part.title, points=part.points))


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a student starter repository of the lora-gpt assignment.")
    p.add_argument("out", metavar="OUT", help="a new (or empty) folder")
    args = p.parse_args(argv)
    with reported():
        make(args.out)


if __name__ == "__main__":
    main()
