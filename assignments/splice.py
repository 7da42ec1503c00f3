"""Finding functions in a source file by qualified name, and cutting or replacing them as text.

Only the lines of the named functions change: everything else in the file stays byte for byte the same,
so the product code needs no markers. Positions come from the ast module's line numbers.
"""

import ast
from dataclasses import dataclass


@dataclass
class Span:
    """Where one function lies, as 0-based line indices into source.splitlines(keepends=True)."""

    start: int  # its first decorator, or its def line
    keep_end: int  # the end of what the starter keeps: the signature and the docstring
    end: int  # one past its last line
    body_indent: str  # the indentation of its body


def find_functions(source, filename="<source>"):
    """{qualified name: Span} of every function at the top level and every method of a top-level class.
    Raises SyntaxError when the source does not parse."""
    tree = ast.parse(source, filename=filename)
    lines = source.splitlines(keepends=True)
    found = {}

    def add(node, qualname):
        first = node.body[0]
        has_docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str)
        keep_end = first.end_lineno if has_docstring else first.lineno - 1
        line = lines[first.lineno - 1]
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        found[qualname] = Span(start, keep_end, node.end_lineno, line[:len(line) - len(line.lstrip())])

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            add(node, node.name)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    add(item, f"{node.name}.{item.name}")
    return found


def replace(source, replacements, filename="<source>"):
    """source with each named function's lines replaced: replacements = {qualname: function -> new text},
    where the function gets the Span and the source's lines. Raises KeyError for a name not defined."""
    spans = find_functions(source, filename)
    lines = source.splitlines(keepends=True)
    missing = sorted(set(replacements) - set(spans))
    if missing:
        raise KeyError(f"{filename} does not define {', '.join(missing)}")
    # bottom up, so that the line numbers of the functions above stay valid
    for name in sorted(replacements, key=lambda n: spans[n].start, reverse=True):
        span = spans[name]
        lines[span.start:span.end] = [replacements[name](span, lines)]
    return "".join(lines)


def blank(source, names_to_messages, filename="<source>"):
    """Keep each named function's decorators, signature and docstring; its body becomes
    raise NotImplementedError(message)."""
    def stub(message):
        return lambda span, lines: "".join(lines[span.start:span.keep_end]) + \
            f"{span.body_indent}raise NotImplementedError({message!r})\n"

    return replace(source, {name: stub(message) for name, message in names_to_messages.items()}, filename)


def function_text(source, name, filename="<source>"):
    """The whole text of one function: decorators, signature, docstring and body."""
    span = find_functions(source, filename)[name]
    return "".join(source.splitlines(keepends=True)[span.start:span.end])


def transplant(source, texts, filename="<source>"):
    """source with each named function replaced by the given whole-function text (same nesting)."""
    def keep(text):
        text = text if text.endswith("\n") else text + "\n"
        return lambda span, lines: text

    return replace(source, {name: keep(text) for name, text in texts.items()}, filename)


def code_lines(source, name, filename="<source>"):
    """How many lines of code the body of one function has (blank lines and comments not counted): what a
    student writes."""
    span = find_functions(source, filename)[name]
    body = source.splitlines()[span.keep_end:span.end]
    return sum(1 for line in body if line.strip() and not line.strip().startswith("#"))
