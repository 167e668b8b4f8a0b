"""A container's writable layer (its root filesystem changes) as an archive a peer can rebuild.

Overlay keeps what a container wrote in an upper directory: added and changed files as they
are, deleted ones as whiteouts (0/0 character devices), replaced directories marked opaque (an
xattr). The archive carries whiteouts as image layers do (`.wh.NAME`, `.wh..wh..opq`), and
owners, modes and extended attributes (user.* and security.*) as they are, so that the
destination rebuilds the same upper directory under its new container before the restore.

The walk (agent/dataplane/tree.py) never leaves the layer, and the final pass archives only
what changed since the first one.
"""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

from migctl.agent.dataplane.archive import apply_changes, open_plain, remove_entry, restore
from migctl.agent.dataplane.tree import (
    OPAQUE,
    OPAQUE_XATTR,
    WHITEOUT,
    XATTR_KEY,
    Manifest,
    copied_xattr,
    pack,
)
from migctl.common.errors import Refused


def snapshot_layer(upper: Path, archive: Path, since: Manifest | None = None) -> Manifest:
    """Archive the writable layer UPPER; with SINCE only what changed (tree.pack)."""
    return pack(upper, archive, layer=True, since=since)


def restore_layer(archive: Path, upper: Path) -> None:
    """Rebuild UPPER (a new container's empty upper directory) from ARCHIVE: checked whole
    first, like every archive from a peer, then whiteouts and attributes put back."""
    _check_layer(archive)
    _finish(upper, restore(archive, upper))


def apply_layer_changes(archive: Path, upper: Path) -> None:
    """Apply a changes archive of the layer to UPPER in place (archive.apply_changes)."""
    _check_layer(archive)
    _finish(upper, apply_changes(archive, upper))


def _check_layer(archive: Path) -> None:
    with open_plain(archive) as tar:
        for m in tar.getmembers():
            _check_layer_entry(archive, m)


def _finish(upper: Path, members: list[tarfile.TarInfo]) -> None:
    """Markers become overlay's own whiteouts and opaque folders (attributes were set with
    the extraction)."""
    for m in members:
        path = upper / m.name
        base = os.path.basename(m.name)
        if base == OPAQUE:
            path.unlink()
            os.setxattr(path.parent, OPAQUE_XATTR, b"y")
        elif base.startswith(WHITEOUT):
            path.unlink()
            hidden = path.parent / base[len(WHITEOUT):]
            remove_entry(hidden, upper)  # a changes archive may whiteout what the layer held
            os.mknod(hidden, stat.S_IFCHR, os.makedev(0, 0))


def _check_layer_entry(archive: Path, m: tarfile.TarInfo) -> None:
    """What only a layer archive holds: whiteout markers (empty regular files naming a plain
    entry) and attributes of the two copied namespaces, in hex."""
    base = os.path.basename(m.name)
    why = ""
    if base.startswith(WHITEOUT) and base != OPAQUE:
        hidden = base[len(WHITEOUT):]
        if not m.isreg() or m.size or hidden in ("", ".", "..") or hidden.startswith(WHITEOUT):
            why = "is not a whiteout marker of a plain name"
    elif base == OPAQUE and (not m.isreg() or m.size):
        why = "is not an opaque-directory marker"
    for key, value in m.pax_headers.items():
        if not key.startswith(XATTR_KEY):
            continue
        attr = key[len(XATTR_KEY):]
        try:
            bytes.fromhex(value)
        except ValueError:
            why = f"carries attribute {attr!r} with a malformed value"
        if not copied_xattr(attr) or m.issym() or m.islnk():
            why = f"carries attribute {attr!r}, which a layer does not"
    if why:
        raise Refused(f"archive {archive.name}: {m.name!r} {why}")
