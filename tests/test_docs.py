"""The documentation holds together: its links resolve, the README stays a short front door that names every notebook
and shows the very test command CI runs. Text only: no model, no torch."""

import re
import shlex
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
README_MAX_LINES = 250
NUMBER_WORDS = {word: n for n, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen".split())}

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
INLINE_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The text outside fenced code blocks, with inline code spans blanked (a link inside code is not a link)."""
    text = FENCE.sub(lambda match: "\n" * match.group(0).count("\n"), text)
    return CODE_SPAN.sub("code", text)


def relative_links(text: str) -> list[str]:
    """Every link target in a markdown text that points inside the repository (no scheme, not a bare e-mail)."""
    prose = _prose(text)
    targets = INLINE_LINK.findall(prose) + REFERENCE_DEFINITION.findall(prose)
    return [target for target in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)]


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a file's headings: the rendered text lowercased, punctuation dropped, spaces to '-'.

    A repeated anchor gets -1, -2, ... in order, as on GitHub."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for _, title in HEADING.findall(FENCE.sub("", text)):
        rendered = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")  # a link renders as its text
        slug = "".join(char for char in rendered.lower()
                       if char in " -_" or unicodedata.category(char)[0] in "LNM").replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(document: Path) -> list[str]:
    """The relative links of one document whose file, folder or heading does not exist, each with the reason."""
    problems = []
    for target in relative_links(document.read_text(encoding="utf-8")):
        path_part, _, anchor = target.partition("#")
        linked = (document.parent / path_part).resolve() if path_part else document
        if not linked.exists():
            problems.append(f"{target}: no file {linked.relative_to(REPO) if linked.is_relative_to(REPO) else linked}")
        elif anchor and linked.suffix == ".md" and anchor not in github_anchors(linked.read_text(encoding="utf-8")):
            problems.append(f"{target}: {linked.name} has no heading with the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("document", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_resolves(document):
    assert broken_links(document) == []


def test_the_link_checker_sees_links_and_anchors():
    """The checker must not pass by finding nothing: links hidden in code are skipped, real ones are found."""
    text = "see [a](docs/cli.md#x) and `[b](not/a/link.md)`\n```\n[c](nor/this.md)\n```\n[d]: ../data/README.md\n"
    assert relative_links(text) == ["docs/cli.md#x", "../data/README.md"]
    assert github_anchors("# The `tools.json` file: tool calls?\n## Deploy\n## Deploy\n") == {
        "the-toolsjson-file-tool-calls", "deploy", "deploy-1"}
    assert len(relative_links(README.read_text(encoding="utf-8"))) >= 5  # the README's "Where to read more" links


def test_readme_names_every_notebook():
    readme = README.read_text(encoding="utf-8")
    assert NOTEBOOKS, "no notebooks found"
    missing = [path.stem for path in NOTEBOOKS if f"`{path.stem}`" not in readme]
    assert missing == [], f"README.md does not name these notebooks: {missing}"


def test_readme_counts_the_notebooks_right():
    """'six ordered notebooks' outlived four new ones once: any count of notebooks in the README is the real one."""
    readme = _prose(README.read_text(encoding="utf-8")).replace("\n", " ")
    counts = re.findall(r"\b(\w+)\s+(?:ordered\s+)?(?:Jupyter\s+)?notebooks\b", readme, re.IGNORECASE)
    stated = [NUMBER_WORDS.get(word.lower(), int(word) if word.isdigit() else None) for word in counts]
    assert [n for n in stated if n is not None and n != len(NOTEBOOKS)] == []


def test_readme_is_a_short_front_door():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move reference material into docs/"


def _pytest_command(line: str) -> list[str]:
    """The `python -m pytest ...` words of a shell line (the part of an && chain that runs pytest)."""
    for part in line.split("&&"):
        if "pytest" not in part:
            continue
        words = shlex.split(part, comments=True)
        for start in range(len(words) - 2):
            if words[start:start + 3] == ["python", "-m", "pytest"]:
                return words[start:]
    return []


def test_readme_test_command_is_the_one_ci_runs():
    ci_commands = [_pytest_command(line) for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
                   if not line.lstrip().startswith("#")]
    ci_commands = [command for command in ci_commands if command]
    readme_blocks = "\n".join(match.group(0) for match in FENCE.finditer(README.read_text(encoding="utf-8")))
    readme_commands = [command for command in map(_pytest_command, readme_blocks.splitlines()) if command]
    assert len(ci_commands) == 1, f".ci/run should run pytest once, found {ci_commands}"
    assert readme_commands == ci_commands, "README.md's test command differs from the one .ci/run runs"
