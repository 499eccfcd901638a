"""mkdocs hook: pages that describe the config model or the tables get them rendered from the code at
build time (the settings table, the tables' schemas), so the docs and the code cannot disagree."""

from __future__ import annotations

from bfpack_spark.flags import settings_markdown
from bfpack_spark.schemas import schemas_markdown

GENERATED = {
    "<!-- settings: generated from bfpack_spark/config.py -->": settings_markdown,
    "<!-- schemas: generated from bfpack_spark/schemas.py -->": schemas_markdown,
}


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (mkdocs' signature)
    for placeholder, render in GENERATED.items():
        if placeholder in markdown:
            markdown = markdown.replace(placeholder, render())
    return markdown
