"""Rebuilding (rsync's receiver role): basis + delta -> new file, verified before it appears.

The output is assembled in a temporary file beside ``out_path`` and renamed over it only
after its length and xxh3_128 match the END token (as rsync, the result's hash is the proof: a
wrong basis cannot produce the right result).  Any failure raises :class:`DeltaError` and
removes the temporary file, so a reader of ``out_path`` sees either the old file or the
complete new one.

Runs of matched blocks are copied by the kernel (``copy_file_range``: a reflink on filesystems
that share extents), so rebuilding a file that barely changed costs about what ``cp`` does.
The result is read back and hashed on another thread as it is written (xxhash releases the
GIL, so on a second core), a few MiB behind the writer.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterable

from migctl.agent.delta.checksum import HashThread, hash_mapped
from migctl.agent.delta.signature import EMPTY_HASH
from migctl.agent.delta.stats import DeltaStats
from migctl.agent.delta.wire import Copy, End, Header, Literal, WireReader
from migctl.common.errors import DeltaError

FOLLOW_STEP = 4 << 20
"""The result is written, and handed to the hashing thread, in pieces of about this much."""
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


class _Rebuild:
    """Writes the output; opens the temporary file only once there is something to write.

    When the basis *is* the output file and the delta turns out to be "all of the basis, in
    order", nothing is written at all: the file already holds the result.
    """

    def __init__(self, header: Header, basis_fd: int | None, tmp_path: str) -> None:
        self.header = header
        self.basis_fd = basis_fd
        self.tmp_path = tmp_path
        self.out_fd = -1
        self.size = header.basis_length
        self.mm: mmap.mmap | None = None
        self.view: memoryview | None = None
        if basis_fd is not None and self.size:
            self.mm = mmap.mmap(basis_fd, self.size, prot=mmap.PROT_READ)
            self.view = memoryview(self.mm)
        self.blocks = -(-self.size // header.block_size)
        self.written = 0
        self.deferred = 0  # lazy mode: a prefix identical to the basis, not copied yet
        self.hashed = 0  # output bytes handed to the follower
        self.out_mm: mmap.mmap | None = None
        self.follower: HashThread | None = None
        self.use_copy_file_range = hasattr(os, "copy_file_range")

    def open_output(self) -> int:
        if self.out_fd < 0:
            self.out_fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            _preallocate(self.out_fd, self.header.new_length)
            self._start_follower()
            if self.deferred:
                self._copy_range(0, 0, self.deferred)
                self.deferred = 0
        return self.out_fd

    def _start_follower(self) -> None:
        """Map the output at its announced length (only bytes already written are ever read);
        a length no mapping can hold (a hostile header) leaves the hash to the end."""
        try:
            self.out_mm = mmap.mmap(self.out_fd, self.header.new_length, prot=mmap.PROT_READ)
        except (OSError, OverflowError, ValueError):
            return
        self.follower = HashThread(self.out_mm)

    def _follow(self, upto: int, final: bool = False) -> None:
        """Hand the output up to ``upto`` (all written) to the hashing thread."""
        if self.follower is not None and (
            upto - self.hashed >= FOLLOW_STEP or (final and upto > self.hashed)
        ):
            self.follower.add_range(self.hashed, upto)
            self.hashed = upto

    def close(self) -> None:
        if self.follower is not None:
            self.follower.cancel()  # after digest() a no-op; after a failure, no more reading
        if self.out_mm is not None:
            self.out_mm.close()
        if self.out_fd >= 0:
            os.close(self.out_fd)
            self.out_fd = -1
        if self.view is not None:
            self.view.release()
        if self.mm is not None:
            self.mm.close()

    def copy(self, token: Copy) -> int:
        bs = self.header.block_size
        if token.index >= self.blocks or token.count > self.blocks - token.index:
            raise DeltaError(
                f"delta copies basis blocks {token.index}..{token.index + token.count - 1} "
                f"but the basis has {self.blocks}"
            )
        start = token.index * bs
        stop = min(self.size, (token.index + token.count) * bs)
        self._check_room(stop - start)
        if self.out_fd < 0 and start == self.written == self.deferred:
            self.deferred = stop  # still the basis' own prefix: maybe never copied (lazy)
        else:
            self._copy_range(start, self.written, stop - start, self.open_output())
        self.written += stop - start
        return stop - start

    def literal(self, token: Literal) -> int:
        data = memoryview(token.data)
        self._check_room(len(data))
        out = self.open_output()
        done = 0
        while done < len(data):
            done += os.pwrite(out, data[done:], self.written + done)
        self.written += len(data)
        self._follow(self.written)
        return len(data)

    def _check_room(self, length: int) -> None:
        """Stop a corrupted or hostile stream before it writes more than it announced."""
        if self.written + length > self.header.new_length:
            raise DeltaError(
                f"delta writes past the {self.header.new_length} bytes its header announced"
            )

    def identity(self) -> bool:
        """True while the output is exactly the whole basis, not copied (lazy mode)."""
        return self.out_fd < 0 and self.deferred == self.written == self.size

    def digest(self) -> bytes:
        """The result's hash, as read back from the output (the basis itself when that is
        the result and nothing was written)."""
        if not self.written:
            return EMPTY_HASH
        if self.identity():
            assert self.mm is not None
            return hash_mapped(self.mm).digest()
        fd = self.open_output()
        if self.follower is None:
            with mmap.mmap(fd, self.written, prot=mmap.PROT_READ) as mm:
                return hash_mapped(mm).digest()
        self._follow(self.written, final=True)
        return self.follower.digest()

    def _copy_range(self, start: int, dst: int, length: int, out: int = -1) -> None:
        """Copy basis bytes into the output in the kernel (a reflink where the filesystem
        shares extents, no trip through user space otherwise); buffered writes where it
        cannot (another filesystem, an old kernel)."""
        assert self.basis_fd is not None and self.view is not None
        out = self.out_fd if out < 0 else out
        src, left = start, length
        while left and self.use_copy_file_range:
            try:  # in pieces the hashing thread can follow
                done = os.copy_file_range(self.basis_fd, out, min(left, FOLLOW_STEP), src, dst)
            except OSError as exc:
                if exc.errno not in _NO_COPY_FILE_RANGE:
                    raise
                self.use_copy_file_range = False
                break
            if done == 0:
                raise DeltaError("basis file shrank while the delta was being applied")
            src, dst, left = src + done, dst + done, left - done
            self._follow(dst)
        while left:
            done = os.pwrite(out, self.view[src : src + min(left, FOLLOW_STEP)], dst)
            src, dst, left = src + done, dst + done, left - done
            self._follow(dst)


def patch_stream(
    basis_path: str | os.PathLike[str] | None,
    chunks: Iterable[bytes],
    out_path: str | os.PathLike[str],
    *,
    verify_basis: bool = True,
    fsync: bool = False,
    expect_length: int | None = None,
) -> DeltaStats:
    """Apply a delta to ``basis_path`` (None: no basis) and atomically create ``out_path``.

    ``verify_basis``: when the result's hash fails, hash the basis too, to say whether it was
    not the one the sender's signature described ("wrong basis"); ``fsync`` makes the result
    durable before the rename (off by default, like rsync: migration verifies end to end).
    ``expect_length`` is the size the file was announced with elsewhere: a header promising
    another size is refused before any output is opened or preallocated, so a tiny hostile
    delta cannot make this side reserve a huge file.
    """
    reader = WireReader(chunks)
    header = reader.header
    if expect_length is not None and header.new_length != expect_length:
        raise DeltaError(
            f"the delta announces {header.new_length} bytes but the file was announced as "
            f"{expect_length}"
        )
    out_path = os.fspath(out_path)
    directory, name = os.path.split(os.path.abspath(out_path))
    basis_fd: int | None = None
    if basis_path is not None:
        try:
            basis_fd = os.open(basis_path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise DeltaError(f"basis file {os.fspath(basis_path)!r} does not exist") from exc
    tmp_path = os.path.join(directory, f".{name}.{os.urandom(4).hex()}.delta-tmp")
    rebuild: _Rebuild | None = None
    try:
        basis_stat = os.fstat(basis_fd) if basis_fd is not None else None
        basis_size = basis_stat.st_size if basis_stat is not None else 0
        if basis_size != header.basis_length:
            raise DeltaError(
                f"wrong basis: it has {basis_size} bytes but the delta was made against "
                f"{header.basis_length} bytes"
            )
        if header.basis_length == 0 and header.basis_hash != EMPTY_HASH:
            raise DeltaError("delta header is corrupted (empty basis with a non-empty hash)")
        in_place = basis_stat is not None and _same_file(basis_stat, out_path)
        rebuild = _Rebuild(header, basis_fd, tmp_path)
        if not in_place:  # in place, the output is opened once it differs from the basis
            rebuild.open_output()
        stats = DeltaStats()
        end: End | None = None
        for token in reader.tokens():
            if isinstance(token, Copy):
                stats.matched_bytes += rebuild.copy(token)
            elif isinstance(token, Literal):
                stats.literal_bytes += rebuild.literal(token)
            else:
                end = token
        assert end is not None  # the reader raises on a stream without END
        if not end.length == header.new_length == rebuild.written:
            raise DeltaError(
                f"rebuilt file has {rebuild.written} bytes but the delta promised {end.length}"
            )
        if rebuild.digest() != end.digest:
            # The result's hash is the proof; the basis is hashed only now, to say whether it
            # was the wrong one (not a pass over it on every patch)
            if (verify_basis and rebuild.mm is not None
                    and hash_mapped(rebuild.mm).digest() != header.basis_hash):
                raise DeltaError(
                    "wrong basis: its contents differ from the file the delta was made against"
                )
            raise DeltaError("rebuilt file does not match the delta's checksum")
        stats.wire_bytes = reader.wire_bytes
        stats.new_size = rebuild.written
        if in_place and rebuild.identity() and rebuild.out_fd < 0:
            return stats  # out_path already is the verified result
        out_fd = rebuild.open_output()
        if fsync:
            os.fsync(out_fd)
        _copy_mode(out_path, out_fd)
        os.replace(tmp_path, out_path)
        return stats
    except BaseException:
        if rebuild is not None and rebuild.out_fd >= 0 and os.path.lexists(tmp_path):
            os.unlink(tmp_path)
        raise
    finally:
        if rebuild is not None:
            rebuild.close()
        if basis_fd is not None:
            os.close(basis_fd)


def _preallocate(fd: int, length: int) -> None:
    """Reserve the result's blocks up front: the filesystem lays it out in one go, and ext4
    then has no delayed allocation to force (synchronously) when the file is renamed over
    the old one.  Best effort, like rsync's --preallocate; a length beyond the free space
    (a corrupted header, or a disk too small) is left for the writes to run into.
    """
    if length <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        st = os.fstatvfs(fd)
        if length > st.f_bavail * st.f_frsize:
            return
        os.posix_fallocate(fd, 0, length)
    except OSError:
        pass


def _same_file(basis_stat: os.stat_result, out_path: str) -> bool:
    try:
        return os.path.samestat(basis_stat, os.stat(out_path))
    except FileNotFoundError:
        return False


def _copy_mode(out_path: str, out_fd: int) -> None:
    """Keep the permissions of the file being replaced (new files get 0666 & ~umask)."""
    try:
        mode = os.stat(out_path).st_mode & 0o7777
    except FileNotFoundError:
        return
    os.fchmod(out_fd, mode)
