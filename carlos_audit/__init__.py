"""carlos-audit: audit a Stable Diffusion LoRA with the CARLoS representation.

The library is the product; ``carlos_audit.cli`` is a thin click layer over it.
Importing this package is cheap: torch, diffusers and open_clip are imported
only by the modules that need them.
"""

import os as _os

__version__ = "0.1.0"

# torch's OpenMP threads spin while waiting by default. When two torch processes share the cores
# (a second case, a test run, two Ray workers on a 2-core machine) spinning made generation 30x
# slower here (0.6 s -> 18 s for one batch). Passive waiting costs nothing measurable when alone
# and does not change any result. It must be set before torch is imported; a user's value wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
