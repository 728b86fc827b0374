"""Every asterisk that belongs to a formula survives rendering as a literal `*`.

The docs write optima as π* and p* and mark significant intervals with a trailing `]*`.
Markdown reads a bare `*` as the start or end of emphasis, so two of them in one paragraph
turn the text between them into italics and both stars vanish: "KL(π_θ‖π*) ... π*'s mass"
would then say something else. The source writes them escaped (`π\\*`), which renders as a
literal star both on the docs site and on GitHub.

Each page is rendered with the Python-Markdown extensions that mkdocs.yml configures, the same
library and settings `mkdocs build` uses. Emphasis never crosses a blank line, so each
blank-line-separated block is rendered on its own, which lets a failure name its line. Code
(fenced blocks and inline spans) keeps its stars anyway and is left out on both sides.
"""

from __future__ import annotations

import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import markdown
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

# A formula star: a symbol, either one letter (π*, p*) or two or three capitals (KL*), or a
# closing bracket (an interval marked significant, "[+0.16, +1.5]*"), then a star, escaped or
# not, that does not start "**". The symbol must stand alone: the star that closes "*s*" or
# "*two words*" follows a letter that follows a star or another letter, and is not counted.
FORMULA_STAR = re.compile(r"(?<![\w*\\])([^\W\d_]|[A-Z]{2,3})\\?\*(?!\*)|(?<![\\*])(\])\\?\*(?!\*)")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1")


def formula_stars(text: str) -> Counter[str]:
    """The formula stars in text, normalised to their rendered form ("π*", "]*")."""
    return Counter((m.group(1) or m.group(2)) + "*" for m in FORMULA_STAR.finditer(text))


def doc_pages() -> list[Path]:
    """README.md (rendered by GitHub) and every page of the docs site, generated tables included."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def site_markdown() -> markdown.Markdown:
    """A Markdown renderer with mkdocs' built-in extensions plus those mkdocs.yml lists."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    names, options = ["toc", "tables", "fenced_code"], {}  # mkdocs always loads these three
    for entry in config.get("markdown_extensions", []):
        name, settings = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        if name not in names:
            names.append(name)
        if settings:
            options[name] = settings
    return markdown.Markdown(extensions=names, extension_configs=options)


def blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each blank-line-separated block outside fenced code."""
    found, current, start, fence = [], [], 0, None
    for number, line in enumerate(text.splitlines(), start=1):
        opening = FENCE.match(line)
        if fence is not None:  # inside a fenced block: wait for its closing fence
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = None
            continue
        if opening or not line.strip():
            if current:
                found.append((start, "\n".join(current)))
            current, fence = [], opening.group(1) if opening else None
            continue
        if not current:
            start = number
        current.append(line)
    if current:
        found.append((start, "\n".join(current)))
    return found


class _Text(HTMLParser):
    """The text of rendered HTML outside <code> and <pre>, which keep their stars anyway."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.in_code = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.in_code += tag in ("code", "pre")

    def handle_endtag(self, tag: str) -> None:
        self.in_code -= tag in ("code", "pre") and self.in_code > 0

    def handle_data(self, data: str) -> None:
        if not self.in_code:
            self.parts.append(data)


def rendered_text(renderer: markdown.Markdown, source: str) -> str:
    parser = _Text()
    parser.feed(renderer.reset().convert(source))
    return "".join(parser.parts)


def lost_stars(name: str, text: str, renderer: markdown.Markdown) -> list[str]:
    """One line per block of page `name` whose rendering has fewer formula stars than its source."""
    lost = []
    for line, source in blocks(text):
        wanted = formula_stars(CODE_SPAN.sub(" ", source))
        if not wanted:
            continue
        missing = wanted - formula_stars(rendered_text(renderer, source))
        if missing:
            names = ", ".join(f"{n}× {token}" for token, n in sorted(missing.items()))
            lost.append(f"{name}:{line}: the rendered block loses {names}; escape the star as \\*")
    return lost


PAGES = doc_pages()


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_formula_stars_survive_rendering(page: Path):
    text, renderer = page.read_text(encoding="utf-8"), site_markdown()
    lost = lost_stars(str(page.relative_to(REPO)), text, renderer)
    assert not lost, "\n".join(lost)
    # The whole page, rendered at once as mkdocs does, keeps them too (blocks could hide a
    # difference only if emphasis crossed a blank line).
    wanted = sum(formula_stars(CODE_SPAN.sub(" ", "\n\n".join(b for _, b in blocks(text)))).values())
    assert sum(formula_stars(rendered_text(renderer, text)).values()) == wanted, page.relative_to(REPO)


def test_the_check_sees_a_lost_star():
    # Two bare stars in one paragraph become an italic span and vanish; escaped, both survive.
    text = "KL(π_θ‖π*) is small, and π*'s mass is large.\n\nKL(π_θ‖π\\*) and π\\*'s mass, [+0.1, +1.5]\\*.\n"
    assert lost_stars("page.md", text, site_markdown()) == [
        "page.md:1: the rendered block loses 2× π*; escape the star as \\*"
    ]


def test_code_keeps_its_stars_and_is_not_counted():
    # Stars in code spans and fenced blocks render literally; the check skips them on both sides.
    text = "The optimum `π*` and *emphasis* here.\n\n```\nKL(p‖p*) and p*\n\n```\n\n*a* b *c*\n"
    assert lost_stars("page.md", text, site_markdown()) == []
    assert [line for line, _ in blocks(text)] == [1, 8]
