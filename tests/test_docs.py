"""README.md and docs/*.md against the code, so that the documentation cannot drift from it unnoticed:

- every command line (`python train.py ...`, `python -m tools.sweep ...`, `torchrun ... train.py ...`) is parsed
  by its script's own argparse parser, and every flag in it is one of that parser's options, spelled out;
- every repository file or folder the pages name exists, and every link between pages finds its heading;
- every line count stated as "model.py (270 lines)" is the file's, and "(N test functions)" is the suite's;
- README's set-up is two commands, the second one is what .ci/run runs, and the performance page is bench's own.
"""

import argparse
import ast
import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Files of other projects that the pages name (microsoft/LoRA's decoder, the E2E challenge's scorer).
ELSEWHERE = {"gpt2_beam.py", "gpt2_decode.py", "measure_scores.py"}
# Commands of other programs: pip, pytest and ruff are not ours to check.
NOT_OURS = {"pip", "pytest", "ruff"}


def page_text(page):
    return page.read_text(encoding="utf-8")


def rel(page):
    return page.relative_to(ROOT).as_posix()


# ----------------------------------------------------------------------------------------------------------
# Finding commands, paths and counts in a page.

def code_blocks(text):
    """The lines of every fenced code block, continuation lines (ending in a backslash) joined."""
    lines = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        lines += block.replace("\\\n", " ").splitlines()
    return lines


def inline_spans(text):
    """The text of every `inline code` span outside the fenced blocks."""
    outside = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", outside)


def commands(text):
    """[(line, argv)] of every command of ours: in code blocks, and inline spans that start with python or
    torchrun. A line of several commands joined by && gives each; comments are dropped."""
    found = []
    for line in code_blocks(text) + [s for s in inline_spans(text) if re.match(r"(\w+=\S+ )*(python|torchrun) ", s)]:
        for part in line.split("&&"):
            argv = shlex.split(part, comments=True)
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # OMP_NUM_THREADS=2 python ...
                argv = argv[1:]
            if argv and argv[0] in ("python", "torchrun"):
                found.append((part.strip(), argv))
    return found


def script_fragments(text):
    """Inline spans such as `eval.py --force` or `train.py --resume`: a script and some of its flags."""
    return [s for s in inline_spans(text) if re.fullmatch(r"[\w/]+\.py( --?[\w-]+( [^-\s]\S*)*)+", s)]


def target(argv):
    """(module name, its arguments) of a command line, or None for another program's (pip, pytest)."""
    if argv[0] == "torchrun":  # torchrun's own options, then the script and its arguments
        argv = ["python"] + argv[next(i for i, a in enumerate(argv) if a.endswith(".py")):]
    if argv[1] == "-m":
        module, args = argv[2], argv[3:]
    else:
        module, args = argv[1].removesuffix(".py").replace("/", "."), argv[2:]
    return None if module in NOT_OURS else (module, args)


def module_file(module):
    return (ROOT / (module.replace(".", "/") + ".py")).relative_to(ROOT).as_posix()


PATH = re.compile(r"(?<![\w/.:~-])((?:[\w.-]+/)*[\w-]+\.(?:py|md|ipynb|toml))(?![\w/])")
FOLDER = re.compile(r"`((?:[\w.-]+/)+)`")


def named_paths(text):
    """Repository files and folders the page names: any *.py, *.md, *.ipynb or *.toml path, and `folder/` spans.
    Paths inside folders a command writes (out/, sweep_ranks/, data/mine) are outputs, not ours, and skipped."""
    top = {p.name for p in ROOT.iterdir()}
    text = re.sub(r"https?://\S+", "", text)
    found = set(PATH.findall(text)) | set(FOLDER.findall(text))
    return {p for p in found if "/" not in p.rstrip("/") or p.split("/")[0] in top}


def exists(path):
    """A path with a folder must be exactly there; a bare file name may be anywhere in the repository."""
    if "/" in path.rstrip("/"):
        return (ROOT / path).exists()
    return (ROOT / path).exists() or any(ROOT.rglob(path))


LINES = re.compile(r"`?([\w/.-]+\.\w+)`? \((\d[\d,]*) lines\)")
TEST_FUNCTIONS = re.compile(r"\((\d[\d,]*) test functions\)")


def count_test_functions():
    """The test_* functions (and methods) of tests/test_*.py, before pytest's parametrization multiplies them."""
    return sum(isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
               for path in (ROOT / "tests").glob("test_*.py") for node in ast.walk(ast.parse(path.read_text())))


def heading_anchor(heading):
    """GitHub's anchor of a heading: lower-cased, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# ----------------------------------------------------------------------------------------------------------
# Parsing a command with its script's own parser, running nothing else.

class Parsed(BaseException):
    """Raised in place of parse_args' return: main() stops there, before any work (BaseException: no except
    clause of the project catches it)."""

    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def options(parser):
    """Every option string of a parser and of its subcommands' parsers."""
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= options(sub)
    return found


def caught_parser(module, args, parse=True):
    """Run module.main(args) until it calls parse_args, and stop there: (its parser, None), or (None, the error
    argparse printed). With parse=False it stops before parsing (the top-level parser of any command line)."""
    real_parse_args = argparse.ArgumentParser.parse_args

    def stop(parser, args=None, namespace=None):
        if parse:
            real_parse_args(parser, args, namespace)
        raise Parsed(parser)

    err = io.StringIO()
    with (mock.patch.object(argparse.ArgumentParser, "parse_args", stop), contextlib.redirect_stderr(err),
          contextlib.redirect_stdout(io.StringIO())):
        try:
            importlib.import_module(module).main(list(args))
        except Parsed as done:
            return done.parser, None
        except SystemExit as e:  # --help exits 0; a command argparse refuses exits 2 with its message
            return None, (err.getvalue().strip().splitlines() or [f"exit status {e.code}"])[-1] if e.code else None
    return None, f"{module}.main() returned without parsing its arguments"


def check_command(module, args):
    """The problems of one command line: argparse's error, or a flag that is only an abbreviation."""
    if module == "tools.sweep" and "--" in args:  # after --, the arguments of train.py
        cut = args.index("--")
        return check_command("tools.sweep", args[:cut]) + check_command("train", args[cut + 1:])
    parser, error = caught_parser(module, args)
    if parser is None:  # refused, or --help
        return [error] if error else []
    known = options(parser)
    return [f"{flag}: not an option of {module} (argparse took it as an abbreviation)"
            for flag in (a.split("=")[0] for a in args if a.startswith("--") and a != "--") if flag not in known]


# ----------------------------------------------------------------------------------------------------------
# The tests.

@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_command_parses_with_its_scripts_parser(page):
    problems = []
    for line, argv in commands(page_text(page)):
        found = target(argv)
        if found is not None:
            problems += [f"{line}\n    -> {p}" for p in check_command(*found)]
    assert not problems, f"{rel(page)}: commands that do not parse:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_script_flag_named_in_prose_exists(page):
    problems = []
    for span in script_fragments(page_text(page)):
        script, *words = span.split()
        if script in ELSEWHERE:
            continue
        path = ROOT / script if (ROOT / script).exists() else next(ROOT.rglob(script), None)  # `prepare.py --force`
        if path is None:
            problems.append(f"`{span}`: no script {script}")
            continue
        module = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        parser, error = caught_parser(module, [], parse=False)
        known = options(parser)
        problems += [f"`{span}`: {w} is not an option of {module}" for w in words
                     if w.startswith("-") and w not in known]
    assert not problems, f"{rel(page)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_named_path_exists(page):
    missing = sorted(p for p in named_paths(page_text(page))
                     if not exists(p) and p not in ELSEWHERE)
    assert not missing, f"{rel(page)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_link_finds_its_page_and_heading(page):
    problems = []
    for link in re.findall(r"\]\(([^)\s]+)\)", page_text(page)):
        if re.match(r"https?://", link):
            continue
        path, _, anchor = link.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            problems.append(f"{link}: no such file")
        elif anchor and anchor not in {heading_anchor(h) for h in re.findall(r"^#+ (.+)$", page_text(linked), re.M)}:
            problems.append(f"{link}: no heading with that anchor")
    assert not problems, f"{rel(page)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_stated_counts_match_the_code(page):
    text = page_text(page)
    wrong = [f"{name} ({stated} lines): it has {n}" for name, stated in LINES.findall(text)
             if (n := len((ROOT / name).read_text().splitlines())) != int(stated.replace(",", ""))]
    wrong += [f"({stated} test functions): tests/ has {n}" for stated in TEST_FUNCTIONS.findall(text)
              if (n := count_test_functions()) != int(stated.replace(",", ""))]
    assert not wrong, f"{rel(page)} states counts the code does not have: {wrong}"


def test_the_lesson_files_line_counts_are_stated():
    stated = {name for page in PAGES for name, _ in LINES.findall(page_text(page))}
    assert {"model.py", "lora.py", "train.py", "data/e2e/batches.py"} <= stated


def test_readme_has_two_set_up_commands_and_ci_runs_the_second():
    readme = page_text(ROOT / "README.md")
    assert len(readme.splitlines()) <= 200  # the front door; the rest lives in docs/
    setup = re.search(r"^## Set up\n(.*?)^## ", readme, flags=re.S | re.M).group(1)
    blocks = code_blocks(setup)
    assert len(blocks) == 2 and all(line.startswith("python -m pip install -r requirements") for line in blocks)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert blocks[1] in ci  # the test command, verbatim


def test_the_performance_page_is_written_by_bench():
    from tools import bench

    page = page_text(ROOT / "docs" / "performance.md")
    command = re.search(r"^```bash\n(python -m tools\.bench .*--write docs/performance\.md.*)\n```", page, re.M)
    assert command, "docs/performance.md names no bench command that writes it"
    head = bench.page_text(command.group(1), "MACHINE", [], 0).split("\n")[:9]
    assert page.split("\n")[:9] == head  # bench's own header: the page was not typed by hand
    assert re.search(r"^Measured: \d{4}-\d\d-\d\d \d\d:\d\d \| .+ \| torch \S+", page, re.M)
