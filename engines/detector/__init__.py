"""The learned cell finder (issue 14, route b): train, export with thresholds, card.

    python -m engines.detector.train --preset full --out .cache/detector/full
    python -m engines.detector.train --preset full --leave-out Raabin --out .cache/detector/without-Raabin
    python -m engines.detector.export --weights .cache/detector/full/weights.pt \
        --out engines/models/detector-v1/model.onnx
    python -m engines.detector.card                   # figures per microscope into the model card

The runtime half is ``edge/learnedfinder.py``; it never imports this package.
"""
