"""Helpers shared by the benchmark scripts: the machine's name and docs/BENCHMARKS.md sections.

Each script owns one section of docs/BENCHMARKS.md between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` and replaces only that, atomically.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "BENCHMARKS.md"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def replace_section(name: str, text: str, docs: Path = DOCS) -> None:
    """Put ``text`` between the ``name`` markers of ``docs`` (appended when absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = f"{start}\n{text}\n{end}"
    old = docs.read_text() if docs.exists() else "# Benchmarks\n"
    if start in old and end in old:
        new = old[: old.index(start)] + body + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + body + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    tmp = docs.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, docs)
