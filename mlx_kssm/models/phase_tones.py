"""The Phase-Mamba paper's names for ranges of R (spec: docs/phase-mamba-spec.md, "Tones by
R"), shown beside R by ``kssm sample --show-r``. They are labels only: nothing computes with
them. The original labels by R alone; its "Goldilocks zone" (R 0.40-0.55 with U 0.40-0.60,
observables.py) also asks for U, so a "Goldilocks" tone is not by itself inside the zone.
"""

from __future__ import annotations

# (lower bound, tone), highest first: R above 0.8 is over-synchronised, ..., below 0.10
# unformed. The upper two bounds are strict (R > 0.8, R > 0.55), as the spec writes them;
# the ranges 0.40-0.55, 0.30-0.40 and 0.10-0.30 include their lower ends.
TONES = (
    (0.80, "over-sync", True),
    (0.55, "resonant responsibility", True),
    (0.40, "Goldilocks", False),
    (0.30, "unbound joy", False),
    (0.10, "silent intimacy", False),
)
UNFORMED = "unformed potential"
# The original's drift labels (BRAKE above 0.95, BOOST below 0.80, else COAST).
BRAKE_ABOVE, BOOST_BELOW = 0.95, 0.80


def tone_of(R: float) -> str:
    """The paper's tone for an order parameter R in [0, 1]."""
    for bound, name, strict in TONES:
        if R > bound or (not strict and R >= bound):
            return name
    return UNFORMED


def drift_of(R: float) -> str:
    """The original's drift label: BRAKE, BOOST or COAST."""
    if R > BRAKE_ABOVE:
        return "BRAKE"
    return "BOOST" if R < BOOST_BELOW else "COAST"
