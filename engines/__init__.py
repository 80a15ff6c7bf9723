"""Model building for cytoedge: datasets, training, ONNX export and evaluation.

Nothing here runs on the device; the edge runtime only reads the exported ``.onnx`` files and their
``cytoedge`` metadata (see ``edge/modelmeta.py`` and ``docs/models.md``).
"""
