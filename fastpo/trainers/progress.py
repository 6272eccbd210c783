"""A live progress bar for training runs (``rich.progress``): step, rate, time left and the
latest metrics. On only when asked and stdout is a terminal (never in logs or tests)."""
from __future__ import annotations

import contextlib
import sys

SHOWN = ("loss", "reward", "accuracy", "pair_accuracy", "reward_accuracy", "kl")


def _describe(row: dict) -> str:
    return "  ".join(f"{k} {row[k]:.3g}" for k in SHOWN if isinstance(row.get(k), (int, float)))


class _Off:
    def update(self, step: int, row: dict) -> None:
        pass


class _Bar:
    def __init__(self, progress, task):
        self.progress, self.task, self.last_eval = progress, task, ""

    def update(self, step: int, row: dict) -> None:
        if row.get("type") == "eval":
            self.last_eval = _describe(row)
            return
        text = _describe(row) + (f"  | eval {self.last_eval}" if self.last_eval else "")
        self.progress.update(self.task, completed=step, metrics=text)


@contextlib.contextmanager
def progress_bar(enabled: bool, name: str, start: int, total: int):
    """Yields an object with ``update(step, row)``; a no-op unless ``enabled`` and stdout is a TTY."""
    if not (enabled and sys.stdout.isatty()):
        yield _Off()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[metrics]}"))
    with Progress(*columns, transient=False) as progress:
        yield _Bar(progress, progress.add_task(name, total=total, completed=start, metrics=""))
