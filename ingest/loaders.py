"""Turn files into text, or say clearly why not (.txt, .md, .html, .pdf)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md", ".markdown"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES


class LoadError(ValueError):
    """A file that cannot be ingested; the message says why."""


def discover(paths: Iterable[Path | str]) -> list[Path]:
    """Files named, plus files with a known suffix under folders named (sorted, no duplicates)."""
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in SUFFIXES and not f.name.startswith("."):
                    found[f] = None
        elif p.exists():
            found[p] = None
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return list(found)


def _decode(data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise LoadError("binary content (NUL bytes) in a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LoadError(f"not valid UTF-8 at byte {e.start}") from e


def html_to_text(html: str) -> str:
    """Visible text of an HTML page: block elements on their own lines, scripts and styles
    dropped."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    text = soup.get_text("\n")
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.split("\n")]
    # Runs of empty lines (from nested blocks) become one paragraph break.
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def pdf_to_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise LoadError("encrypted PDF")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except LoadError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise LoadError(f"broken PDF: {e}") from e
    return "\n\n".join(p for p in pages if p)


def load_text(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise LoadError(
            f"unsupported file type {suffix or '(none)'}; supported: {', '.join(sorted(SUFFIXES))}"
        )
    if suffix in PDF_SUFFIXES:
        text = pdf_to_text(path)
        if not text.strip():
            raise LoadError("no extractable text in the PDF (scanned images?)")
        return text
    text = _decode(path.read_bytes())
    if suffix in HTML_SUFFIXES:
        text = html_to_text(text)
    if not text.strip():
        raise LoadError("empty document")
    return text
