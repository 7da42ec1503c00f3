"""Grade student repositories, part by part: python -m assignments.grade REPO [REPO ...] [--gradescope PATH]

Each part is graded on its own. Its tree is the instructor's project with, from the student's repository,
only that part's functions (parts.py): the other parts' functions come from the instructor's copy. So a
wrong attention costs part 1 and nothing else, and a syntax error in lora.py costs the parts whose
functions are in lora.py. Each tree runs its part's cases, public and held-out, in a process of its own with
a time limit; the numbers are compared with those of the instructor's copy on the same cases.

A part earns its points when every one of its cases passes, and nothing otherwise (the table shows how many
passed). Part 6 (written answers) is graded by hand: the grader only says whether the answers file is there.
Student code runs with the grader's rights: grade inside a container (Gradescope's) or a throwaway account.
"""

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from assignments import splice
from assignments.cases import CASE_SECONDS, PUBLIC
from assignments.heldout import HELDOUT
from assignments.parts import ANSWERS, PARTS, WRITTEN, functions_in, part_files, product_files
from plumbing import outputs
from plumbing.errors import UserError, reported

ROOT = Path(__file__).resolve().parents[1]  # the instructor's copy: the reference
PART_SECONDS = 120  # time limit of one part's process (its cases together)
ANSWER_WORDS = 50  # fewer words than this and the answers file counts as not written


def all_cases(part=None):
    cases = {**PUBLIC, **HELDOUT}
    return {name: case for name, case in cases.items() if part is None or case[0] == part}


@dataclass
class Job:
    """One process: a part of one repository (or, part None, the reference on every case)."""

    repo: int
    part: int | None
    tree: Path
    cases: dict
    results: Path
    log: Path
    error: str | None = None  # why the part could not even be run (a missing file, a syntax error)
    outcome: dict = field(default_factory=dict)  # case name -> {"passed", "output"}


def reference_sources():
    """{relative path: text} of the instructor's Python files."""
    return {f: (ROOT / f).read_text(encoding="utf-8") for f in product_files(ROOT) if f.endswith(".py")}


def student_file(repo, file, part, reference):
    """The text of one of the student's files for grading `part`: the student's, with the functions of the
    other parts put back as the instructor wrote them. Raises ValueError saying why it cannot be had."""
    path = Path(repo) / file
    if not path.is_file():
        raise ValueError(f"{file} is missing")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        defined = splice.find_functions(text, file)
    except SyntaxError as e:
        raise ValueError(f"{file} does not parse: {e.msg} (line {e.lineno})") from None
    others = [name for name, n in functions_in(file).items() if n != part and name in defined]
    return splice.transplant(text, {name: splice.function_text(reference[file], name) for name in others}, file)


def build_tree(tree, repo, part, reference):
    """Write the tree that grades `part` of repo; returns None, or why the part cannot be run."""
    for file, text in reference.items():
        (tree / file).parent.mkdir(parents=True, exist_ok=True)
        (tree / file).write_text(text, encoding="utf-8")
    for file in part_files():
        if any(n == part for n in functions_in(file).values()):
            try:
                (tree / file).write_text(student_file(repo, file, part, reference), encoding="utf-8")
            except ValueError as e:
                return str(e)
    return None


def run_in_child(*args):
    """A process's target: the fork server has imported runner (and torch) already; this process has not."""
    from assignments import runner

    runner.run_cases(*args)


def run_jobs(jobs, expected, n_parallel, part_seconds, case_seconds):
    """Run the jobs' processes, at most n_parallel at a time, each killed after part_seconds."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["assignments.runner"])
    waiting = [job for job in jobs if job.error is None]
    running = {}  # job index -> (process, deadline)
    while waiting or running:
        while waiting and len(running) < n_parallel:
            job = waiting.pop(0)
            process = context.Process(target=run_in_child, args=(
                str(job.tree), job.cases, str(job.results), str(job.log),
                None if expected is None else str(expected), case_seconds), daemon=True)
            process.start()
            running[id(job)] = (job, process, time.monotonic() + part_seconds)
        time.sleep(0.02)
        for key, (job, process, deadline) in list(running.items()):
            if process.exitcode is None and time.monotonic() < deadline:
                continue
            if process.exitcode is None:
                process.kill()
                process.join()
                job.error = f"killed after {part_seconds} s (an endless loop?)"
            elif process.exitcode != 0:
                job.error = f"its process died (exit code {process.exitcode})"
            del running[key]


def collect(job):
    """Fill job.outcome from its results file; every case without a result failed, saying why."""
    results = {}
    if job.results.is_file():
        try:
            results = json.loads(job.results.read_text())
        except ValueError:
            results = {}
    tail = ""
    if job.log.is_file():
        lines = [line for line in job.log.read_text(errors="replace").splitlines()
                 if not line.startswith(("PASS ", "FAIL "))]
        tail = "\n".join(lines[-6:])
    for name in job.cases:
        if name in results:
            job.outcome[name] = results[name]
        else:
            why = job.error or "no result"
            job.outcome[name] = {"passed": False, "output": f"not run: {why}" + (f"\n{tail}" if tail else "")}


def answers_status(repo):
    path = Path(repo) / ANSWERS
    if not path.is_file():
        return False, f"{ANSWERS}: missing"
    words = len(path.read_text(encoding="utf-8", errors="replace").split())
    if words < ANSWER_WORDS:
        return False, f"{ANSWERS}: only {words} words"
    return True, f"{ANSWERS}: found ({words} words)"


def grade(repos, n_parallel=None, part_seconds=PART_SECONDS, case_seconds=CASE_SECONDS, work=None):
    """Grade each repository; returns one report (a dict) per repository."""
    for repo in repos:
        if not Path(repo).is_dir():
            raise UserError(f"{repo}: no such folder (give the student's repository)")
    n_parallel = n_parallel or os.cpu_count() or 1
    reference = reference_sources()
    with tempfile.TemporaryDirectory(prefix="lora-gpt-grade-", dir=work) as tmp:
        tmp = Path(tmp)
        expected = tmp / "expected.pt"
        ref_job = Job(-1, None, ROOT, all_cases(), expected, tmp / "reference.log")
        jobs = []
        for r, repo in enumerate(repos):
            for part in PARTS:
                tree = tmp / f"repo{r}" / part.slug
                job = Job(r, part.number, tree, all_cases(part.number), tree / "results.json", tree / "log.txt")
                job.error = build_tree(tree, repo, part.number, reference)
                jobs.append(job)
        run_jobs([ref_job], None, 1, part_seconds * len(PARTS), case_seconds)
        if ref_job.error or not expected.is_file():
            log = ref_job.log.read_text(errors="replace") if ref_job.log.is_file() else ""
            raise UserError(f"the instructor's copy fails its own checks ({ref_job.error}); fix it "
                             f"first:\n{log[-3000:]}")
        run_jobs(jobs, expected, n_parallel, part_seconds, case_seconds)
        for job in jobs:
            collect(job)
    reports = []
    for r, repo in enumerate(repos):
        parts = []
        for part, job in zip(PARTS, [job for job in jobs if job.repo == r], strict=True):
            passed = sum(o["passed"] for o in job.outcome.values())
            full = passed == len(job.cases)
            parts.append(dict(part=part.number, title=part.title, score=part.points if full else 0,
                              max_score=part.points, passed=passed, tests=len(job.cases),
                              cases={name: job.outcome[name] for name in job.cases}))
        written, status = answers_status(repo)
        reports.append(dict(repo=str(repo), parts=parts, score=sum(p["score"] for p in parts),
                            max_score=sum(p["max_score"] for p in parts),
                            written=dict(part=WRITTEN.number, title=WRITTEN.title, points=WRITTEN.points,
                                         found=written, status=status)))
    return reports


def table(report):
    """The score table of one report, as text."""
    lines = [f"grade of {report['repo']}", f"{'part':>4}  {'':<58} {'points':>7}  tests passed"]
    for p in report["parts"]:
        lines.append(f"{p['part']:>4}  {p['title']:<58} {p['score']:>3}/{p['max_score']:<3}  "
                     f"{p['passed']}/{p['tests']}")
    w = report["written"]
    lines.append(f"{w['part']:>4}  {w['title'][:58]:<58} {'by hand':>7}  {w['status']}")
    lines.append(f"{'':>4}  {'total (autograded)':<58} {report['score']:>3}/{report['max_score']:<3}")
    failures = [(name, o["output"]) for p in report["parts"] for name, o in p["cases"].items() if not o["passed"]]
    if failures:
        lines.append("failed cases (a part's points need every case):")
        for name, output in failures:
            first, *rest = output.splitlines() or [""]
            lines.append(f"  [{name}] {first}" + (f" (+{len(rest)} more lines)" if rest else ""))
    return "\n".join(lines)


def gradescope(report):
    """Gradescope's results.json: one test per part, its output listing every case."""
    tests = []
    for p in report["parts"]:
        output = "\n".join(f"{'PASS' if o['passed'] else 'FAIL'} {name}: {o['output']}"
                           for name, o in p["cases"].items())
        tests.append(dict(name=f"Part {p['part']}: {p['title']}", score=p["score"], max_score=p["max_score"],
                          output=f"{p['passed']}/{p['tests']} cases passed (all are needed for the points)\n"
                                 + output))
    w = report["written"]
    tests.append(dict(name=f"Part {w['part']}: {w['title']} (graded by hand)", score=0, max_score=0,
                      output=w["status"]))
    return dict(score=report["score"], tests=tests)


def main(argv=None):
    p = argparse.ArgumentParser(description="Grade student repositories of the lora-gpt assignment, part by part "
                                "(CPU only, no network).")
    p.add_argument("repos", nargs="+", metavar="REPO", help="a student's repository (several: graded side by side)")
    p.add_argument("--gradescope", metavar="PATH", help="also write Gradescope's results.json here (one REPO) "
                   "(default: none)")
    p.add_argument("--json", metavar="PATH", help="also write every report, with each case's output, as JSON "
                   "(default: none)")
    p.add_argument("--force", action="store_true", help="replace the files of --gradescope and --json if they are "
                   "there (default: refuse)")
    p.add_argument("--jobs", type=int, default=None, help="processes at once (default: the CPU count)")
    p.add_argument("--part-timeout", type=float, default=PART_SECONDS, help="seconds for one part's process "
                   "(default: %(default)s)")
    p.add_argument("--case-timeout", type=float, default=CASE_SECONDS, help="seconds for one case "
                   "(default: %(default)s)")
    args = p.parse_args(argv)
    start = time.monotonic()
    with reported():
        if args.gradescope and len(args.repos) != 1:
            raise UserError("--gradescope writes the results of one repository: give exactly one REPO")
        for option, path in (("--gradescope", args.gradescope), ("--json", args.json)):
            if path:  # checked before the grading, which takes minutes
                outputs.check_file(path, args.force, option=option)
        reports = grade(args.repos, args.jobs, args.part_timeout, args.case_timeout)
    for report in reports:
        print(table(report) + "\n")
    print(f"graded {len(reports)} repositor{'y' if len(reports) == 1 else 'ies'} in {time.monotonic() - start:.1f} s")
    with reported():
        for option, path, data in (("--gradescope", args.gradescope, lambda: gradescope(reports[0])),
                                   ("--json", args.json, lambda: reports)):
            if path:
                with outputs.file(path, args.force, option=option) as f:
                    f.write(json.dumps(data(), indent=1).encode())


if __name__ == "__main__":
    main()
