"""README.md and docs/ against the program: the environment table is generated from the same
SERVE_ENVIRONMENT that `serve --help` prints, every OLLAMA_* variable ollama.py names is in it, every
command is in the README's table, and the links between the documents lead somewhere.

`python3 tests/test_docs.py` rewrites README.md's environment table from ollama.py."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ollama  # noqa: E402

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
BEGIN = ("<!-- environment table: generated from ollama.py's SERVE_ENVIRONMENT "
         "by `python3 tests/test_docs.py`; edit it there -->")
END = "<!-- end of environment table -->"
REGENERATE = "run `python3 tests/test_docs.py` to regenerate README.md's table from ollama.SERVE_ENVIRONMENT"


def environment_table(rows=ollama.SERVE_ENVIRONMENT):
    """SERVE_ENVIRONMENT as a Markdown table."""
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = ["| variable | default | what it sets |", "|---|---|---|"]
    for name, default, meaning in rows:
        lines.append("| `%s` | %s | %s |" % (name, "`%s`" % cell(default) if default else "", cell(meaning)))
    return "\n".join(lines)


def readme_table(text):
    """The README's generated table (between BEGIN and END), or None when the markers are missing."""
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def test_readme_environment_table_is_generated_from_serve_environment():
    table = readme_table(README.read_text())
    assert table is not None, "README.md lacks the environment table's markers:\n%s\n%s" % (BEGIN, END)
    assert table == environment_table(), "README.md's environment table is not ollama.py's: " + REGENERATE


def test_serve_help_prints_serve_environment(capsys):
    try:
        ollama.main(["serve", "--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    assert "Environment variables:\n" + ollama._environment_help() in out
    for name, _default, _meaning in ollama.SERVE_ENVIRONMENT:
        assert "\n  %s " % name in out


def test_every_ollama_variable_the_program_names_is_in_the_table():
    source = (ROOT / "ollama.py").read_text()
    python_names = set(re.findall(r"^(OLLAMA_\w+)\s*=", source, re.M))      # constants, not variables
    named = set(re.findall(r"\bOLLAMA_[A-Z0-9_]*[A-Z0-9]\b", source)) - python_names
    read = set(re.findall(r"""["'](OLLAMA_[A-Z0-9_]+)["']""", source))
    listed = [name for name, _d, _m in ollama.SERVE_ENVIRONMENT]
    assert read and read <= named
    assert len(listed) == len(set(listed)), "a variable is listed twice"
    missing = sorted(named - set(listed))
    assert not missing, ("ollama.py names %s but SERVE_ENVIRONMENT (serve --help, README.md) does not list "
                         "it: add a row there, then run `python3 tests/test_docs.py`" % ", ".join(missing))
    assert not set(listed) - named, "SERVE_ENVIRONMENT lists a variable ollama.py never reads"


def test_readme_lists_every_command():
    text = README.read_text()
    for name, (_func, aliases, _args) in ollama.COMMANDS.items():
        row = re.search(r"^\| `%s\b.*$" % re.escape(name), text, re.M)
        assert row, "README.md's command table lacks " + name
        for alias in aliases:
            assert "`%s`" % alias in row.group(0), "README.md's row for %s lacks its alias %s" % (name, alias)


def test_readme_stays_a_front_door():
    words = len(README.read_text().split())
    assert words <= 1800, "README.md has %d words; the detail belongs in docs/" % words


def _slug(heading):
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_links_between_the_documents_lead_somewhere():
    broken = []
    for doc in [README] + DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue                                    # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append("%s: %s (no such file)" % (doc.name, target))
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append("%s: %s (no such heading)" % (doc.name, target))
    assert not broken, "\n".join(broken)


def main():
    text = README.read_text()
    if readme_table(text) is None:
        sys.exit("README.md lacks the markers:\n%s\n%s" % (BEGIN, END))
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    README.write_text("%s%s\n%s\n%s%s" % (head, BEGIN, environment_table(), END, tail))
    print("README.md: environment table written (%d variables)" % len(ollama.SERVE_ENVIRONMENT))


if __name__ == "__main__":
    main()
