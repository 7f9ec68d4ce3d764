"""How the report shows one training or test example: the task's own view (text or image), or its id.

A task renders an example with :meth:`simfluence.tasks.Task.describe_example`
(text, or float grey levels / RGB in [0, 1]); built-in tasks show the digit image, the
gloss or the decoded text. Runs of the user's own training loop, or runs whose task
cannot be rebuilt here, are shown by id. Everything returned is escaped HTML.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from simfluence.errors import UsageError
from simfluence.runs.log import RunSet

IMAGE_PIXELS = 56
"""Width and height (CSS pixels) of an example image in the page."""


class ExampleViews:
    """HTML snippets of examples, from a task or from ids alone.

    Args:
        train_ids: str ``[N]``.
        test_ids: str ``[M]``.
        task: a :class:`~simfluence.tasks.Task` whose data has these ids in this
            order, or None to show ids only.
        note: why the task is not used (shown in the page), if it is not.
    """

    def __init__(self, train_ids: np.ndarray, test_ids: np.ndarray, task: Any = None, note: str = ""):
        self.ids = {"train": train_ids, "test": test_ids}
        self.task = task
        self.note = note

    def id_html(self, split: str, index: int) -> str:
        """The example's id as an escaped ``<code>`` element."""
        return f'<code class="ex-id">{html.escape(str(self.ids[split][index]))}</code>'

    def content_html(self, split: str, index: int) -> str:
        """The example's text or image (empty without a task, or when the task only knows the id)."""
        if self.task is None:
            return ""
        view = self.task.describe_example(split, int(index))
        if isinstance(view, str):
            return "" if view == str(self.ids[split][index]) else f'<span class="ex-text">{html.escape(view)}</span>'
        return image_html(np.asarray(view), str(self.ids[split][index]))

    def html(self, split: str, index: int) -> str:
        """Id and content together."""
        return f'<span class="example">{self.content_html(split, index)}{self.id_html(split, index)}</span>'


def image_html(image: np.ndarray, alt: str) -> str:
    """An ``<img>`` with the image inlined as a base64 PNG (grey ``[H, W]`` or RGB ``[H, W, 3]`` in [0, 1])."""
    from matplotlib.image import imsave

    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise UsageError(f"describe_example: an image must be [H, W] or [H, W, 3], got shape {image.shape}")
    buffer = io.BytesIO()
    imsave(buffer, np.clip(image, 0.0, 1.0), cmap="gray", vmin=0.0, vmax=1.0, format="png")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<img class="ex-image" src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}" '
            f'width="{IMAGE_PIXELS}" height="{IMAGE_PIXELS}">')


def example_views(runs: RunSet, use_task_data: bool = True, task: Any = None) -> ExampleViews:
    """Views for ``runs``' examples: from ``task``, else from the task named in ``runs.meta``, else ids.

    The task is used only if its data has exactly ``runs``' ids in the same order;
    otherwise (or when it cannot be built here) the page says why and shows ids.
    """
    plain = ExampleViews(runs.train_ids, runs.test_ids)
    if not use_task_data:
        return plain
    if task is None:
        name = runs.meta.get("task")
        if not name:
            plain.note = "the runs do not name a task, so examples are shown by id"
            return plain
        from simfluence.tasks import get_task

        try:
            task = get_task(name, **runs.meta.get("task_config", {}))
            train_ids, test_ids = task.train_ids, task.test_ids
        except (ValueError, TypeError, ImportError, OSError) as error:
            plain.note = f"task '{name}' could not be loaded here ({error}), so examples are shown by id"
            return plain
    else:
        train_ids, test_ids = task.train_ids, task.test_ids
    if not (np.array_equal(train_ids, runs.train_ids) and np.array_equal(test_ids, runs.test_ids)):
        plain.note = f"task '{task.name}' has other example ids than the runs, so examples are shown by id"
        return plain
    return ExampleViews(runs.train_ids, runs.test_ids, task)
