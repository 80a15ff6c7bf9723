"""The names of the robustness-lever runs (issue 15): ``<norm>+<augment>[+<lever>]``, e.g. ``gn+strong+amp``.

One table per part says both what a name sets (TrainConfig fields) and how the lever table describes it, so
the training harness (engines.experiments.norm_augment) and the table (engines.experiments.lever_table) can
never disagree on a lever. Kept free of torch: the table is read where nothing trains.
"""

from __future__ import annotations

from typing import NamedTuple


class Part(NamedTuple):
    label: str  # how docs/robustness.md's lever table names it
    fields: dict  # the TrainConfig fields it sets (the rest keep their defaults)


NORMS = {"bn": Part("BatchNorm", {"norm": "batch"}),
         "gn": Part("GroupNorm (8 groups)", {"norm": "group"}),
         "ln": Part("layer norm", {"norm": "layer"})}  # layer norm: GroupNorm with one group
AUGMENTS = {"basic": Part("basic", {"augment": "basic"}), "strong": Part("strong", {"augment": "strong"})}
LEVERS = {
    # optical density against each crop's own plasma (engines.plasma_norm), and its control without the log
    "plasma": Part("plasma-relative input", {"input_norm": "plasma"}),
    "ratio": Part("plasma-ratio input (control)", {"input_norm": "plasma-ratio"}),
    # feature-style mixing (engines.style_mix): PBC donors, or other microscopes' white cells
    "mix": Part("style mixing, PBC donors", {"style": "batch"}),
    "xmix": Part("style mixing, foreign donors", {"style": "foreign"}),
    # FixMatch consistency on other microscopes' unlabelled white cells (engines.baseline)
    "xfix": Part("consistency on foreign cells", {"consistency": 1.0}),
    # detail limited to 32 or 16 px across the same field (engines.baseline.LowPass)
    "res32": Part("32 px detail", {"resolution": 32}),
    "res16": Part("16 px detail", {"resolution": 16}),
    # luminance only (engines.baseline.Grey), in training and in the graph
    "grey": Part("greyscale input", {"colour": "grey"}),
    # Fourier amplitude mixing with other microscopes' white cells as donors (engines.amplitude_mix)
    "amp": Part("amplitude mixing, foreign donors", {"amplitude_mix": 1.0}),
}
# Every TrainConfig field a variant name can set (what a result file's variants block records).
FIELDS = tuple(dict.fromkeys(k for table in (NORMS, AUGMENTS, LEVERS) for part in table.values() for k in part.fields))
# The variants run so far (the result files under engines/experiments/results name them; a test checks).
MEASURED = ("bn+basic", "gn+basic", "bn+strong", "gn+strong", "ln+basic", "ln+strong",
            "bn+basic+plasma", "bn+strong+plasma", "bn+basic+ratio", "bn+strong+ratio",
            "bn+basic+mix", "bn+strong+mix", "bn+basic+xmix", "bn+strong+xmix", "bn+basic+xfix", "bn+strong+xfix",
            "bn+basic+res32", "bn+strong+res32", "bn+strong+res16", "gn+strong+res32", "ln+strong+res32",
            "bn+basic+grey", "bn+strong+grey", "bn+strong+amp")


def parts(name: str) -> list[Part]:
    """The parts a variant name is made of; a clear error for a name outside the grammar."""
    norm, augment, *lever = name.split("+")
    if norm not in NORMS or augment not in AUGMENTS or len(lever) > 1 or (lever and lever[0] not in LEVERS):
        raise ValueError(f"unknown variant {name!r}: expected <{'|'.join(NORMS)}>+<{'|'.join(AUGMENTS)}>"
                         f"[+<{'|'.join(LEVERS)}>]")
    return [NORMS[norm], AUGMENTS[augment], *(LEVERS[x] for x in lever)]


def overrides(name: str) -> dict:
    """The TrainConfig fields a variant name sets."""
    return {k: v for part in parts(name) for k, v in part.fields.items()}


def describe(name: str) -> str:
    """``gn+strong+res32`` -> ``GroupNorm (8 groups) + strong + 32 px detail``."""
    return " + ".join(part.label for part in parts(name))
