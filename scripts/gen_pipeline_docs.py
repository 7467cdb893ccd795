"""Regenerate the stage-key tables of ``pipelines/README.md`` from each stage's ``Params``.

    python scripts/gen_pipeline_docs.py          # rewrite the generated section in place
    python scripts/gen_pipeline_docs.py --check  # exit 1 if it is out of date (the tests do this)
"""

from __future__ import annotations

import sys
from pathlib import Path

from nautilus_pipeline.config import STAGE_DOCS_BEGIN, STAGE_DOCS_END, stage_reference

README = Path(__file__).resolve().parents[1] / "nautilus_pipeline" / "pipelines" / "README.md"


def render(text: str) -> str:
    head, sep, rest = text.partition(STAGE_DOCS_BEGIN)
    if not sep:
        return text.rstrip() + "\n\n## Stage keys\n\n" + STAGE_DOCS_BEGIN + "\n\n" + stage_reference() + "\n" + STAGE_DOCS_END + "\n"
    _, _, tail = rest.partition(STAGE_DOCS_END)
    return head + STAGE_DOCS_BEGIN + "\n\n" + stage_reference() + "\n" + STAGE_DOCS_END + tail


def main(argv: list[str]) -> int:
    text = README.read_text(encoding="utf-8")
    new = render(text)
    if "--check" in argv:
        if new != text:
            print(f"{README} is out of date: run python scripts/gen_pipeline_docs.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
