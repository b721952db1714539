"""Run the test kubelet in the foreground: ``python -m tests.env.kubelet [--kubeconfig K]``.

Ctrl-C (or SIGTERM) stops it; the Node is then marked NotReady. Use the kubeconfig of a
running test control plane (``python -m tests.env.testenv up`` writes
``<state>/kubeconfig``; ``source <state>/env`` sets ``$KUBECONFIG``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from tests.env.kubelet import DEFAULT_NODE_NAME, TestKubelet, TestKubeletError


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.env.kubelet")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    parser.add_argument("--node-name", default=DEFAULT_NODE_NAME)
    parser.add_argument("--sandbox-root", default=None)
    parser.add_argument("--self-signed", action="store_true", help="do not use <state>/pki/ca.*")
    args = parser.parse_args()
    if not args.kubeconfig:
        parser.error("--kubeconfig or $KUBECONFIG is required")
    kubelet = TestKubelet(
        args.kubeconfig, args.node_name, args.sandbox_root, self_signed=args.self_signed
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        info = kubelet.start()
        print(f"{info.node_name}: {info.url} pid {info.pid}, log {info.log_path}", flush=True)
        while kubelet.running and not done.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    except TestKubeletError as e:
        print(f"testkubelet: {e}", file=sys.stderr)
        return 1
    finally:
        kubelet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
