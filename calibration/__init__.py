"""Calibration: making a model's numbers mean what they say.

Now: probability calibration (temperature scaling) shared by every model. Later: INT8 calibration
sets/caches for TensorRT and the per-microscope scale (µm/px) calibration. See calibration/README.md.
"""
