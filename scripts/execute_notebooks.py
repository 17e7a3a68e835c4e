"""Run every notebook under notebooks/ top to bottom and store it with its outputs.

    python scripts/execute_notebooks.py

The notebooks are kept executed so that their tables and charts show on GitHub; the tests run
them again and check that the stored outputs are whole (tests/test_notebooks.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def main() -> int:
    for path in NOTEBOOKS:
        print(f"running {path.name}", flush=True)
        notebook = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
        client = NotebookClient(
            notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        )
        client.execute()
        # Kernel and timing metadata change on every run: keep only what a reader sees.
        for cell in notebook.cells:
            cell.metadata.pop("execution", None)
        nbformat.write(notebook, path)  # type: ignore[no-untyped-call]
    return 0


if __name__ == "__main__":
    sys.exit(main())
