"""Rules: loading, ``check``, matching and hot reload.

Real: rules files written to a temporary directory and read back by the loader (YAML with
positions, JSON Schema), the matcher, and for reload the inotify watcher (watchfiles) on a
real directory, including a ConfigMap-style ``..data`` symlink swap. Nothing Kubernetes:
actionners are the test-only ``test:*`` ones of ``tests/recording.py`` (real actionners
whose effect is a list), registered beside the built-in declarations.
"""
