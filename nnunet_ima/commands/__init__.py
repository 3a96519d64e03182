"""Subcommands of the ``nnunet-ima`` command (each: ``configure(parser)`` and ``run(args)``)."""
