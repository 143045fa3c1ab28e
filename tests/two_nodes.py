"""A real two-node Ray cluster on one machine, for tests: `python -m tests.two_nodes`.

Prints one JSON line {"address": ..., "head": node_id, "worker": node_id}, then obeys
commands on stdin: `remove` (the worker node goes away, as when a machine is lost) and
`quit`. Each node has 2 logical CPUs, so one 2-worker trial fits on each.
"""

from __future__ import annotations

import json
import sys

from ray.cluster_utils import Cluster


def main() -> None:
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 2, "include_dashboard": False, "resources": {"head": 1}},
    )
    worker = cluster.add_node(num_cpus=2, resources={"worker": 1})
    cluster.wait_for_nodes(timeout=60)
    head_id = cluster.head_node.node_id
    print(json.dumps({"address": cluster.address, "head": head_id, "worker": worker.node_id}), flush=True)
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "remove":
                cluster.remove_node(worker, allow_graceful=False)
                print(json.dumps({"removed": worker.node_id}), flush=True)
            elif cmd == "quit":
                break
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
