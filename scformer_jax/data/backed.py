"""Expression matrices on disk: CSR arrays of an ``.h5ad`` file read in pieces.

:class:`BackedCSR` reads the ``X`` group of an ``.h5ad`` file (CSR, as anndata writes it) with
h5py: ``indptr`` is held in memory (8 bytes per cell), the values and column indices stay on
disk and are read one row range at a time. Random rows (a training batch) go through a
bounded least-recently-used cache of rows, so control cells drawn again and again are read
once. Whole-matrix passes (means, DE statistics) use :meth:`BackedCSR.row_chunks`.

:class:`CSRWriter` appends rows to the ``X`` group of an ``.h5ad`` file, so a matrix larger
than memory is written chunk by chunk.
"""

from __future__ import annotations

import collections
import os
import threading
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
from scipy import sparse

from scformer_jax.data.conditions import DataFormatError

# Values per HDF5 chunk of the data/indices arrays a CSRWriter creates: small enough that
# reading one cell's row touches one or two chunks, large enough for fast sequential passes.
WRITE_CHUNK = 1 << 16
DEFAULT_CACHE_BYTES = 512 << 20


def x_nbytes(path: str | os.PathLike) -> int:
    """Bytes ``X`` of an ``.h5ad`` file takes in memory as CSR float32 (or dense)."""
    with h5py.File(path, "r") as f:
        if "X" not in f:
            return 0
        X = f["X"]
        if isinstance(X, h5py.Dataset):
            return int(np.prod(X.shape)) * 4
        nnz = int(X["data"].shape[0])
        return nnz * 8 + (int(X["indptr"].shape[0]) * 8)


class BackedCSR:
    """A CSR matrix in an ``.h5ad`` file, read row ranges at a time.

    Args:
      path: the ``.h5ad`` file.
      key: the group holding the matrix (``"X"``).
      cache_bytes: most bytes of rows kept in the row cache.

    Attributes:
      shape: (n_cells, n_genes).
      nnz: stored values.
      indptr: int64 (n_cells + 1,) in memory.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        key: str = "X",
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        self.path = Path(path)
        self._file = h5py.File(self.path, "r")
        if key not in self._file:
            raise DataFormatError(f"{str(self.path)!r} has no {key!r} matrix.")
        group = self._file[key]
        encoding = group.attrs.get("encoding-type", "")
        if isinstance(encoding, bytes):
            encoding = encoding.decode()
        if not isinstance(group, h5py.Group) or encoding != "csr_matrix":
            raise DataFormatError(
                f"{key} of {str(self.path)!r} is stored as {encoding or 'a dense array'}, not "
                "CSR, so it cannot be read row by row from disk. Rewrite it as CSR, e.g. "
                "adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(path), or load it "
                "in memory (data.backed false)."
            )
        self.shape = tuple(int(s) for s in group.attrs["shape"])
        self._data = group["data"]
        self._indices = group["indices"]
        self.indptr = np.asarray(group["indptr"][()], dtype=np.int64)
        self.nnz = int(self.indptr[-1])
        self.dtype = np.dtype(np.float32)
        self.cache_bytes = int(cache_bytes)
        self._cache: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = (
            collections.OrderedDict()
        )
        self._cached_bytes = 0
        self._lock = threading.RLock()  # the row cache and the file: a loader thread reads too
        self.rows_read = 0  # rows read from disk (cache misses), for benchmarks

    @property
    def file(self) -> h5py.File:
        """The open file (read-only)."""
        return self._file

    def close(self) -> None:
        self._file.close()

    def __getstate__(self):
        raise TypeError("BackedCSR holds an open file; reopen it from its path instead.")

    def _read_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        with self._lock:  # h5py serialises access anyway; keep readers of one file ordered
            data = np.asarray(self._data[lo:hi], dtype=np.float32)
            indices = np.asarray(self._indices[lo:hi], dtype=np.int32)
        return data, indices

    def row_range(self, start: int, stop: int) -> sparse.csr_matrix:
        """CSR float32 (stop - start, n_genes): rows [start, stop) read in one piece."""
        data, indices = self._read_range(start, stop)
        indptr = self.indptr[start : stop + 1] - self.indptr[start]
        return sparse.csr_matrix((data, indices, indptr), shape=(stop - start, self.shape[1]))

    def row_chunks(self, chunk_rows: int = 8192) -> Iterator[tuple[int, sparse.csr_matrix]]:
        """Yields (start, CSR rows [start, start + chunk_rows)) over the whole matrix."""
        for start in range(0, self.shape[0], chunk_rows):
            yield start, self.row_range(start, min(start + chunk_rows, self.shape[0]))

    def _row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            hit = self._cache.get(i)
            if hit is not None:
                self._cache.move_to_end(i)
                return hit
            row = self._read_range(i, i + 1)
            self.rows_read += 1
            size = row[0].nbytes + row[1].nbytes
            if size <= self.cache_bytes:
                self._cache[i] = row
                self._cached_bytes += size
                while self._cached_bytes > self.cache_bytes:
                    _, (d, j) = self._cache.popitem(last=False)
                    self._cached_bytes -= d.nbytes + j.nbytes
            return row

    def rows(self, rows: np.ndarray) -> sparse.csr_matrix:
        """CSR float32 (len(rows), n_genes): the given rows in the given order.

        The same arrays as ``in_memory_csr[rows]``. Sorted rows that cover most of their
        span are read as one range; others one by one through the row cache.
        """
        rows = np.asarray(rows, dtype=np.int64)
        n_genes = self.shape[1]
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row index out of range [0, {self.shape[0]}).")
        if len(rows) > 1 and np.all(np.diff(rows) > 0):
            span = int(rows[-1] - rows[0] + 1)
            if span <= 2 * len(rows):
                return self.row_range(int(rows[0]), int(rows[-1]) + 1)[rows - rows[0]]
        pieces = [self._row(i) for i in rows.tolist()]
        lengths = np.array([len(d) for d, _ in pieces], np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        data = np.concatenate([d for d, _ in pieces]) if pieces else np.zeros(0, np.float32)
        indices = np.concatenate([j for _, j in pieces]) if pieces else np.zeros(0, np.int32)
        return sparse.csr_matrix((data, indices, indptr), shape=(len(rows), n_genes))

    def dense_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), n_genes): the given rows, densified (any order, repeats ok)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros((len(rows), self.shape[1]), np.float32)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row index out of range [0, {self.shape[0]}).")
        for k, i in enumerate(rows.tolist()):
            data, indices = self._row(i)
            out[k, indices] = data
        return out

    def __repr__(self) -> str:
        return f"BackedCSR({str(self.path)!r}, shape={self.shape}, nnz={self.nnz})"


class CSRWriter:
    """Appends CSR rows to the ``X`` group of an open, writable ``.h5ad`` (h5py) file.

    Args:
      file: an h5py File opened for writing (without an ``X`` yet).
      n_genes: columns.
      key: the group to write.
      compress: store data and indices gzip-compressed (level 1, byte shuffle first), for a
        file that is read front to back: raw UMI counts take about a fifth of the space, but
        every row read at random decompresses a whole HDF5 chunk.

    Call :meth:`append` with row blocks, then :meth:`close` to write ``indptr`` and the
    anndata encoding attributes.
    """

    def __init__(self, file: h5py.File, n_genes: int, key: str = "X", *, compress: bool = False):
        self.group = file.create_group(key)
        self.n_genes = int(n_genes)
        opts = dict(chunks=(WRITE_CHUNK,), maxshape=(None,))
        if compress:
            opts.update(compression="gzip", compression_opts=1, shuffle=True)
        self._data = self.group.create_dataset("data", shape=(0,), dtype=np.float32, **opts)
        self._indices = self.group.create_dataset("indices", shape=(0,), dtype=np.int32, **opts)
        self._lengths: list[np.ndarray] = []
        self.nnz = 0

    def append(self, data: np.ndarray, indices: np.ndarray, row_lengths: np.ndarray) -> None:
        """Appends rows given as CSR pieces (values, column indices, stored values per row)."""
        n = len(data)
        if n != len(indices) or n != int(np.sum(row_lengths)):
            raise ValueError("data, indices and row_lengths disagree.")
        if n:
            for dataset, values in ((self._data, data), (self._indices, indices)):
                dataset.resize((self.nnz + n,))
                dataset[self.nnz :] = values
        self.nnz += n
        self._lengths.append(np.asarray(row_lengths, np.int64))

    def close(self) -> int:
        """Writes indptr and the encoding attributes; returns the number of rows."""
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.group.create_dataset("indptr", data=indptr)
        self.group.attrs["encoding-type"] = "csr_matrix"
        self.group.attrs["encoding-version"] = "0.1.0"
        self.group.attrs["shape"] = np.array([len(lengths), self.n_genes], np.int64)
        return len(lengths)


def write_metadata(path: str | os.PathLike, adata) -> None:
    """Completes an ``.h5ad`` whose ``X`` was written by :class:`CSRWriter`: the AnnData
    encoding attributes, `adata`'s ``obs``, ``var`` and ``uns``, and empty ``obsm``,
    ``varm``, ``obsp``, ``varp`` and ``layers``, so that ``anndata.read_h5ad`` reads it."""
    from anndata.io import write_elem

    with h5py.File(path, "a") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "obs", adata.obs)
        write_elem(f, "var", adata.var)
        write_elem(f, "uns", dict(adata.uns))
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, key, {})
