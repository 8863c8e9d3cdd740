"""The ``icefleet`` command line: one module per group of commands (thin adapters over ``common``)."""
