"""TensorRT path (Jetson GPU): engine cache, engine builder, runtime backend.

``cache`` is pure Python and tested everywhere; ``builder`` and ``backend`` import tensorrt/pycuda
only inside functions, so importing this package never requires them (see docs/tensorrt.md).
"""
