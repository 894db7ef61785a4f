"""Subcommands of the ``apm-fast`` CLI, one module each (registered in :mod:`apm_fast.cli`)."""
