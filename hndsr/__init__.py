"""HNDSR: hybrid neural-operator + diffusion super-resolution for satellite imagery.

This package holds the model side shared by training and serving: the degradation function, image decoding,
checkpoint format, networks and sampler. It imports torch, numpy and Pillow, never the pipeline around it.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
