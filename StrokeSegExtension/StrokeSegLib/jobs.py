"""Running the engine off the GUI thread: a worker thread with progress events and a cancel flag.

The images are copied out of the scene on the main thread before the job starts (MRML is not
thread-safe); the worker only runs the engine on those copies: :class:`SegmentationJob` runs
:func:`strokeseg.pipeline.segment_images`, :class:`PerfusionJob` runs
:func:`strokeseg.perfusion.run_perfusion` (PyTorch and NumPy/SciPy release the GIL while they
compute, so the GUI stays responsive). Progress comes back
through a queue the widget drains from a ``QTimer`` on the main thread, which is also where the
result is put into the scene.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from strokeseg.errors import Cancelled, StrokeSegError
from strokeseg.image import Image


@dataclass
class JobEvent:
    fraction: float
    message: str
    time: float


class EngineJob:
    """One engine call in a daemon thread: ``start()``, ``poll()``, ``cancel()``, ``wait()``.

    Subclasses implement :meth:`_work`, which gets the progress callback and the cancel event
    and returns the result. ``error`` is a one-line message; no result when there is one.
    """

    thread_name = "StrokeSeg job"

    def __init__(self) -> None:
        self.result = None
        self.error: str | None = None  # one-line message for the user
        self.details: str | None = None  # traceback of unexpected errors, for the log
        self.cancelled = False
        self._cancel = threading.Event()
        self._events: queue.Queue[JobEvent] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self.started_at: float | None = None
        self.finished_at: float | None = None

    def start(self) -> "EngineJob":
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

    def _work(self, progress: Callable[[float, str], None], cancel: threading.Event) -> Any:
        raise NotImplementedError

    def _run(self) -> None:
        try:
            self.result = self._work(self._progress, self._cancel)
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


class SegmentationJob(EngineJob):
    """:func:`strokeseg.pipeline.segment_images` on voxel copies of the model's inputs."""

    thread_name = "StrokeSeg segmentation"

    def __init__(self, images: Mapping[str, Image], *, model: Any = "auto", device: str = "auto",
                 settings: Any = None, models_dir: Any = None) -> None:
        super().__init__()
        self.images = dict(images)
        self.model = model
        self.device = device
        self.settings = settings
        self.models_dir = models_dir

    def _work(self, progress, cancel):
        from strokeseg.pipeline import segment_images

        return segment_images(self.images, model=self.model, device=self.device, settings=self.settings,
                              progress=progress, cancel=cancel, models_dir=self.models_dir)


class PerfusionJob(EngineJob):
    """:func:`strokeseg.perfusion.run_perfusion` on a voxel copy of a 4D series.

    ``options`` are run_perfusion's keyword arguments (kind, te_ms, adc, aif_point, aif_mask,
    thresholds, settings), with images already copied out of the scene.
    """

    thread_name = "StrokeSeg perfusion"

    def __init__(self, series: Image, **options: Any) -> None:
        super().__init__()
        self.series = series
        self.options = dict(options)

    def _work(self, progress, cancel):
        from strokeseg.perfusion import run_perfusion

        return run_perfusion(self.series, progress=progress, cancel=cancel, **self.options)
