"""A live progress bar for CLIs and the demo (tqdm on a terminal, a few plain lines otherwise)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, *, label: str = "requests") -> None:
        self._bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, mininterval=0.2,
                         dynamic_ncols=True, leave=True)

    def advance(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
