"""vdsm-managedvolume: oVirt Managed Block Storage, host side.

Layers, top to bottom (each module named for one idea):

    stompframe  -> wire: STOMP 1.2 frames over (mutual) TLS
    agent       -> the standalone server: connections, heart-beats, pool
    jsonrpc     -> protocol: JSON-RPC 2.0 dispatch against the schema
    api, schema -> vdsm conventions: schema YAML, API class, return keys
    service     -> attach / detach / extend / volumes_info logic, locks,
                   journal
    privileged  -> oslo.privsep daemon running os-brick
    store       -> the SQLite journal

The engine shim (``engine/``) lives beside them and shares only ``errors``.
"""

__version__ = "0.1.0"

# Which build these files are of.  scripts/stamp-build (run by the RPM
# spec's %prep) writes one id per build here, in -common, and into
# privsep.py and brick.py, in the host package: a privsep daemon started
# between the two packages' steps of one RPM transaction, whose files are
# of two builds, refuses to start (brick.start_problem).  "source" in a
# source tree, in all three.
BUILD = "source"
