"""Progress and records: a tqdm bar (loss, it/s), a CSV of losses, TensorBoard when installed, and a
loss-curve PNG at the end when matplotlib is installed; stage 2's held-out report. Only the main process writes."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

from adaface_core.checkpoint import atomic_write_text

logger = logging.getLogger(__name__)

CSV_HEADER = ["step", "loss", "lr", "multipliers", "seconds"]
HELDOUT_SETTINGS = "heldout_settings.json"


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines to stdout (the trainer's only console output besides the progress bar on stderr)."""
    root = logging.getLogger()
    if not any(getattr(h, "_adaface_trainer", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._adaface_trainer = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


def _parse_row(row: list[str]) -> Optional[list[str]]:
    """A complete data row; None for the header, a torn line or anything else."""
    if len(row) != len(CSV_HEADER) or not row[0].isdigit():
        return None
    try:
        float(row[1])
    except ValueError:
        return None
    return row


def _read_rows(path: Path, max_step: Optional[int] = None) -> list[list[str]]:
    """The losses CSV's data rows by step, one per step (the last one logged wins), up to ``max_step``.

    A last line without its newline was torn by a kill mid-write and is dropped."""
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines.pop()
    by_step: dict[int, list[str]] = {}
    for row in csv.reader(lines):
        row = _parse_row(row)
        if row is not None and (max_step is None or int(row[0]) <= max_step):
            by_step[int(row[0])] = row
    return [by_step[step] for step in sorted(by_step)]


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    """Replaces ``path`` in one rename: a kill leaves the old file or the new one, never half of one."""
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    atomic_write_text(path, text.getvalue())


def carry_logs(source_stage_dir: Path, stage_dir: Path, step: int) -> None:
    """A resume into another output folder brings the stage's records up to ``step`` along: the loss rows
    and stage 2's held-out start row. Why: else the new folder's log starts at the resume step, and its
    held-out "before" would be measured there instead of at the stage's true start."""
    if source_stage_dir.resolve() == stage_dir.resolve():
        return
    stage_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(stage_dir / "losses.csv", [CSV_HEADER, *_read_rows(source_stage_dir / "losses.csv", step)])
    heldout = HeldoutReport.start_rows(source_stage_dir / "heldout.csv")
    if heldout:
        _write_csv(stage_dir / "heldout.csv", heldout)
    else:
        (stage_dir / "heldout.csv").unlink(missing_ok=True)  # another run's start row must not be taken for this one's
    if heldout and (source_stage_dir / HELDOUT_SETTINGS).is_file():
        atomic_write_text(stage_dir / HELDOUT_SETTINGS, (source_stage_dir / HELDOUT_SETTINGS).read_text(encoding="utf-8"))
    else:
        (stage_dir / HELDOUT_SETTINGS).unlink(missing_ok=True)


class TrainLogger:
    def __init__(self, stage_dir: Path, stage: str, start_step: int, max_steps: int, enabled: bool,
                 tensorboard: bool = True, show_progress: bool = True):
        self.stage_dir = stage_dir
        self.stage = stage
        self.enabled = enabled
        self.csv_path = stage_dir / "losses.csv"
        self.png_path = stage_dir / "loss_curve.png"
        self._start = time.perf_counter()
        self._start_step = start_step
        self._writer = None
        self._bar = None
        self._csv = None
        if not enabled:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_csv(start_step)  # a header, then the rows up to start_step (none for a fresh file)
        self._csv = self.csv_path.open("a", newline="", encoding="utf-8")
        self._csv_writer = csv.writer(self._csv)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resume redoes the steps after its checkpoint; their old points are dropped
                self._writer = SummaryWriter(str(stage_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
            except Exception:  # tensorboard not installed: optional
                logger.info("TensorBoard not installed; losses go to %s only", self.csv_path)
        if show_progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, desc=stage, dynamic_ncols=True, file=sys.stderr)

    def _truncate_csv(self, step: int) -> None:
        """Keeps the rows up to the checkpoint being resumed from (the later steps are redone), once each,
        under one header. Whatever a kill left is repaired: an empty file, no header, a torn last line."""
        _write_csv(self.csv_path, [CSV_HEADER, *_read_rows(self.csv_path, step)])

    def _write_row(self, row: list) -> None:
        """Written through at once: a SIGKILL must not take the buffered rows with it (rows come at log steps)."""
        self._csv_writer.writerow(row)
        self._csv.flush()

    def log(self, step: int, loss: float, lr: float, multipliers: list[int], metrics: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._start
        self._write_row([step, f"{loss:.6g}", f"{lr:.6g}", " ".join(map(str, multipliers)), f"{elapsed:.2f}"])
        if self._writer is not None:
            self._writer.add_scalar(f"{self.stage}/loss", loss, step)
            self._writer.add_scalar(f"{self.stage}/lr", lr, step)
            for key, value in (metrics or {}).items():
                self._writer.add_scalar(f"{self.stage}/{key}", value, step)

    def progress(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4f}")

    def steps_per_second(self, step: int) -> float:
        elapsed = time.perf_counter() - self._start
        return (step - self._start_step) / elapsed if elapsed > 0 else 0.0

    def close(self) -> Optional[Path]:
        """Closes files and writes the loss-curve PNG (None when matplotlib is missing or nothing was logged)."""
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.close()
        if self._csv is not None:
            self._csv.close()
        if self._writer is not None:
            self._writer.close()
        try:
            return self.plot()
        except Exception as exc:  # close() runs in the loop's `finally`: a figure must not cost the final checkpoint
            logger.warning("could not draw the loss-curve PNG (the losses are in %s): %s: %s", self.csv_path,
                           type(exc).__name__, exc)
            return None

    def plot(self) -> Optional[Path]:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception:
            logger.info("matplotlib not installed: no loss-curve PNG (the losses are in %s)", self.csv_path)
            return None
        rows = _read_rows(self.csv_path)
        steps, losses = [int(row[0]) for row in rows], [float(row[1]) for row in rows]
        if not steps:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, losses, lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"AdaFace {self.stage} loss")
        ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(self.png_path, dpi=100)
        plt.close(fig)
        return self.png_path


class HeldoutReport:
    """Stage 2's held-out figures (``heldout_delta``, ``heldout_face``) at its start and end: ``heldout.csv``
    (a row each), ``heldout.json`` and the log.

    The start row is written at once, so a resumed stage compares its end with the stage's true start
    (the first row) instead of measuring again; ``settings`` (what the figures depend on) is stored beside
    it, and a resume under other settings measures its start again rather than compare unlike draws.
    ``face_bound``: after <= bound x before, else a warning.
    """

    def __init__(self, stage_dir: Path, face_bound: float, enabled: bool, settings: Optional[dict] = None):
        self.csv_path = stage_dir / "heldout.csv"
        self.json_path = stage_dir / "heldout.json"
        self.settings_path = stage_dir / HELDOUT_SETTINGS
        self.face_bound = float(face_bound)
        self.enabled = enabled
        self.settings = json.loads(json.dumps(settings or {}))  # as read back: tuples become lists
        self.before: dict[str, float] = {}

    @staticmethod
    def start_rows(path: Path) -> list[list[str]]:
        """The header and the stage-start row of a ``heldout.csv`` ([] when there is none)."""
        if not path.is_file():
            return []
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row, _ in zip(csv.reader(handle), range(2))]
        return rows if len(rows) == 2 and len(rows[0]) == len(rows[1]) else []

    def start(self, step: int, measure) -> dict[str, float]:
        rows = self.start_rows(self.csv_path) if step > 0 else []
        if rows and self._stored_settings() not in (None, self.settings):
            logger.warning("the held-out settings changed since this stage started (%s): its start is measured "
                           "again at step %d, and the report compares with that", self.settings_path, step)
            rows = []
        if rows:
            self.before = {k: float(v) for k, v in zip(rows[0][1:], rows[1][1:])}
            if self.enabled:  # end rows past the checkpoint are of the branch this resume abandons
                _write_csv(self.csv_path, rows + self._end_rows_up_to(step, len(rows[0])))
            return self.before
        self.before = measure()
        if self.enabled:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            _write_csv(self.csv_path, [["step", *self.before], [step, *(f"{v:.6g}" for v in self.before.values())]])
            atomic_write_text(self.settings_path, json.dumps(self.settings, indent=2, sort_keys=True))
        return self.before

    def _stored_settings(self) -> Optional[dict]:
        """The settings the start row was measured under; None for a run from before they were stored."""
        try:
            return json.loads(self.settings_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _end_rows_up_to(self, step: int, width: int) -> list[list[str]]:
        with self.csv_path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))[2:]
        return [row for row in rows if len(row) == width and row[0].isdigit() and int(row[0]) <= step]

    def finish(self, step: int, after: dict[str, float]) -> dict:
        summary = {f"{k}_before": v for k, v in self.before.items()}
        summary.update({f"{k}_after": float(v) for k, v in after.items()})
        summary["face_loss_bound"] = self.face_bound
        summary["face_within_bound"] = summary["heldout_face_after"] <= self.face_bound * summary["heldout_face_before"]
        if self.enabled:
            with self.csv_path.open("a", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerow([step, *(f"{after[k]:.6g}" for k in self.before)])
            self.json_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        logger.info("held-out delta loss %.4f -> %.4f; stage-1 face loss %.4f -> %.4f (bound: after <= %.2f x before: %s)",
                    summary["heldout_delta_before"], summary["heldout_delta_after"], summary["heldout_face_before"],
                    summary["heldout_face_after"], self.face_bound, "kept" if summary["face_within_bound"] else "EXCEEDED")
        if not summary["face_within_bound"]:
            logger.warning("stage 2 raised the held-out face-distillation loss beyond the bound: lower the composition "
                           "loss weights or d_coef, or stop earlier")
        return summary
