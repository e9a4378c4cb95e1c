"""`ray start` for the test clusters of one machine, loopback only (tests/ray_cluster.py).

With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 every Ray process resolves its own node address to
127.0.0.1, but `ray start --address` (a worker node) then refuses: "Multi-node Ray clusters are
not supported on Windows and OSX". This runs the same `ray start` with only that guard lifted in
this CLI process, and its node address kept at 127.0.0.1 as the setting would give; the
processes it starts (raylet, agents, workers) inherit the setting.

    python tests/ray_start_loopback.py start --address 127.0.0.1:PORT --node-ip-address 127.0.0.1 ...
"""

import sys

import ray._private.ray_constants as ray_constants
import ray._private.services as services
from ray.scripts.scripts import main

ray_constants.ENABLE_RAY_CLUSTER = True  # the guard of `ray start --address`
services.get_node_ip_address = lambda address=None: "127.0.0.1"  # what ENABLE_RAY_CLUSTER=0 resolves to

if __name__ == "__main__":
    sys.argv[0] = "ray"
    sys.exit(main())
