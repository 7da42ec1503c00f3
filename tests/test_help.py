"""--help is complete: every option of every command has a help text that shows its default exactly once."""

import argparse
import importlib
import re

import pytest

# Every command line of the project: a new command joins with one line, "module:function" of its entry point.
COMMANDS = ["train:main", "sample:main", "merge:main", "eval:main", "data.e2e.prepare:main", "data.webnlg.prepare:main",
            "data.dart.prepare:main", "data.tasks:main", "tools.peft_adapter:main", "tools.analyze:main",
            "tools.sweep:main", "tools.bench:main", "tools.gpu_check:main", "assignments.make:main",
            "assignments.grade:main", "assignments.tiny_model:main", "tools.plot:main"]


class Parsed(Exception):
    """Raised in place of parsing: the command's parser is built, and nothing else runs."""


def parser_of(entry, monkeypatch):
    module, _, name = entry.partition(":")
    main = getattr(importlib.import_module(module), name)
    found = []

    def capture(self, *args, **kwargs):
        found.append(self)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(Parsed):
        main([])
    return found[0]


def parsers(parser, name):
    """(name, parser) of the command and of each of its sub-commands."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def options_of(parser):
    return [action for action in parser._actions if action.help != argparse.SUPPRESS
            and not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)]


@pytest.mark.parametrize("entry", COMMANDS)
def test_every_option_has_help_showing_its_default_once(entry, monkeypatch):
    problems = []
    for name, parser in parsers(parser_of(entry, monkeypatch), entry):
        formatter = parser._get_formatter()
        for action in options_of(parser):
            flag = "/".join(action.option_strings) or action.dest
            if not action.help:
                problems.append(f"{name} {flag}: no help text")
                continue
            text = formatter._expand_help(action)  # what --help prints, %(default)s and the formatter's note filled
            if action.option_strings and not action.required and len(re.findall(r"\bdefault\b", text)) != 1:
                problems.append(f"{name} {flag}: the default is shown {text.count('default')} times: {text!r}")
    assert not problems, "\n".join(problems)


def test_the_adapter_options_say_they_take_run_folders_and_peft_folders(monkeypatch):
    for entry in ("eval:main", "merge:main", "sample:main"):
        adapter = next(a for a in parser_of(entry, monkeypatch)._actions if "--adapter" in a.option_strings)
        assert "run folder" in adapter.help and "PEFT" in adapter.help, entry
