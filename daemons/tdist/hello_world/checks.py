"""The hello world's answer checks for ``tdist-client``: what each operator of the pipeline is
sent for an input ``x`` and what it must answer.

``tdist-client`` is a generic benchmark (``tdist.client.cli``): it makes the INT64 inputs, calls
the operator, times the answers, and asks the operator's check (an ``AnswerCheck`` there) what
to send and whether an answer is right. ``CHECKS`` is its default table:

- ``encoder_decoder`` gets ``x`` and must answer ``output`` = ``x``;
- ``encoder`` gets ``x`` and must answer ``output`` = ``~x`` repeated ``input_copies`` (k) times
  and ``input_copies`` = ``[k]``;
- ``decoder`` gets what the encoder would have made of ``x`` and must answer ``output`` = ``x``.

Checks are module-level instances so that they pickle: ``--clients N`` sends them to each
client process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


def differs(name: str, got: Any, want: np.ndarray) -> str | None:
    """Why output ``name`` is not ``want`` (dtype, shape or values), or None."""
    if got is None:
        return f"no output {name!r}"
    got = np.asarray(got)
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"{name}: expected {want.dtype}{list(want.shape)}, got {got.dtype}{list(got.shape)}"
    if not np.array_equal(got, want):
        bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
        return f"{name}: {bad.size} of {want.size} values differ (first at index {bad[0]})"
    return None


def encoded(x: np.ndarray, copies: int) -> np.ndarray:
    """The encoder's output for ``x``: its complement, ``copies`` times."""
    return np.tile(~x, copies)


@dataclass(frozen=True)
class EncoderDecoderCheck:
    """The whole pipeline: the input comes back unchanged."""

    def inputs(self, x: np.ndarray, copies: int) -> dict[str, np.ndarray]:
        return {"input": x}

    def problem(self, x: np.ndarray, copies: int, outputs: Mapping[str, Any]) -> str | None:
        return differs("output", outputs.get("output"), x)

    def size_factor(self, copies: int) -> int:
        return 1


@dataclass(frozen=True)
class EncoderCheck:
    """The encoder alone: ``~x`` repeated ``copies`` times, and the copies it made."""

    def inputs(self, x: np.ndarray, copies: int) -> dict[str, np.ndarray]:
        return {"input": x}

    def problem(self, x: np.ndarray, copies: int, outputs: Mapping[str, Any]) -> str | None:
        return (differs("output", outputs.get("output"), encoded(x, copies))
                or differs("input_copies", outputs.get("input_copies"), np.array([copies], dtype=np.int64)))

    def size_factor(self, copies: int) -> int:
        return copies


@dataclass(frozen=True)
class DecoderCheck:
    """The decoder alone: sent the encoder's output for ``x``, it answers ``x``."""

    def inputs(self, x: np.ndarray, copies: int) -> dict[str, np.ndarray]:
        return {"input": encoded(x, copies), "input_copies": np.array([copies], dtype=np.int64)}

    def problem(self, x: np.ndarray, copies: int, outputs: Mapping[str, Any]) -> str | None:
        return differs("output", outputs.get("output"), x)

    def size_factor(self, copies: int) -> int:
        return copies


CHECKS: Mapping[str, EncoderDecoderCheck | EncoderCheck | DecoderCheck] = {
    "encoder_decoder": EncoderDecoderCheck(),
    "encoder": EncoderCheck(),
    "decoder": DecoderCheck(),
}
