"""Self-tests of the test environment's own servers (``tests/env``).

Real: the programs are built from the Go module proxy by ``tests/env/build.sh`` on first
use and cached under ``~/.cache/falco-talon/testenv``; nothing here is simulated.
"""
