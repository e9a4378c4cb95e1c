"""The demo LoRAs are the same bytes every time they are written, in any process (safetensors
writes its header's metadata in a per-process hash order; models/demo_loras sorts it)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

WRITE = '''
import sys
from pathlib import Path
import numpy as np
from carlos_audit.models.demo_loras import write_lora
write_lora(Path(sys.argv[1]), {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(3, np.float32)},
           {"ss_network_dim": "4", "ss_network_alpha": "4", "ss_output_name": "demo", "format": "pt", "z": "last"})
'''


def test_a_demo_lora_has_the_same_bytes_in_every_process(tmp_path):
    from safetensors import safe_open

    files = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for f in files:
        subprocess.run([sys.executable, "-c", WRITE, str(f)], cwd=REPO, check=True)
    assert len({f.read_bytes() for f in files}) == 1
    with safe_open(str(files[0]), "np") as f:
        assert f.metadata()["z"] == "last" and f.get_tensor("b").tolist() == [[0, 1, 2], [3, 4, 5]]
