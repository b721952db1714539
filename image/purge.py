"""Remove Debian packages from a root filesystem as ``dpkg --purge`` would, without dpkg.

Runs on the build host against an unpacked root filesystem (it never runs in the image):
deletes the files each package lists in /var/lib/dpkg/info/<pkg>.list and its stanza in
/var/lib/dpkg/status; maintainer scripts are not run. Paths are resolved inside the root
(merged-/usr symlinks, absolute links re-rooted), never on the host.

    purge.py ROOTFS remove PKG...
    purge.py ROOTFS keep ROOT... -- EXCLUDED...
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path


def stanzas(status: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for stanza in status.read_text().strip("\n").split("\n\n"):
        m = re.search(r"^Package: (\S+)$", stanza, re.M)
        assert m, stanza
        out[m.group(1)] = stanza
    return out


def field(stanza: str, name: str) -> str:
    m = re.search(rf"^{name}: (.*(?:\n .*)*)", stanza, re.M)
    return m.group(1).replace("\n", " ") if m else ""


def closure(pkgs: dict[str, str], roots: list[str], excluded: set[str]) -> set[str]:
    provides: dict[str, str] = {}
    for name, stanza in pkgs.items():
        for p in field(stanza, "Provides").split(","):
            if p.strip():
                provides.setdefault(p.split()[0].strip(), name)
    keep: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        deps = field(pkgs[name], "Pre-Depends") + "," + field(pkgs[name], "Depends")
        for group in deps.split(","):
            for alt in group.split("|"):
                dep = alt.split("(")[0].split(":")[0].strip()
                dep = dep if dep in pkgs else provides.get(dep, "")
                if dep and dep not in excluded:
                    todo.append(dep)
                    break
    return keep


def inside(root: Path, path: str) -> Path:
    """``path`` inside ``root``, its parent directories' symlinks resolved within ``root``."""
    cur = str(root)
    parts = [p for p in path.split("/") if p and p != "."]
    for i, part in enumerate(parts[:-1]):
        nxt = os.path.join(cur, part)
        for _ in range(40):
            if not os.path.islink(nxt):
                break
            target = os.readlink(nxt)
            base = str(root) if target.startswith("/") else os.path.dirname(nxt)
            nxt = os.path.normpath(os.path.join(base, target.lstrip("/")))
        if os.path.commonpath([nxt, str(root)]) != str(root):
            raise SystemExit(f"purge: {'/'.join(parts[: i + 1])} leaves the root filesystem")
        cur = nxt
    return Path(cur, parts[-1]) if parts else root


def remove(root: Path, name: str) -> None:
    info = root / "var/lib/dpkg/info"
    for lst in (info / f"{name}.list", info / f"{name}:amd64.list"):
        if not lst.exists():
            continue
        paths = [inside(root, line) for line in lst.read_text().splitlines() if line.strip("/.")]
        for p in paths:
            if p.is_symlink():
                if not p.is_dir():  # never a link to a directory (/bin -> usr/bin and the like)
                    p.unlink()
            elif p.is_file():
                p.unlink()
        for p in sorted(paths, key=lambda q: len(str(q)), reverse=True):
            if p.is_dir() and not p.is_symlink():
                with contextlib.suppress(OSError):  # not empty: other packages' files are there
                    p.rmdir()


def main(argv: list[str]) -> None:
    root = Path(argv[1]).resolve()
    status = root / "var/lib/dpkg/status"
    pkgs = stanzas(status)
    mode, args = argv[2], argv[3:]
    if mode == "remove":
        gone = set(args)
    elif mode == "keep":
        split = args.index("--") if "--" in args else len(args)
        roots, excluded = args[:split], set(args[split + 1 :])
        gone = set(pkgs) - closure(pkgs, roots, excluded)
    else:
        raise SystemExit(f"purge: unknown mode {mode}")
    if unknown := gone - set(pkgs):
        raise SystemExit(f"purge: not installed: {sorted(unknown)}")
    for name in sorted(gone):
        remove(root, name)
    status.write_text("\n\n".join(s for n, s in pkgs.items() if n not in gone) + "\n")
    print(f"purge: removed {len(gone)} packages, kept {len(pkgs) - len(gone)}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv)
