"""Files move exactly (the service issue): every mode from 0000 to 7777, several owners,
extended attributes and ACLs, hard links, a sparse file's holes, symlinks, a FIFO and the
times, compared by a manifest of both sides. MariaDB could not be restored when its 0660 files
arrived as 0640 (tarfile's `tar` filter clears group and other write bits)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from migctl.agent.dataplane import archive

ACL = bytes.fromhex("02000000" "0100060000000000" "0200060039300000"  # user::rw- user:12345:rw-
                    "0400040000000000" "1000060000000000" "2000040000000000")  # g, mask, o


def manifest(root: Path) -> dict[str, tuple]:
    """Everything a service could notice of ROOT (itself included), without following links
    or opening FIFOs; hard links as the set of names sharing an inode."""
    inodes: dict[int, list[str]] = {}
    out: dict[str, tuple] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        rel = str(path.relative_to(root))
        st = path.lstat()
        inodes.setdefault(st.st_ino, []).append(rel)
        kind = stat.S_IFMT(st.st_mode)
        attrs = {} if stat.S_ISLNK(st.st_mode) else {
            a: os.getxattr(path, a, follow_symlinks=False)
            for a in os.listxattr(path, follow_symlinks=False)}
        content: object = None
        if stat.S_ISREG(st.st_mode):
            content = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size,
                       st.st_blocks * 512 < st.st_size)  # holes kept
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                    tuple(sorted(attrs.items())), content)
    for names in inodes.values():
        for n in names:
            out[n] += (tuple(sorted(names)),)
    return out


@pytest.fixture
def every_kind(tmp_path: Path) -> Path:
    return fill(tmp_path / "src")


def fill(src: Path) -> Path:
    """SRC made to hold every kind of entry (created if missing)."""
    (src / "modes").mkdir(parents=True)
    for mode in range(0o10000):
        f = src / "modes" / f"{mode:04o}"
        f.write_bytes(b"x")
        os.chown(f, mode % 7 * 1000, mode % 5 * 1000)  # several owners
        os.chmod(f, mode)
    (src / "dirs").mkdir()
    for mode in (0o700, 0o1777, 0o2750, 0o0):
        d = src / "dirs" / f"{mode:04o}"
        d.mkdir()
        os.chmod(d, mode)
    os.chmod(src, 0o750)  # the volume's own folder: a database's data folder
    os.chown(src, 999, 999)
    (src / "attrs").write_text("with attributes")
    os.setxattr(src / "attrs", "user.origin", b"nodeA")
    os.setxattr(src / "attrs", "system.posix_acl_access", ACL)
    (src / "a").write_bytes(b"linked")
    os.link(src / "a", src / "b")
    os.link(src / "a", src / "dirs" / "0700" / "c")
    with open(src / "sparse", "wb") as f:
        f.seek(64 << 20)
        f.write(b"end")
        f.seek(1 << 20)
        f.write(b"middle")
    os.symlink("/etc/hostname", src / "abs-link")
    os.symlink("a", src / "rel-link")
    os.mkfifo(src / "fifo", 0o620)
    for p in [*src.rglob("*"), src]:
        os.utime(p, ns=(1_600_000_000_123_456_789, 1_700_000_000_987_654_321),
                 follow_symlinks=False)
    return src


def test_a_snapshot_restores_every_bit(tmp_path: Path, every_kind: Path) -> None:
    before = manifest(every_kind)
    archive.snapshot(every_kind, tmp_path / "snap.tar")
    dest = tmp_path / "dest"
    dest.mkdir()
    archive.restore(tmp_path / "snap.tar", dest)
    after = manifest(dest)
    assert after.keys() == before.keys()
    wrong = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not wrong, f"{len(wrong)} entries differ, e.g. {next(iter(wrong.items()))}"
    assert (tmp_path / "snap.tar").stat().st_size < 32 << 20, "the 64 MiB hole travelled as data"


def test_changes_arrive_exactly_too(tmp_path: Path, every_kind: Path) -> None:
    first = archive.snapshot(every_kind, tmp_path / "pre.tar")
    dest = tmp_path / "dest"
    dest.mkdir()
    archive.restore(tmp_path / "pre.tar", dest)
    os.chmod(every_kind / "modes" / "0640", 0o660)  # MariaDB's ddl_recovery.log
    os.chown(every_kind / "modes" / "0777", 4242, 4343)
    os.chmod(every_kind, 0o700)
    os.setxattr(every_kind / "attrs", "user.origin", b"changed")
    (every_kind / "modes" / "0000").unlink()
    os.mkfifo(every_kind / "fifo2")
    with open(every_kind / "sparse", "r+b") as f:
        f.seek(32 << 20)
        f.write(b"new data in a hole")
    archive.snapshot(every_kind, tmp_path / "final.tar", since=first)
    archive.apply_changes(tmp_path / "final.tar", dest)
    before, after = manifest(every_kind), manifest(dest)
    wrong = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()
             if before.get(k) != after.get(k) and k != "."}
    assert not wrong, wrong
    # the root's time moved with the new FIFO at the source and the apply at the destination:
    # its mode and owner are what matter
    assert before["."][:4] == after["."][:4]


def _fill_layer(root: Path) -> None:
    """A smaller set in the writable layer: every permission and special bit of one digit."""
    (root / "exact").mkdir()
    for mode in (0o0, 0o640, 0o660, 0o4755, 0o2755, 0o1777, 0o6711, 0o7777):
        f = root / "exact" / f"{mode:04o}"
        f.write_bytes(b"layer")
        os.chown(f, 70, 71)
        os.chmod(f, mode)
    os.setxattr(root / "exact" / "0660", "user.origin", b"layer")
    os.mkfifo(root / "exact" / "fifo")


def test_a_migration_moves_a_volume_and_the_layer_exactly(lab) -> None:
    """The manifest of both sides, after a real migration: the volume (every mode, owners,
    attributes, ACLs, links, holes, a FIFO, times, its own folder) and the writable layer."""
    from migctl.lab.workloads import TOY_IMAGE, ensure_toy_image, remove_everywhere
    from tests.conftest import CACHE, DELTA, migrate_json

    a, b = lab.docker["nodeA"], lab.docker["nodeB"]
    remove_everywhere(lab.docker, ["exact"], ["exactvol"])
    ensure_toy_image(a, CACHE)
    volume = Path(a.volumes.create("exactvol").attrs["Mountpoint"])
    fill(volume)  # in place: links and holes as made
    c = a.containers.run(TOY_IMAGE, ["sleep", "1000"], name="exact", detach=True,
                         volumes={"exactvol": {"bind": "/data", "mode": "rw"}})
    c.reload()
    upper_a = Path(c.attrs["GraphDriver"]["Data"]["UpperDir"])
    _fill_layer(upper_a)
    try:
        migrate_json(*DELTA, "--from", "nodeA", "--to", "nodeB", "exact")
        new = b.containers.get("exact")
        assert new.status == "running"
        moved = Path(b.volumes.get("exactvol").attrs["Mountpoint"])
        before, after = manifest(volume), manifest(moved)
        wrong = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()
                 if before.get(k) != after.get(k)}
        assert not wrong, f"{len(wrong)} volume entries differ, e.g. {sorted(wrong.items())[:2]}"
        upper_b = Path(new.attrs["GraphDriver"]["Data"]["UpperDir"])
        before, after = manifest(upper_a / "exact"), manifest(upper_b / "exact")
        assert before == after, {k: (before.get(k), after.get(k)) for k in before
                                 if before.get(k) != after.get(k)}
    finally:
        remove_everywhere(lab.docker, ["exact"], ["exactvol"])
