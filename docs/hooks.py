"""MkDocs hook: publish the repository's `figures/` (next to `docs/`) with the site, so
pages show the committed figures without copies under `docs/`."""

from pathlib import Path

from mkdocs.structure.files import File, Files

FIGURES = ("*.png", "*.gif", "*.svg")


def on_files(files: Files, config) -> Files:
    root = Path(config["docs_dir"]).resolve().parent
    for pattern in FIGURES:
        for path in sorted((root / "figures").glob(pattern)):
            uri = f"figures/{path.name}"
            if files.get_file_from_path(uri) is None:
                files.append(File(uri, str(root), config["site_dir"], config["use_directory_urls"]))
    return files
