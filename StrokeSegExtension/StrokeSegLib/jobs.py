"""Running the engine off the GUI thread: a worker thread with progress events and a cancel flag.

The images are copied out of the scene on the main thread before the job starts (MRML is not
thread-safe); the worker only runs :func:`strokeseg.pipeline.segment_images` on those copies
(PyTorch releases the GIL while it computes, so the GUI stays responsive). Progress comes back
through a queue the widget drains from a ``QTimer`` on the main thread, which is also where the
result is put into the scene.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from strokeseg.errors import Cancelled, StrokeSegError
from strokeseg.image import Image


@dataclass
class JobEvent:
    fraction: float
    message: str
    time: float


class SegmentationJob:
    """One call of ``segment_images`` in a daemon thread: ``start()``, ``poll()``, ``cancel()``."""

    def __init__(self, images: Mapping[str, Image], *, model: Any = "auto", device: str = "auto",
                 settings: Any = None, models_dir: Any = None) -> None:
        self.images = dict(images)
        self.model = model
        self.device = device
        self.settings = settings
        self.models_dir = models_dir
        self.result = None
        self.error: str | None = None  # one-line message for the user
        self.details: str | None = None  # traceback of unexpected errors, for the log
        self.cancelled = False
        self._cancel = threading.Event()
        self._events: queue.Queue[JobEvent] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="StrokeSeg segmentation", daemon=True)
        self.started_at: float | None = None
        self.finished_at: float | None = None

    def start(self) -> "SegmentationJob":
        self.started_at = time.perf_counter()
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def finished(self) -> bool:
        return self.started_at is not None and not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def poll(self) -> list[JobEvent]:
        """Progress events since the last call (call from the main thread)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def _progress(self, fraction: float, message: str) -> None:
        self._events.put(JobEvent(float(fraction), str(message), time.perf_counter()))

    def _run(self) -> None:
        from strokeseg.pipeline import segment_images

        try:
            self.result = segment_images(
                self.images, model=self.model, device=self.device, settings=self.settings,
                progress=self._progress, cancel=self._cancel, models_dir=self.models_dir,
            )
        except Cancelled:
            self.cancelled = True
            self.error = "cancelled"
        except StrokeSegError as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - the GUI must learn about any failure
            self.error = f"unexpected error: {exc.__class__.__name__}: {exc}"
            self.details = traceback.format_exc()
        finally:
            self.finished_at = time.perf_counter()
            if self._cancel.is_set() and self.result is None:
                self.cancelled = True
                self.error = self.error or "cancelled"
