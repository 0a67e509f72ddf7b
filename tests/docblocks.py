"""The shell blocks of a doc that the tests run as written: every ```bash block carries a
`<!-- test: NAME -->` marker, and a test runs it by name."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["doc_blocks"]

MARKED = re.compile(r"<!-- test: ([\w-]+)[^>]*-->\n```bash\n(.*?)\n```", re.S)


def doc_blocks(doc: Path) -> dict[str, str]:
    """NAME -> the block's code; every ```bash block of `doc` must be marked."""
    text = doc.read_text()
    blocks = dict(MARKED.findall(text))
    assert len(blocks) == text.count("```bash"), f"every ```bash block of {doc.name} needs a `<!-- test: NAME -->` marker"
    return blocks
