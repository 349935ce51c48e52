"""The SMTP protocol core, sans-IO: bytes in, events and reply bytes out.

Nothing in this package touches the operating system (no sockets, files, threads,
clocks or logging); `tests/unit/test_core_purity.py` keeps it so. The worker feeds it
bytes and acts on its events.
"""
