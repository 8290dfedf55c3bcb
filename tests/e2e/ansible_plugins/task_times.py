"""Ansible callback for the e2e tests: the slowest tasks of a run, printed after the PLAY RECAP."""

from __future__ import annotations

import time
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: task_times
type: aggregate
short_description: prints the slowest tasks of a run
description: Wall time from each task's start to the next task's start, the ten slowest at the end.
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "task_times"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._times: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def _close(self) -> None:
        if self._current is not None:
            name, t0 = self._current
            self._times[name] = self._times.get(name, 0.0) + time.monotonic() - t0
            self._current = None

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        self._close()
        self._current = (task.get_name(), time.monotonic())

    v2_playbook_on_handler_task_start = v2_playbook_on_task_start  # type: ignore[assignment]

    def v2_playbook_on_stats(self, stats: Any) -> None:
        self._close()
        slowest = sorted(self._times.items(), key=lambda kv: kv[1], reverse=True)[:10]
        self._display.display("SLOWEST TASKS (s): " + "; ".join(f"{n} {t:.1f}" for n, t in slowest))
