"""Calibration: making a model's numbers mean what they say.

Probability calibration (temperature scaling) shared by every model, and the INT8 calibration set with
its Q/DQ model for TensorRT. A microscope's scale and thresholds are measured on site by
``cytoedge calibrate`` (edge/calibrate.py). See calibration/README.md.
"""
