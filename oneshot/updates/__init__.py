"""New values for the kept weights once a mask is fixed (``--update``).

- ``lstsq`` / ``admm`` (:mod:`.weights`): per linear, from its input Hessian, judged on held-out windows;
- ``block`` (:mod:`.block`): a few Adam steps on a whole decoder block's kept weights.
"""

from __future__ import annotations

from ..errors import OneshotError

WEIGHT_UPDATES = ("lstsq", "admm")
UPDATES = ("none", *WEIGHT_UPDATES, "block")


def check_update(name: str) -> str:
    if name not in UPDATES:
        raise OneshotError(f"--update must be one of {', '.join(UPDATES)}, got {name!r}")
    return name
