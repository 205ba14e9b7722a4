"""The ``gossip`` command line: :mod:`~gossip.cli.main` parses, :mod:`~gossip.cli.commands` runs."""
