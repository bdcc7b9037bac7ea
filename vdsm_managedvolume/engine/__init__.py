"""The engine shim: ovirt-engine's cinderlib client, on cinderlib.

The provisioning half of Managed Block Storage, beside the host side and
sharing nothing with it but the error conventions.  ovirt-engine runs
``managedvolume-cinderlib-client`` once per storage operation (the
contract: docs/engine.md):

    client.py      the process: stdout discipline, fast exit, forwarding
    args.py        the command line (upstream's order) and our options
    outcome.py     what the engine reads: one stdout line and the exit code
    runner.py      one request on cinderlib -> its outcome
    ops.py         the twelve operations
    forward.py     the command's side of warm mode
    warm.py        the warm service keeping cinderlib loaded
    filedriver.py  the embedded backend: a cinder driver on sparse files
    volumefile.py  sparse files, reflink/sparse copies, loop devices

Nothing here is imported by the host side, and nothing here imports
cinderlib at module level except ``filedriver`` (loaded by cinderlib
itself): the command stays cheap when the warm service answers.
"""
