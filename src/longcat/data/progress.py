"""Rich progress bars on stderr, or nothing at all when progress is off."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class ByteBar:
    """update(advance_bytes, info=...) moves the bar; stop() ends it early (before other output)."""

    def __init__(self, progress: Progress | None = None, task=None) -> None:
        self._progress = progress
        self._task = task

    def update(self, advance: int = 0, info: str | None = None) -> None:
        if self._progress is None:
            return
        fields = {} if info is None else {"info": info}
        self._progress.update(self._task, advance=advance, **fields)

    def stop(self) -> None:
        if self._progress is None:
            return
        # A corpus read with a byte limit, or with JSON overhead, ends below its estimate: show it done.
        done = self._progress.tasks[0].completed
        self._progress.update(self._task, total=done)
        self._progress.stop()
        self._progress = None


@contextlib.contextmanager
def byte_progress(description: str, total: int | None, *, enabled: bool) -> Iterator[ByteBar]:
    """A bytes progress bar (size, speed, time left) while the block runs; a no-op when disabled."""
    if not enabled:
        yield ByteBar()
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
    )
    bar = ByteBar(progress, progress.add_task(description, total=total, info=""))
    progress.start()
    try:
        yield bar
    finally:
        bar.stop()
