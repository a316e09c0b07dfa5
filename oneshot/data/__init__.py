"""Text shipped with oneshot so that it calibrates and evaluates with no network (see README.md here:
WikiText-2, CC BY-SA 3.0)."""

from __future__ import annotations

import gzip
import os

HERE = os.path.dirname(os.path.abspath(__file__))
CALIBRATION = os.path.join(HERE, "wikitext2-valid.txt.gz")  # WikiText-2 validation split (tokenized form)
TEST = os.path.join(HERE, "wikitext2-test.txt.gz")  # WikiText-2 raw test split, joined with "\n\n"


def read(path: str) -> str:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return fh.read()
