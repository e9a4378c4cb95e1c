"""Engines that run the work units of a corpus build: in this process (``local``) or on a Ray
cluster (``ray``). Both run the same units (engines/units.py) with the same code, so a build's
bytes do not depend on the engine, the number of workers or the order units finish in.

    units.py       WorkUnit, run_unit (one arm of one batch, or the finalize step of one case)
    build.py       plan a build (shared base arm, LoRA units, finalize units), run it, build.json
    local.py       run units in this process, in order
    ray_engine.py  run units as Ray tasks (retried when a worker dies)
"""

ENGINES = ("local", "ray")
