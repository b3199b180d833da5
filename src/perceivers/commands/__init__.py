"""Command implementations behind ``perceivers predict``, ``perceivers convert`` and ``perceivers export``.

Each module has ``main(argv) -> int``; :mod:`perceivers.cli` dispatches to them.
"""
