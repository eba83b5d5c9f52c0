"""The ``af3`` commands beyond the few in :mod:`af3.cli`; shared helpers in :mod:`.common`."""
