"""The docs a maintainer reads match the code.

Module docstrings say what a module is for in a few lines; the prose lives in
``docs/design.md``, whose module map names every module of the package and
names no file, module or attribute that does not exist. These tests read the
sources with :mod:`ast` and the page as text, so they hold without importing
optional dependencies.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import gpu_patching

PACKAGE_ROOT = Path(gpu_patching.__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent
DESIGN = REPO_ROOT / "docs" / "design.md"
MAX_DOCSTRING_LINES = 12
SOURCE_SUFFIXES = (".py", ".cu", ".cuh", ".cpp", ".h", ".md", ".sh", ".toml")

MODULES = sorted(path.relative_to(PACKAGE_ROOT).as_posix() for path in PACKAGE_ROOT.rglob("*.py"))
DESIGN_TEXT = DESIGN.read_text()
# Every `code span` of the page, once.
SPANS = sorted(set(re.findall(r"`([^`\n]+)`", DESIGN_TEXT)))


def _docstring_lines(module: str) -> int:
    tree = ast.parse((PACKAGE_ROOT / module).read_text(), filename=module)
    return len((ast.get_docstring(tree) or "").splitlines())


def _is_path(span: str) -> bool:
    # A file or folder of the repository: `gpu_patching/grid.py`, `stores/`,
    # `kernels/crop_patches.*`; not a URL scheme (`s3://`) or a bare suffix (`.cu`).
    if "://" in span or " " in span or span.startswith("."):
        return False
    return span.endswith("/") or span.endswith(".*") or span.endswith(SOURCE_SUFFIXES)


def _resolves(span: str) -> bool:
    """Whether ``span`` names an existing path, from the repository, the package or a subpackage."""
    bases = [REPO_ROOT, PACKAGE_ROOT] + [
        p for p in PACKAGE_ROOT.iterdir() if (p / "__init__.py").exists()
    ]
    return any(list(base.glob(span.rstrip("/"))) for base in bases)


PATH_SPANS = [span for span in SPANS if _is_path(span)]


def _module_map() -> str:
    start = DESIGN_TEXT.index("### Module map")
    end = DESIGN_TEXT.index("\n## ", start + 1)
    return DESIGN_TEXT[start:end]


def _named_in_map(module: str, table: str) -> bool:
    if f"`{module}`" in table:
        return True
    parts = module.split("/")
    if len(parts) == 1:
        return False
    package, name = parts[0], parts[-1]
    # A subpackage's row names the package (`stores/`) and its files by their own names.
    rows = [row for row in table.splitlines() if f"`{package}/`" in row]
    return any(name == "__init__.py" or f"`{name}`" in row or f"`{module}`" in row for row in rows)


def _module_attribute_spans() -> list[tuple[str, str]]:
    """`module.name` spans whose module is one of the package's, as (module path, name)."""
    by_name: dict[str, list[str]] = {}
    for module in MODULES:
        stem = Path(module).stem
        if stem != "__init__":
            by_name.setdefault(stem, []).append(module)
    found = []
    for span in SPANS:
        match = re.fullmatch(r"([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)(\(\))?", span)
        if (
            match
            and match.group(1) in by_name
            and len(by_name[match.group(1)]) == 1
            and "." + match.group(2) not in SOURCE_SUFFIXES
        ):
            found.append((by_name[match.group(1)][0], match.group(2)))
    return found


def _defined_names(module: str) -> set[str]:
    tree = ast.parse((PACKAGE_ROOT / module).read_text(), filename=module)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def _classes() -> dict[str, list[ast.ClassDef]]:
    classes: dict[str, list[ast.ClassDef]] = {}
    for module in MODULES:
        for node in ast.walk(ast.parse((PACKAGE_ROOT / module).read_text(), filename=module)):
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, []).append(node)
    return classes


CLASSES = _classes()


def _class_names(name: str) -> set[str]:
    """What a package class defines, with what its package base classes define."""
    names: set[str] = set()
    for node in CLASSES.get(name, []):
        for item in ast.walk(node):
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(item.name)
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                names.add(item.target.id)
            elif isinstance(item, ast.Assign):
                names.update(t.id for t in item.targets if isinstance(t, ast.Name))
            elif isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store):
                # Instance attributes (`self.seed = ...`).
                names.add(item.attr)
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in CLASSES:
                names |= _class_names(base.id)
    return names


CLASS_ATTRIBUTE_SPANS = [
    (match.group(1), match.group(2))
    for span in SPANS
    if (match := re.fullmatch(r"([A-Z][A-Za-z0-9]*)\.([A-Za-z_][A-Za-z0-9_]*)(\(\))?", span))
    and match.group(1) in CLASSES
]


@pytest.mark.parametrize("module", MODULES)
def test_module_docstring_is_at_most_twelve_lines(module):
    assert _docstring_lines(module) <= MAX_DOCSTRING_LINES


def test_design_names_paths():
    assert len(PATH_SPANS) >= 20


@pytest.mark.parametrize("span", PATH_SPANS)
def test_every_path_named_in_design_exists(span):
    assert _resolves(span), f"docs/design.md names `{span}`, which does not exist"


@pytest.mark.parametrize("module", MODULES)
def test_every_module_is_in_the_design_module_map(module):
    assert _named_in_map(module, _module_map()), f"{module} is missing from design.md's module map"


@pytest.mark.parametrize("module_path,name", _module_attribute_spans())
def test_every_module_attribute_named_in_design_exists(module_path, name):
    assert name in _defined_names(module_path), f"docs/design.md names `{name}` in {module_path}"


def test_design_names_class_attributes():
    assert len(CLASS_ATTRIBUTE_SPANS) >= 3


@pytest.mark.parametrize("class_name,name", CLASS_ATTRIBUTE_SPANS)
def test_every_class_attribute_named_in_design_exists(class_name, name):
    assert name in _class_names(class_name), f"docs/design.md names `{class_name}.{name}`"


def _design_headings() -> set[str]:
    # "## 6. Chunked stores (`gpu_patching/stores/`)" is cited as "Chunked stores".
    headings = set()
    for line in DESIGN_TEXT.splitlines():
        if line.startswith("#"):
            title = re.sub(r"^#+\s*(\d+\.\s*)?", "", line)
            headings.add(re.sub(r"\s*\(.*\)$", "", title).strip())
    return headings


def _section_citations() -> list[str]:
    """Every section title that a source file, test, benchmark or doc cites after ``design.md,``."""
    texts = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    for folder in ("gpu_patching", "tests", "benchmarks"):
        texts += sorted(p for p in (REPO_ROOT / folder).rglob("*.py") if p != Path(__file__))
    pattern = r'design\.md`*\s*,?\s*(?:#\s*)?"([^"\n]+(?:\n[^"\n]*)?)"'
    titles = {title for path in texts for title in re.findall(pattern, path.read_text())}
    # A title may run over two lines of a docstring or a comment.
    return sorted({" ".join(title.replace("#", " ").split()) for title in titles})


@pytest.mark.parametrize("title", _section_citations())
def test_every_design_section_cited_exists(title):
    assert title in _design_headings(), f'design.md has no section "{title}"'


def test_docs_cite_no_document_outside_the_repository():
    texts = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    texts += sorted(PACKAGE_ROOT.rglob("*.py"))
    cited = [
        f"{path.relative_to(REPO_ROOT)}: {match}"
        for path in texts
        for match in re.findall(
            r"\.\./shared|shared/STYLE|SEED\.md|STYLE\.md|DESIGN\.md", path.read_text()
        )
    ]
    assert cited == []
