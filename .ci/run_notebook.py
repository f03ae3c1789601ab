"""Execute a notebook headless with nbclient (as a user's Jupyter would) and fail on any error.

    python .ci/run_notebook.py examples/quickstart.ipynb

The notebook runs with its own folder as the working directory; the executed copy is not written
back (notebooks are committed without outputs). Fails when a cell raises or no figure was drawn.
"""

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def main(path: str) -> int:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(Path(path).parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    for o in outputs:
        if o.get("output_type") == "stream":
            print(o["text"], end="")
    print(f"{path}: {len(nb.cells)} cells executed in {time.perf_counter() - start:.1f} s, {figures} figure(s)")
    return 0 if figures else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
