"""The floor plan of ollama.py: sections in dependency order, every section and part on the map,
one of each name, long lines not growing, and a docstring on every long function.

`python3 tests/test_layout.py` prints the figures these tests check (section sizes, the longest
functions, twins, long lines, docstrings), for a before/after of a refactor.
"""
import ast
import re
import sys
from collections import Counter
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "ollama.py"

#: Lines over 100 characters (ruff allows 120) may only fall: lower this when they do. 998 when this
#: test came in; the review before it counted 593.
MAX_LONG_LINES = 998
#: A function this long (lines) says what it is for in a docstring.
DOCSTRING_FROM = 15
#: References from a section to a later one that the map documents (user section, used name).
UPWARD = {
    ("Config", "OllamaError"),          # a unix: OLLAMA_HOST without a path is refused while reading the environment
    ("Config", "parse_duration"),       # OLLAMA_KEEP_ALIVE is a Go duration
    ("Config", "parse_keep_alive"),
}

_BANNER = re.compile(r"^# ([A-Z][A-Za-z ]+?) #{5,}$")
_PART = re.compile(r"^# == ([^:]+): (.+?) =+$")


class Layout:
    """ollama.py read once: its sections, parts, top-level names and functions."""

    def __init__(self, path=SOURCE):
        self.text = path.read_text()
        self.lines = self.text.splitlines()
        self.tree = ast.parse(self.text)
        self.doc = ast.get_docstring(self.tree) or ""
        self.sections = []          # (name, first line), in order (lines count from 1)
        self.parts = []             # (section, title, first line)
        for number, line in enumerate(self.lines, 1):
            m = _BANNER.match(line)
            if m and self.lines[number - 2].startswith("####"):
                self.sections.append((m.group(1), number))
            m = _PART.match(line)
            if m:
                self.parts.append((m.group(1), m.group(2), number))
        self.defined = {}           # top-level name -> section
        for node in self.tree.body:
            for name in _names_defined(node):
                self.defined.setdefault(name, self.section_at(node.lineno))

    def section_at(self, lineno):
        name = None
        for section, first in self.sections:
            if first > lineno:
                break
            name = section
        return name

    def order(self, section):
        return [s for s, _ in self.sections].index(section)

    def sizes(self):
        """Section -> lines."""
        ends = [first for _, first in self.sections[1:]] + [len(self.lines) + 1]
        return {name: end - first for (name, first), end in zip(self.sections, ends)}

    def functions(self):
        """(qualified name, first line, length in lines, has a docstring) for every def."""
        found = []

        def visit(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = prefix + child.name
                    if not isinstance(child, ast.ClassDef):
                        found.append((name, child.lineno, child.end_lineno - child.lineno + 1,
                                      ast.get_docstring(child) is not None))
                    visit(child, name + ".")
                else:
                    visit(child, prefix)
        visit(self.tree, "")
        return found

    def upward_references(self):
        """(user section, name, line) for each use of a top-level name defined in a later section."""
        found = set()
        for node in self.tree.body:
            user = self.section_at(node.lineno)
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id in self.defined:
                    owner = self.defined[sub.id]
                    if owner and user and self.order(owner) > self.order(user):
                        found.add((user, sub.id, sub.lineno))
        return sorted(found, key=lambda item: item[2])

    def twins(self):
        """Top-level names that differ only by leading underscores."""
        by_bare = {}
        for name in self.defined:
            by_bare.setdefault(name.lstrip("_"), []).append(name)
        return sorted(tuple(sorted(names)) for names in by_bare.values() if len(names) > 1)

    def long_lines(self):
        return [number for number, line in enumerate(self.lines, 1) if len(line) > 100]

    def undocumented(self):
        return [(name, line, length) for name, line, length, doc in self.functions()
                if length >= DOCSTRING_FROM and not doc]


def _names_defined(node):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [t.id for t in targets if isinstance(t, ast.Name)]
    return []


def _map_entries(doc):
    """Section names as the map's table lists them (a word or two at the start of an indented row)."""
    return {m.group(1).strip() for m in re.finditer(r"^    ([A-Z][A-Za-z]+(?: [A-Za-z]+)?)  +\S", doc, re.M)}


def test_every_section_is_on_the_map():
    layout = Layout()
    listed = _map_entries(layout.doc)
    assert [name for name, _ in layout.sections if name not in listed] == []


def test_every_part_is_on_the_map_under_its_section():
    layout = Layout()
    missing = []
    for section, title, _line in layout.parts:
        # the map names a part by the words of its banner before any ':' or '('
        short = re.split(r"[:(]", title)[0].strip()
        row = re.search(r"^    %s  +(.*?)(?=^    [A-Z]|\Z)" % re.escape(section), layout.doc, re.M | re.S)
        if not row or "== " + short not in " ".join(row.group(1).split()):
            missing.append("%s: %s" % (section, short))
    assert missing == []


def test_sections_use_only_those_above_them_beyond_the_documented_exceptions():
    layout = Layout()
    found = [(user, name, line) for user, name, line in layout.upward_references() if (user, name) not in UPWARD]
    assert found == []


def test_no_two_top_level_names_differ_only_by_an_underscore():
    assert Layout().twins() == []


def test_lines_over_100_characters_do_not_grow():
    assert len(Layout().long_lines()) <= MAX_LONG_LINES


def test_every_long_function_says_what_it_is_for():
    assert ["%s (line %d, %d lines)" % item for item in Layout().undocumented()] == []


def report(layout):
    """The figures, as text."""
    out = []
    sizes = layout.sizes()
    total = len(layout.lines)
    functions = layout.functions()
    out.append("ollama.py: %d lines, %d functions" % (total, len(functions)))
    out.append("\nsections (lines, share):")
    for name, size in sizes.items():
        out.append("  %-14s %6d  %4.1f%%" % (name, size, 100.0 * size / total))
    out.append("\nparts:")
    for section, title, line in layout.parts:
        out.append("  %-10s %s (line %d)" % (section, title, line))
    lengths = sorted(length for _, _, length, _ in functions)
    out.append("\nfunction length: median %d, max %d" % (lengths[len(lengths) // 2], lengths[-1]))
    for name, line, length, _doc in sorted(functions, key=lambda f: -f[2])[:10]:
        out.append("  %4d  %s (line %d)" % (length, name, line))
    comments = sum(1 for line in layout.lines if line.strip().startswith("#"))
    out.append("\ncomment lines: %d (%.1f%%)" % (comments, 100.0 * comments / total))
    undocumented = [f for f in functions if not f[3]]
    out.append("functions without a docstring: %d of %d (%d of them %d lines or more)"
               % (len(undocumented), len(functions), len(layout.undocumented()), DOCSTRING_FROM))
    out.append("lines over 100 characters: %d" % len(layout.long_lines()))
    out.append("twins: %s" % (", ".join("/".join(t) for t in layout.twins()) or "none"))
    ups = Counter((user, layout.defined[name]) for user, name, _ in layout.upward_references())
    out.append("upward references: %s" % (", ".join("%s->%s x%d" % (u, o, n) for (u, o), n in ups.items())
                                           or "none"))
    return "\n".join(out)


if __name__ == "__main__":
    print(report(Layout(Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE)))
