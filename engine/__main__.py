"""``python -m engine`` is ``falco-talon``."""

from engine.cli import main

main()
