"""The command line and the configuration: ``falco-talon`` subcommands and settings.

Real: the installed ``falco-talon`` entry point run as a subprocess (or click's runner for
in-process cases), config files on disk, environment variables passed explicitly.
"""
