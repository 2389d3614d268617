"""The docs match the repository: the Layout tree names exactly the files that exist, and every
relative link in README.md and docs/*.md leads somewhere.

Fast and offline: reads files only. A failure lists every missing, stale or broken item at once, so
whoever adds or moves a file sees exactly which lines of docs/layout.md (or which links) to change.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUT = REPO / "docs" / "layout.md"

# The tree lines: indentation (two spaces a level), a path (a folder ends in "/"), two or more
# spaces, then the description. A path may hold a "/" (ui/index.html, .ci/run).
TREE_LINE = re.compile(r"^(?P<indent> *)(?P<path>\S+)(?: {2,}(?P<what>\S.*))?$")


def layout_paths(text: str) -> tuple[list[str], list[str]]:
    """Repository-relative paths the first code block of docs/layout.md names, in order, and the
    tree lines that are malformed. A folder line ("formats/") is the parent of the more-indented
    lines below it; a line indented deeper than its place allows is read under the nearest folder
    above it (and reported), so one bad line does not hide the rest."""
    block = re.search(r"^```[^\n]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert block, f"{LAYOUT.relative_to(REPO)}: no ``` code block holding the tree"
    paths: list[str] = []
    malformed: list[str] = []
    parents: list[tuple[int, str]] = []  # (indent, folder path with trailing "/")
    for number, line in enumerate(block.group(1).splitlines(), 1):
        if not line.strip():
            continue
        m = TREE_LINE.match(line)
        if not m:
            malformed.append(f"tree line {number} is not 'PATH  description': {line!r}")
            continue
        indent = len(m.group("indent"))
        while parents and parents[-1][0] >= indent:
            parents.pop()
        expected = parents[-1][0] + 2 if parents else 0
        if indent != expected:
            malformed.append(f"tree line {number} is indented {indent} spaces, {expected} under its folder "
                             f"({parents[-1][1] if parents else 'top level'}): {line!r}")
        path = (parents[-1][1] if parents else "") + m.group("path")
        paths.append(path)
        if path.endswith("/"):
            parents.append((indent, path))
    return paths, malformed


def modules_that_must_be_named() -> set[str]:
    """Every Python module of the two packages (__init__.py aside), bench/*.py, scripts/*."""
    found = {p for pkg in ("vit_service", "training") for p in (REPO / pkg).rglob("*.py")
             if p.name != "__init__.py" and "__pycache__" not in p.parts}
    found |= set((REPO / "bench").glob("*.py"))
    found |= {p for p in (REPO / "scripts").iterdir() if p.is_file() and p.name != "__pycache__"}
    return {p.relative_to(REPO).as_posix() for p in found}


def test_layout_names_exactly_the_files_that_exist():
    named, malformed = layout_paths(LAYOUT.read_text())
    stale = [p for p in named if not (REPO / p).exists()
             or (p.endswith("/") and not (REPO / p).is_dir())]
    unnamed = sorted(modules_that_must_be_named() - set(named))
    twice = sorted({p for p in named if named.count(p) > 1})
    problems = []
    if malformed:
        problems.append("malformed tree lines in docs/layout.md:\n  " + "\n  ".join(malformed))
    if stale:
        problems.append("named in docs/layout.md but not in the repository (remove or fix):\n  "
                        + "\n  ".join(stale))
    if unnamed:
        problems.append("in the repository but not named in docs/layout.md (add a line each):\n  "
                        + "\n  ".join(unnamed))
    if twice:
        problems.append("named more than once in docs/layout.md:\n  " + "\n  ".join(twice))
    assert not problems, "\n".join(problems)


# ---- links -----------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "bench").glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where a [x](y) is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a Markdown file's headings: the rendered text lower-cased, punctuation
    but '-' and '_' dropped, spaces as '-', a repeated heading numbered -1, -2, ..."""
    anchors: set[str] = set()
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link's text only
        title = title.replace("`", "").replace("*", "")
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def broken_links(doc: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(doc.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        where = f"{doc.relative_to(REPO)}: ({target})"
        if not dest.exists():
            broken.append(f"{where}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text()):
            broken.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    return broken


def test_relative_links_lead_to_files_and_headings():
    broken = list(dict.fromkeys(b for doc in doc_files() for b in broken_links(doc)))  # each once
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


def test_the_checks_see_links_and_tree_lines():
    """Guards the guards: the parsers find what they must (a regex that matched nothing would pass
    the two tests above vacuously)."""
    readme = (REPO / "README.md").read_text()
    targets = LINK.findall(prose(readme))
    assert "docs/layout.md" in targets and "docs/serving.md" in targets, targets
    assert "two-commands" in heading_anchors(readme)
    named, _ = layout_paths(LAYOUT.read_text())
    assert "vit_service/serving/ui/index.html" in named and "training/callbacks/time_budget.py" in named
    assert "vit_service/serving/service.py" in modules_that_must_be_named()
    assert "scripts/demo.sh" in modules_that_must_be_named()


# A data path in the docs: data/... or an absolute path, not inside a word or a URL. An option
# before it ("--data.train_dir X", "--out X", "data.val_dir=X") points a config elsewhere on purpose.
DATA_PATH = re.compile(r"(?<![\w./~:-])(?P<option>--[\w.*-]+[ =]|\b[\w.]+_dir=)?(?P<path>(?:data|/[\w.-]+)(?:/[\w.-]+)+)")


def config_data_dirs() -> dict[str, set[str]]:
    """configs/NAME.yaml -> the folders its data.*_dir read, and their parent (the DIR of DIR/train)."""
    import yaml

    dirs = {}
    for config in sorted((REPO / "configs").glob("*.yaml")):
        data = yaml.safe_load(config.read_text()).get("data") or {}
        own = {str(v).rstrip("/") for k, v in data.items() if k.endswith("_dir") and v}
        if own:
            dirs[config.relative_to(REPO).as_posix()] = own | {p.rsplit("/", 1)[0] for p in own}
    return dirs


def doc_sentences(text: str) -> list[str]:
    """Prose (fenced code left out) in units a claim lives in: a table row, or a sentence."""
    units = []
    for paragraph in re.split(r"\n\s*\n", FENCE.sub("", text)):
        if paragraph.lstrip().startswith("|"):
            units += paragraph.splitlines()
        else:
            units += re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split()))
    return units


def config_path_mismatches(doc: Path, dirs: dict[str, set[str]]) -> list[str]:
    """Sentences naming a config (configs/NAME.yaml; "the CIFAR-10 configs" names the cifar10*
    ones) and a data path of its dataset (a path holding its data folder's name, e.g. cifar10)
    that is not the config's own and not an option's argument."""
    wrong = []
    for sentence in doc_sentences(doc.read_text()):
        named = {c for c in dirs if c in sentence}
        if re.search(r"CIFAR-10 configs?\b", sentence):
            named |= {c for c in dirs if Path(c).name.startswith("cifar10")}
        for config in sorted(named):
            names = {Path(parent).name for parent in dirs[config] if "/" in parent} - {"train", "val", "test"}
            for m in DATA_PATH.finditer(sentence):
                path = m.group("path").rstrip("/.")
                if m.group("option") or path in dirs[config] or not names & set(path.split("/")):
                    continue
                wrong.append(f"{doc.name if not doc.is_relative_to(REPO) else doc.relative_to(REPO)}: {path} next to {config}, which reads "
                             f"{sorted(dirs[config])}: {sentence!r}")
    return wrong


def test_data_paths_named_with_a_config_are_the_configs_own():
    dirs = config_data_dirs()
    wrong = [w for doc in doc_files() for w in config_path_mismatches(doc, dirs)]
    assert not wrong, "docs name a config with a data path it does not read:\n  " + "\n  ".join(wrong)


def test_the_config_path_check_sees_the_cifar10_paths(tmp_path: Path):
    dirs = config_data_dirs()
    assert {"data/cifar10/train", "data/cifar10/test", "data/cifar10"} <= dirs["configs/cifar10_30min.yaml"]
    doc = tmp_path / "doc.md"
    doc.write_text("The CIFAR-10 configs read `/tmp/cifar10/train` as they stand.\n\n"
                   "| `configs/cifar10.yaml` | from /tmp/cifar10 |\n\n"
                   "Point configs/cifar10.yaml elsewhere with `--data.train_dir /tmp/cifar10/train`; it reads "
                   "`data/cifar10/train`, and runs/cifar10 holds runs.\n")
    wrong = config_path_mismatches(doc, dirs)
    assert len([w for w in wrong if "/tmp/cifar10/train next to" in w]) == 2, wrong  # both cifar10 configs
    assert len([w for w in wrong if "/tmp/cifar10 next to configs/cifar10.yaml" in w]) == 1, wrong
    assert len(wrong) == 3, wrong  # the option's argument, the config's own path and runs/ pass


def apt_packages(text: str) -> list[set[str]]:
    """The packages of each `apt-get install` line in the text (its options left out)."""
    return [{word for word in m.group(1).split() if not word.startswith("-")}
            for m in re.finditer(r"apt-get install ([^\n&;|]+)", text)]


def test_the_browser_install_line_is_what_ci_installs():
    # A local `make test` skips the web-page tests without chromium; README's "Install and test" and
    # docs/serving.md give the line that installs it, which must be the one .ci/run runs.
    ci = apt_packages((REPO / ".ci/run").read_text())
    install_and_test = (REPO / "README.md").read_text().split("## Install and test", 1)[1].split("\n## ", 1)[0]
    assert ci == [{"chromium", "chromium-driver"}], ci
    assert apt_packages(install_and_test) == ci, install_and_test
    assert "apt-get update && apt-get install" in install_and_test
    assert ci[0] in apt_packages((REPO / "docs/serving.md").read_text())


def test_the_command_reference_is_what_the_commands_print():
    """docs/cli.md against each command's --help from the code (whitespace aside: argparse wraps by the
    terminal's width and Python version); a changed option, default or help text must be written there."""
    sys.path.insert(0, str(REPO / "scripts"))
    from cli_reference import PAGE, page

    def words(text: str) -> list[str]:
        return text.split()

    current = words(PAGE.read_text())
    expected = words(page())
    first = next((i for i, (a, b) in enumerate(zip(current, expected)) if a != b), min(len(current), len(expected)))
    assert current == expected, (f"docs/cli.md differs from the commands' --help at word {first} "
                                 f"({' '.join(current[first:first + 8])!r} vs {' '.join(expected[first:first + 8])!r}): "
                                 "run python scripts/cli_reference.py")
