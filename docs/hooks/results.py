"""mkdocs hook: serve ``benchmarks/results/`` with the site and keep repository links working.

Pages link results as ``../benchmarks/results/NAME`` (a path that works when browsing the
repository); the site serves those files under ``results/`` and the links are rewritten to
match, so ``mkdocs build --strict`` checks that every linked result exists. Other links that
leave ``docs/`` (``../src/...``, ``../benchmarks/README.md``) go to the source repository.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = "benchmarks/results"
LINK = re.compile(r"\]\(((?:\.\./)+)([^)\s#]+)(#[^)\s]*)?\)")


def _root(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def on_files(files, config):
    results = _root(config) / RESULTS
    for path in sorted(results.rglob("*")):
        if path.is_file():
            rel = path.relative_to(results).as_posix()
            files.append(File.generated(config, f"results/{rel}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")  # pages in docs/ itself: 0
    repo = config["repo_url"].rstrip("/")

    def rewrite(m: re.Match) -> str:
        ups, target, anchor = m.group(1), m.group(2), m.group(3) or ""
        if len(ups) // 3 != depth + 1:  # stays inside docs/: mkdocs checks it
            return m.group(0)
        if target.startswith(RESULTS + "/"):
            rel = posixpath.join("../" * depth, "results", target[len(RESULTS) + 1:])
            return f"]({rel}{anchor})"
        return f"]({repo}/blob/main/{target}{anchor})"

    return LINK.sub(rewrite, markdown)
