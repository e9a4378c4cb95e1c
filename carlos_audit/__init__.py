"""carlos-audit: audit a Stable Diffusion LoRA with the CARLoS representation.

The library is the product; ``carlos_audit.cli`` is a thin click layer over it.
Importing this package is cheap: torch, diffusers and open_clip are imported
only by the modules that need them.
"""

__version__ = "0.1.0"
