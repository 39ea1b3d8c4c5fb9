"""Methods: one file each, reading like the algorithm box of its paper. Selected by ``method.name``."""

from __future__ import annotations

from selfimprove.engine.registry import Registry

METHODS = Registry(
    "method",
    {
        "star": "selfimprove.methods.star:star",
        "length_gen": "selfimprove.methods.length_gen:length_gen",
        "rest_em": "selfimprove.methods.rest_em:rest_em",
        "bstar": "selfimprove.methods.bstar:bstar",
        "tt_si": "selfimprove.methods.tt_si:tt_si",
        "self_refine": "selfimprove.methods.self_refine:self_refine",
        "grpo": "selfimprove.methods.grpo:grpo",
        "score": "selfimprove.methods.score:score",
        "spin": "selfimprove.methods.spin:spin",
        "self_rewarding": "selfimprove.methods.self_rewarding:self_rewarding",
        "spc": "selfimprove.methods.spc:spc",
    },
)
