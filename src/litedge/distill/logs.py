"""What a run reports: the ``litedge.distill`` logger, and its loss curves
(RUN_DIR/losses.csv, losses.json and losses.png via matplotlib, Agg).

Messages go through :data:`log` (a child of the ``litedge`` logger tree); lit-distill shows
INFO and above on stderr as ``lit-distill: ...`` lines, ``-q`` / ``-v`` change that. A library
caller configures ``logging`` as it likes.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from pathlib import Path

from litedge.safe_write import write_bytes

log = logging.getLogger("litedge.distill")


class LossLog:
    """One row per logged step: ``{"step": int, "total": float, "task": float, ...}``.

    Files are rewritten whole (temp file + ``os.replace``), so a kill never truncates them.
    A resumed run keeps the rows up to its checkpoint's step and appends after them.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.rows: list[dict] = []
        path = self.run_dir / "losses.json"
        if resume_step is not None and path.is_file():
            self.rows = [r for r in json.loads(path.read_text()) if r["step"] <= resume_step]

    def append(self, row: dict) -> None:
        self.rows.append(row)

    def _replace(self, name: str, write) -> None:
        # rendered in a private folder, then litedge.safe_write: O_EXCL temp, never through a planted link
        with tempfile.TemporaryDirectory(prefix=f".{name}.render-", dir=self.run_dir) as private:
            rendered = Path(private) / name
            write(rendered)
            write_bytes(self.run_dir / name, rendered.read_bytes(), what="loss log")

    def write(self, plot: bool = True) -> None:
        if not self.rows:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        columns = list(dict.fromkeys(k for row in self.rows for k in row))

        def write_csv(path: Path) -> None:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.rows)

        self._replace("losses.csv", write_csv)
        self._replace("losses.json", lambda p: p.write_text(json.dumps(self.rows)))
        if plot:
            self._replace("losses.png", lambda p: self._plot(p, columns))

    def _plot(self, path: Path, columns: list[str]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in self.rows]
        for name in columns:
            if name in ("step", "lr", "steps_per_s"):
                continue
            values = [r.get(name, float("nan")) for r in self.rows]
            ax.plot(steps, values, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=80)
        plt.close(fig)

    def series(self, name: str) -> list[float]:
        return [r[name] for r in self.rows if name in r]
