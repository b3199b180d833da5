"""Command implementations behind ``perceivers predict`` and ``perceivers convert``.

Each module has ``main(argv) -> int``; :mod:`perceivers.cli` dispatches to them.
"""
