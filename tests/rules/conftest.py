"""Rules: loading, ``check``, matching and hot reload.

Real: rules files written to a temporary directory and read back by the loader (YAML with
positions, JSON Schema), the matcher, and for reload the inotify watcher (watchfiles) on a
real directory, including a ConfigMap-style ``..data`` symlink swap, and one real
``falco-talon server`` process (dry run) whose shell-redirected log lands in the watched
directory, probed over real HTTP (``/healthz``, ``/metrics``). Nothing Kubernetes:
actionners are the test-only ``test:*`` ones of ``tests/recording.py`` (real actionners
whose effect is a list), registered beside the built-in declarations.
"""
