"""The documentation's shape: a README that stays a map, links that lead somewhere, the commands CI runs, and the
licence and citation files that GitHub reads. Cheap: no model, no data."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MAX_README_LINES = 250


def read(path):
    with open(path, encoding="utf-8") as file:
        return file.read()


def markdown_pages():
    return [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def relative_links(text):
    """Targets of the markdown links and images `[...](target)` that are files of the repository: not web
    addresses, not anchors of the same page, not mail; without their #anchor or "title" part."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    targets = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I) or target.startswith("#"):
            continue
        targets.append(target.split("#")[0])
    return targets


def test_readme_is_a_map_of_at_most_250_lines():
    lines = read(README).count("\n")
    assert lines <= MAX_README_LINES, \
        f"README.md has {lines} lines (at most {MAX_README_LINES}): move the detail into a page of docs/"


def test_every_relative_link_points_to_an_existing_file():
    assert os.path.isdir(os.path.join(ROOT, "docs")) and len(markdown_pages()) > 1, "docs/ holds no page"
    broken = []
    for page in markdown_pages():
        for target in relative_links(read(page)):
            if not os.path.exists(os.path.join(os.path.dirname(page), target)):
                broken.append(f"{os.path.relpath(page, ROOT)}: ({target})")
    assert not broken, f"links to files that do not exist: {broken}"


def test_relative_links_helper_keeps_files_and_drops_the_rest():
    text = ("[a](docs/speed.md#cpu) [b](https://x.org/y) [c](#cite) ![d](../e.png \"title\") [f](mailto:a@b.c)\n"
            "```\n[g](not/a/link.md)\n```\n")
    assert relative_links(text) == ["docs/speed.md", "../e.png"]


def test_readme_holds_the_two_quick_start_commands_and_ci_runs_the_second():
    readme = read(README)
    assert "pip install -r requirements.txt && python demo.py" in readme
    ci_commands = [line.strip() for line in read(os.path.join(ROOT, ".ci", "run")).splitlines()
                   if "pytest" in line and not line.lstrip().startswith("#")]
    assert ci_commands, ".ci/run runs no pytest command"
    for command in ci_commands:
        assert command in readme, f"the README's test command is not the one .ci/run runs: {command!r}"


def test_citation_cff_names_the_licence_and_the_paper():
    yaml = pytest.importorskip("yaml")
    citation = yaml.safe_load(read(os.path.join(ROOT, "CITATION.cff")))
    assert str(citation["cff-version"]).startswith("1.2")
    assert citation["license"] == "MIT"
    assert citation["title"] and citation["authors"] and citation["message"]
    paper = citation["preferred-citation"]
    assert "Rethinking Visual Geo-localization" in paper["title"]
    assert paper["type"] == "conference-paper" and paper["year"] == 2022


def test_license_is_mit():
    assert read(os.path.join(ROOT, "LICENSE")).startswith("MIT License")
