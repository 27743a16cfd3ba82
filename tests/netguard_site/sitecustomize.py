"""Loaded at interpreter start when this directory is on PYTHONPATH: the test fence in a gateway subprocess.

Only tests put this directory on PYTHONPATH, and they set NETGUARD_LOG to the file where refused attempts go.
"""
import os
import sys

if os.environ.get("NETGUARD_LOG"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import netguard

    def _record(address: str) -> None:
        with open(os.environ["NETGUARD_LOG"], "a") as log:
            log.write(f"{os.getpid()} {address}\n")

    netguard.install(_record)
    sys.path.pop(0)
