"""Methods: one file each, reading like the algorithm box of its paper. Selected by ``method.name``."""

from __future__ import annotations

from selfimprove.registry import Registry

METHODS = Registry(
    "method",
    {
        "star": "selfimprove.methods.star:star",
        "rest_em": "selfimprove.methods.rest_em:rest_em",
        "bstar": "selfimprove.methods.bstar:bstar",
        "tt_si": "selfimprove.methods.tt_si:tt_si",
    },
)
