"""Turn files into text, or say clearly why not (.txt, .md, .html, .pdf)."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md", ".markdown"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES


class LoadError(ValueError):
    """A file that cannot be ingested; the message says why."""


@dataclass
class Discovered:
    files: list[Path]
    refused: list[tuple[str, str]] = field(default_factory=list)  # (path, why), for the summary


def discover(paths: Iterable[Path | str], follow_links: bool = False) -> Discovered:
    """Files named, plus files with a known suffix under folders named (sorted, no duplicates).

    A path named is taken as given (a link named is followed: the user asked for it). Under a
    folder, a symbolic link into the folders named is skipped (its target is found under its
    own path); one that leaves them is followed only with `follow_links`. Links refused (leaving
    the folders, dangling, looping) are listed with the reason, never dropped silently.
    """
    out = Discovered([])
    seen: set[Path] = set()  # resolved files already found (a file named twice)
    named = [Path(p) for p in paths]
    roots = [p.resolve() for p in named if p.is_dir()]

    def add(path: Path) -> None:
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            out.files.append(path)

    def walk(folder: Path, ancestors: frozenset[Path]) -> None:
        for entry in sorted(folder.iterdir()):
            if entry.is_symlink():
                try:
                    target = entry.resolve(strict=True)
                except (OSError, RuntimeError) as e:  # RuntimeError: a loop (Python < 3.13)
                    loop = isinstance(e, RuntimeError) or getattr(e, "errno", 0) == errno.ELOOP
                    why = "symbolic link loop" if loop else "dangling symbolic link"
                    out.refused.append((str(entry), f"{why} (-> {os.readlink(entry)})"))
                    continue
                if target.is_dir() and target in ancestors:
                    out.refused.append((str(entry), f"symbolic link loop (-> {target})"))
                    continue
                if any(target.is_relative_to(r) for r in roots):
                    continue  # its target is ingested under its own path
                if not follow_links:
                    why = f"symbolic link leaves the folders being ingested (-> {target}); "
                    out.refused.append((str(entry), why + "not followed (--follow-links)"))
                    continue
            if entry.is_dir():
                walk(entry, ancestors | {entry.resolve()})
            elif (
                entry.is_file()
                and entry.suffix.lower() in SUFFIXES
                and not entry.name.startswith(".")
            ):
                add(entry)

    for p in named:
        if p.is_dir():
            walk(p, frozenset({p.resolve()}))
        elif p.exists():
            add(p)
        elif p.is_symlink():
            out.refused.append((str(p), f"dangling symbolic link (-> {os.readlink(p)})"))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


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
