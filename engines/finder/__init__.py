"""Measuring and fitting the cell finder (edge/cellfinder.py) on the shared microscopes' annotated frames.

    python -m engines.finder.bench --out docs/cellfinder.md   # per source, with the leave-one-microscope-out column
    python -m engines.finder.bccd                              # BCCD's VOC boxes at its nominal scale
    python -m engines.finder.scale                             # µm/px estimated vs measured per source
    python -m engines.finder.tune [--leave-out SOURCE]         # the finder's defaults, fitted on train frames only
    python -m engines.finder.figures                           # docs/new-microscope.md's before/after pictures

``data`` reads the sources (TXL-PBC's three microscopes, BCCD) and their splits. Nothing here runs on the device.
"""
