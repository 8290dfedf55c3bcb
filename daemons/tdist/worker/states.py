"""The worker lifecycle as an explicit state machine (after supervisor's states.py)."""

from __future__ import annotations

import enum


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


_ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.SERVING, WorkerState.STOPPED}),
    WorkerState.SERVING: frozenset({WorkerState.DRAINING, WorkerState.STOPPED}),
    WorkerState.DRAINING: frozenset({WorkerState.STOPPED}),
    WorkerState.STOPPED: frozenset(),
}


class InvalidTransition(RuntimeError):
    pass


def check_transition(current: WorkerState, new: WorkerState) -> None:
    if new not in _ALLOWED[current]:
        raise InvalidTransition(f"worker cannot go from {current.value} to {new.value}")
