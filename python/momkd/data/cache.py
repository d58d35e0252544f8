"""A cohort cache: bags kept in host RAM or GPU memory after they were first read.

On a GPU the model step takes milliseconds, so after the first epoch the loader would decide the
epoch time. A :class:`BagCache` keeps every bag a :class:`~momkd.data.loader.BagLoader` reads, whole
(all patches, float16 features of a float16 store, coordinates and k-NN graphs), and serves it from
memory in later epochs. Patch subsampling (``max_patches``) and per-epoch shuffling are applied when
a bag is *served*, with the same rows and order as a read from the store, so a cached epoch yields
exactly the bags an uncached one does.

Where the cache lives (``data.cache``):

* ``none``   — no cache (flat memory: one bag at a time plus the prefetch queue);
* ``host``   — host RAM;
* ``device`` — GPU memory (features and graphs on the device, coordinates on the host);
* ``auto``   — ``device`` when the cohort fits in :data:`DEVICE_FRACTION` of the free GPU memory,
  else ``host`` when it fits in :data:`HOST_FRACTION` of the available RAM, else ``none``; the
  choice is logged.

``data.cache_gb`` caps the cache; bags that would exceed the cap (or the safe fraction of free
memory) are read from the store every epoch. Under data parallelism every rank caches the bags it
reads (its shard of each epoch): up to the whole cohort per rank over several epochs. Processes on
one machine split the safe fraction between them: the host budget of each is
:data:`HOST_FRACTION` / :func:`host_processes` of the available RAM (``LOCAL_WORLD_SIZE`` ranks
under ``torchrun``, the concurrent fold processes of ``--fold-parallel``), and processes sharing one
GPU split its :data:`DEVICE_FRACTION` likewise (:func:`device_processes`).

The training processes of one job on one machine (the ranks ``torchrun`` starts there, the fold
processes of ``--fold-parallel``) share a ``host`` cache (:class:`SharedHostCache`): a bag is
written once, by the first process that reads it, to a folder on the RAM-backed ``/dev/shm``, and
the others map that file instead of reading the store; so the machine holds each bag once, not once
per process. Each process removes the files it wrote when it exits normally; folders left by a job
whose processes were killed are removed by the next job of the same user on this host once the
job's parent process is gone. Without a usable ``/dev/shm`` each process keeps its own cache
(logged).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from momkd import _core
from momkd.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from momkd.data.store import CohortStore

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_KINDS",
    "DEVICE_FRACTION",
    "HOST_FRACTION",
    "BagCache",
    "CachedBag",
    "SharedHostCache",
    "choose_cache",
    "cohort_bytes",
    "device_processes",
    "free_device_bytes",
    "free_host_bytes",
    "host_processes",
    "serve_bag",
    "shared_cache",
]

CACHE_KINDS = ("none", "host", "device", "auto")
#: Share of the free GPU memory the device cache may take (the model and activations need the rest).
DEVICE_FRACTION = 0.5
#: Share of the available host RAM the host cache may take.
HOST_FRACTION = 0.5
#: Where the processes of one job on one machine keep a shared host cache (a RAM-backed tmpfs).
SHARED_ROOT = Path("/dev/shm")
#: Free space a shared host cache leaves on :data:`SHARED_ROOT` (bytes).
SHARED_RESERVE = 256 * 2**20


@dataclass
class CachedBag:
    """One whole bag held by a :class:`BagCache`.

    Attributes
    ----------
    features : torch.Tensor, (P, D), float16 (float32 for a float32 store), host or device
    coords : torch.Tensor, (P, 2), int64, host
    edges : dict
        ``k`` -> k-NN graph ``(2, E)`` int64 of the whole bag (on the features' device).
    """

    features: torch.Tensor
    coords: torch.Tensor
    edges: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes held (features, coordinates and graphs)."""
        total = self.features.numel() * self.features.element_size()
        total += self.coords.numel() * self.coords.element_size()
        return total + sum(e.numel() * e.element_size() for e in self.edges.values())


def cohort_bytes(store: CohortStore, knn_k: int | None = 8) -> int:
    """Bytes a cache of every bag of ``store`` takes (features in the store's type, int64 coords,
    one k-NN graph of ``knn_k`` neighbours)."""
    itemsize = np.dtype(store.dtype).itemsize
    per_patch = store.feature_dim * itemsize + 2 * 8 + (2 * 8 * knn_k if knn_k else 0)
    return int(store.n_patches) * per_patch


def free_host_bytes() -> int:
    """Available host RAM in bytes (``MemAvailable``; 0 when it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def free_device_bytes(device: torch.device | str | None) -> int:
    """Free memory of a CUDA ``device`` in bytes (0 for a non-CUDA device or without CUDA)."""
    import torch

    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return 0
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def _env_count(*names: str) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                count = int(value)
            except ValueError:
                count = 0
            if count < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            return count
    return 1


def host_processes() -> int:
    """Training processes on this machine that share its RAM: ``MOMKD_HOST_PROCESSES`` (set by
    ``--fold-parallel``), else ``LOCAL_WORLD_SIZE`` (set by ``torchrun``), else 1."""
    return _env_count("MOMKD_HOST_PROCESSES", "LOCAL_WORLD_SIZE")


def device_processes() -> int:
    """Training processes sharing this process's GPU: ``MOMKD_DEVICE_PROCESSES`` (set by
    ``--fold-parallel`` when folds outnumber GPUs), else 1 (``torchrun`` gives each rank its own)."""
    return _env_count("MOMKD_DEVICE_PROCESSES")


def choose_cache(
    kind: str,
    need_bytes: int,
    *,
    device: torch.device | str | None,
    cache_gb: float | None = None,
    host_share: int | None = None,
    device_share: int | None = None,
) -> tuple[str, int]:
    """Resolve ``kind`` (``none | host | device | auto``) to a cache location and a byte budget.

    Parameters
    ----------
    kind : str
    need_bytes : int
        What caching the whole cohort takes (:func:`cohort_bytes`).
    device : torch.device or str, optional
        The training device (``device`` needs a CUDA device).
    cache_gb : float, optional
        Upper limit in GB (1e9 bytes).
    host_share, device_share : int, optional
        Processes sharing the host RAM / the GPU (default :func:`host_processes`,
        :func:`device_processes`): each gets that part of the safe fraction.

    Returns
    -------
    (str, int)
        ``"none" | "host" | "device"`` and the budget in bytes.

    Raises
    ------
    ConfigError
        Unknown ``kind``, or ``device`` without a CUDA device.
    """
    if kind not in CACHE_KINDS:
        raise ConfigError(f"data.cache must be one of {CACHE_KINDS}, got {kind!r}")
    if cache_gb is not None and cache_gb <= 0:
        raise ConfigError(f"data.cache_gb must be > 0 or null, got {cache_gb!r}")
    cap = None if cache_gb is None else int(cache_gb * 1e9)
    host_n = host_processes() if host_share is None else max(1, int(host_share))
    dev_n = device_processes() if device_share is None else max(1, int(device_share))
    host_fraction = HOST_FRACTION / host_n
    device_fraction = DEVICE_FRACTION / dev_n

    def budget(free: int, fraction: float) -> int:
        room = int(free * fraction)
        return room if cap is None else min(room, cap)

    def share(fraction: float, n: int, of: str) -> str:
        per = "" if n == 1 else f" / {n} processes"
        return f"{fraction * n * 100:.0f}% of {of}{per}"

    if kind == "none":
        return "none", 0
    if kind == "device":
        free = free_device_bytes(device)
        if free <= 0:
            raise ConfigError(f"data.cache: device needs a CUDA training device, got {device}")
        return "device", budget(free, device_fraction)
    if kind == "host":
        return "host", budget(free_host_bytes(), host_fraction)
    gb = need_bytes / 1e9
    dev_budget = budget(free_device_bytes(device), device_fraction)
    host_budget = budget(free_host_bytes(), host_fraction)
    for where, room, fraction, n, of in (
        ("device", dev_budget, device_fraction, dev_n, "free GPU memory"),
        ("host", host_budget, host_fraction, host_n, "available RAM"),
    ):
        if need_bytes <= room:
            logger.info(
                "data.cache auto: %s (cohort %.2f GB <= %.2f GB, %s%s)",
                where,
                gb,
                room / 1e9,
                share(fraction, n, of),
                "" if cap is None else f", cache_gb {cache_gb}",
            )
            return where, room
    logger.info(
        "data.cache auto: none (cohort %.2f GB fits neither %.2f GB of GPU nor %.2f GB of host "
        "memory%s)",
        gb,
        dev_budget / 1e9,
        host_budget / 1e9,
        "" if host_n == 1 else f"; {host_n} processes share this machine",
    )
    return "none", 0


class BagCache:
    """Whole bags of one store, kept in host or GPU memory, up to a byte budget.

    Parameters
    ----------
    store : CohortStore
    kind : {"host", "device"}
    budget_bytes : int
        Bags beyond this are not kept (they are read from the store every time).
    device : torch.device or str, optional
        Where a ``device`` cache lives.

    Notes
    -----
    Features are kept in the store's type (float16 for a float16 store), so serving a bag as
    float32 gives exactly the values of a float32 read. Thread-safe.
    """

    def __init__(
        self,
        store: CohortStore,
        kind: str,
        budget_bytes: int,
        device: torch.device | str | None = None,
    ) -> None:
        import torch

        if kind not in ("host", "device"):
            raise ConfigError(f"BagCache: kind must be 'host' or 'device', got {kind!r}")
        self.store_path = store.path
        self.kind = kind
        self.budget_bytes = int(budget_bytes)
        if kind == "device":
            self.device = torch.device("cuda" if device is None else device)
        else:
            self.device = torch.device("cpu")
        self.dtype = str(store.dtype)
        self._bags: dict[int, CachedBag] = {}
        self._nbytes = 0
        self._full_logged = False
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._bags)

    def __contains__(self, index: object) -> bool:
        return index in self._bags

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self._nbytes

    def __repr__(self) -> str:
        return (
            f"BagCache({self.kind}, bags={len(self)}, {self._nbytes / 1e9:.2f} of "
            f"{self.budget_bytes / 1e9:.2f} GB)"
        )

    def put(
        self,
        index: int,
        features: np.ndarray,
        coords: np.ndarray,
        edges: np.ndarray | None,
        k: int | None,
    ) -> bool:
        """Keep the whole bag ``index`` (features in the store's type); False when over budget."""
        import torch

        if index in self._bags:
            return True
        size = features.shape[0] * features.shape[1] * np.dtype(self.dtype).itemsize
        size += coords.nbytes + (0 if edges is None else edges.nbytes)
        with self._lock:
            if self._nbytes + size > self.budget_bytes:
                if not self._full_logged:
                    logger.info(
                        "%s cache of %s is full (%d bags, %.2f GB): further bags are read from "
                        "the store",
                        self.kind,
                        self.store_path,
                        len(self._bags),
                        self._nbytes / 1e9,
                    )
                    self._full_logged = True
                return False
            self._nbytes += size
        entry = CachedBag(
            features=torch.from_numpy(np.ascontiguousarray(features, dtype=self.dtype)).to(
                self.device
            ),
            coords=torch.from_numpy(np.ascontiguousarray(coords, dtype=np.int64)),
        )
        if edges is not None and k is not None:
            entry.edges[int(k)] = torch.from_numpy(np.ascontiguousarray(edges)).to(self.device)
        with self._lock:
            self._bags[index] = entry
        return True

    def get(self, index: int) -> CachedBag | None:
        """The cached bag ``index``, or None."""
        return self._bags.get(index)

    def serve(
        self,
        index: int,
        *,
        max_patches: int | None,
        seed: int,
        epoch: int,
        knn_k: int | None,
        dtype: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Bag ``index`` as a read with these settings returns it: ``(features, coords, edges)``.

        The rows kept by ``max_patches`` are those of :func:`momkd._core.bag_rows` (the store
        reader's), and the k-NN graph is built on the kept coordinates, as the loader does.
        """
        return self.serve_entry(
            index,
            lambda entry, i: serve_bag(
                entry, i, max_patches=max_patches, seed=seed, epoch=epoch, knn_k=knn_k, dtype=dtype
            ),
        )

    def serve_entry(
        self, index: int, serve: Callable[[CachedBag, int], tuple[Any, Any, Any]]
    ) -> tuple[Any, Any, Any]:
        """``serve(entry, index)`` on the cached bag ``index``, counting any graph it adds."""
        entry = self._bags[index]
        known = set(entry.edges)
        out = serve(entry, index)
        with self._lock:
            for k in set(entry.edges) - known:  # a graph built for a new k is kept
                self._nbytes += entry.edges[k].numel() * 8
        return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _short_hash(*parts: object) -> str:
    return hashlib.sha1("\0".join(str(p) for p in parts).encode()).hexdigest()[:12]


def _shared_prefix() -> str:
    """This user's shared-cache folders on this host (container hostnames differ, so folders of
    other containers sharing ``/dev/shm`` are never taken for this host's)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0  # no user ids on Windows (no /dev/shm either)
    return f"momkd-cache-{uid}-{_short_hash(socket.gethostname())}-"


def _process_start(pid: int) -> str:
    """Start time of process ``pid`` (Linux ``/proc``; empty elsewhere): with the pid, it names one
    process even when pids are reused."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _store_fingerprint(store_path: str | os.PathLike[str]) -> str:
    """The store's path and its header file's identity: a store rebuilt at the same path gets
    another folder."""
    path = os.path.realpath(os.fspath(store_path))
    try:
        st = os.stat(os.path.join(path, "zarr.json"))
        ident: tuple[object, ...] = (st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        ident = ()
    return _short_hash(path, *ident)


def shared_cache_dir(store_path: str | os.PathLike[str], root: Path | None = None) -> Path:
    """The folder where the processes of this job on this machine share the host cache of a store:
    named after the user and host, the job's parent process (``torchrun``'s agent, the
    ``--fold-parallel`` parent: its pid, start time and ``TORCHELASTIC_RUN_ID``) and the store (its
    path and header file)."""
    ppid = os.getppid()
    job = _short_hash(_process_start(ppid), os.environ.get("TORCHELASTIC_RUN_ID", ""))
    base = SHARED_ROOT if root is None else root
    return base / f"{_shared_prefix()}p{ppid}-{job}-{_store_fingerprint(store_path)}"


def remove_stale_shared_caches(root: Path | None = None) -> list[Path]:
    """Remove this user's shared-cache folders whose job's parent process is gone (a crashed job);
    the removed folders."""
    base = SHARED_ROOT if root is None else root
    removed: list[Path] = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    for path in entries:
        name = path.name
        if not name.startswith(_shared_prefix() + "p"):
            continue
        try:
            pid = int(name[len(_shared_prefix()) + 1 :].split("-", 1)[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _remove_written(paths: list[Path], directory: Path, remove_folder: bool = True) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()
    if remove_folder:
        with contextlib.suppress(OSError):
            directory.rmdir()  # only once every process's files are gone


class SharedHostCache(BagCache):
    """A host cache shared by the training processes of one job on this machine.

    A bag is written once, by the first process that claims it (an exclusively created
    ``<index>.claim`` file), as two raw files (features in the store's type, int64 coordinates) in
    ``directory`` on a RAM-backed tmpfs; every process maps them copy-on-write
    (``torch.from_file``, which keeps no file descriptor open), so the machine holds each bag once.
    A file is only mapped when its size is exactly the bag's (rows from the store's offsets). Graphs
    are built and kept per process (they are small). This process's ``budget_bytes`` limits what it
    writes; a write also leaves :data:`SHARED_RESERVE` free on the tmpfs. The files a process wrote
    are removed when it exits normally (or :meth:`close`); mapped bags stay valid in the other
    processes after that, and bags whose files are gone are read from the store again. Files of a
    process killed by a signal stay until the job ends; the user's next job removes the folders of
    jobs whose parent process is gone.
    """

    def __init__(self, store: CohortStore, budget_bytes: int, directory: Path) -> None:
        super().__init__(store, "host", budget_bytes)
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.written = 0
        self.mapped = 0
        self._rows = store.bag_sizes
        self._dim = int(store.feature_dim)
        self._written: list[Path] = []
        self._finalizer = weakref.finalize(self, _remove_written, self._written, self.directory)

    def __repr__(self) -> str:
        return (
            f"SharedHostCache({self.directory}, bags={len(self)}, wrote {self.written}, "
            f"mapped {self.mapped}, {self._nbytes / 1e9:.2f} of {self.budget_bytes / 1e9:.2f} GB)"
        )

    def _paths(self, index: int) -> tuple[Path, Path]:
        return (
            self.directory / f"{int(index)}.features",
            self.directory / f"{int(index)}.coords",
        )

    def _map(self, index: int) -> bool:
        """Map bag ``index`` written by any process of the job; False when it is not there (or not
        whole)."""
        import torch

        if not 0 <= index < len(self._rows):
            return False
        n = int(self._rows[index])
        feats_path, coords_path = self._paths(index)
        want = ((feats_path, n * self._dim, self.dtype), (coords_path, n * 2, "int64"))
        tensors = []
        for path, count, dtype in want:
            try:
                if path.stat().st_size != count * np.dtype(dtype).itemsize:
                    return False
                tensors.append(
                    torch.from_file(
                        str(path), shared=False, size=count, dtype=getattr(torch, dtype)
                    )
                )
            except (OSError, RuntimeError):
                return False
        entry = CachedBag(features=tensors[0].view(n, self._dim), coords=tensors[1].view(n, 2))
        with self._lock:
            if index not in self._bags:
                self._bags[index] = entry
                self.mapped += 1
        return True

    def __contains__(self, index: object) -> bool:
        if index in self._bags:
            return True
        if not isinstance(index, (int, np.integer)):
            return False
        return self._map(int(index))

    def _claim(self, index: int) -> Path | None:
        """Create the claim file of bag ``index``; None when another process holds it (or the
        folder cannot be written)."""
        claim = self.directory / f"{int(index)}.claim"
        for _attempt in range(2):
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                return claim
            except FileExistsError:
                return None
            except FileNotFoundError:  # the last other process out removed the empty folder
                try:
                    self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                except OSError:
                    return None
            except OSError:
                return None
        return None

    def put(
        self,
        index: int,
        features: np.ndarray,
        coords: np.ndarray,
        edges: np.ndarray | None,
        k: int | None,
    ) -> bool:
        """Write the whole bag ``index`` for every process of the job (unless one already has) and
        map it; False when this process's budget or the tmpfs has no room for it."""
        if index in self._bags or self._map(index):
            self._keep_graph(index, edges, k)
            return True
        feats = np.ascontiguousarray(features, dtype=self.dtype)
        coords64 = np.ascontiguousarray(coords, dtype=np.int64)
        size = feats.nbytes + coords64.nbytes
        with self._lock:
            room = self._nbytes + size <= self.budget_bytes
            if room:
                try:
                    room = shutil.disk_usage(self.directory).free >= size + SHARED_RESERVE
                except OSError:
                    room = False
            if not room:
                if not self._full_logged:
                    logger.info(
                        "shared host cache %s: no room for more bags from this process (%d "
                        "written, %.2f GB): further bags are read from the store",
                        self.directory,
                        self.written,
                        self._nbytes / 1e9,
                    )
                    self._full_logged = True
                return False
            self._nbytes += size
        # One writer per bag: the process that creates the claim file writes the bag; another that
        # read the same bag meanwhile serves its own read and maps the files later.
        claim = self._claim(index)
        if claim is None:
            with self._lock:
                self._nbytes -= size
            if not self._map(index):
                return False
            self._keep_graph(index, edges, k)
            return True
        done: list[Path] = []
        feats_path, coords_path = self._paths(index)
        try:
            for path, array in ((coords_path, coords64), (feats_path, feats)):  # features last
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                done.append(tmp)
                with open(tmp, "wb") as fh:
                    fh.write(array.data.cast("B"))
                os.replace(tmp, path)
                done[-1] = path
            ok = self._map(index)
        except OSError as exc:
            logger.info("shared host cache %s: cannot write bag %d: %s", self.directory, index, exc)
            ok = False
        if not ok:  # leave nothing behind, so that another process may cache the bag
            _remove_written([*done, claim], self.directory, remove_folder=False)
            with self._lock:
                self._nbytes -= size
            return False
        self._written.extend([claim, *done])
        self.written += 1
        self._keep_graph(index, edges, k)
        return True

    def _keep_graph(self, index: int, edges: np.ndarray | None, k: int | None) -> None:
        """Keep the whole bag's graph in this process (counted in its budget)."""
        import torch

        entry = self._bags.get(index)
        if entry is None or edges is None or k is None or int(k) in entry.edges:
            return
        entry.edges[int(k)] = torch.from_numpy(np.ascontiguousarray(edges))
        with self._lock:
            self._nbytes += edges.nbytes

    def close(self) -> None:
        """Remove the files this process wrote (bags already mapped stay usable)."""
        self._finalizer()


def serve_bag(
    entry: CachedBag,
    index: int,
    *,
    max_patches: int | None,
    seed: int,
    epoch: int,
    knn_k: int | None,
    dtype: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A whole bag as a store read of slide ``index`` with these settings returns it.

    The rows kept by ``max_patches`` are those of :func:`momkd._core.bag_rows` (the store reader's),
    and the k-NN graph is built on the kept coordinates, as the loader builds it. A graph of the
    whole bag is added to ``entry.edges`` when missing.

    Returns
    -------
    (features, coords, edges)
        ``dtype`` features on the entry's device, int64 coords on the host, int64 edges (or None
        without ``knn_k``) on the entry's device.
    """
    import torch

    device = entry.features.device
    n = int(entry.features.shape[0])
    rows = _core.bag_rows(n, max_patches, seed, epoch, index)
    edges = None
    if rows is None:
        feats, coords = entry.features, entry.coords
        if knn_k is not None:
            edges = entry.edges.get(int(knn_k))
            if edges is None:
                edges = torch.from_numpy(_core.knn_graph(coords.numpy(), int(knn_k))).to(device)
                entry.edges[int(knn_k)] = edges
    else:
        picked = torch.from_numpy(rows)
        coords = entry.coords[picked]
        feats = entry.features.index_select(0, picked.to(device))
        if knn_k is not None:
            edges = torch.from_numpy(_core.knn_graph(coords.numpy(), int(knn_k))).to(device)
    want = getattr(torch, dtype)
    if feats.dtype != want:
        feats = feats.to(want)
    return feats, coords, edges


# One cache per (store object, kind): freed when the store object is.
_SHARED: weakref.WeakKeyDictionary[Any, dict[str, BagCache | None]] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def shared_cache(
    store: CohortStore,
    kind: str,
    *,
    device: torch.device | str | None = None,
    cache_gb: float | None = None,
    knn_k: int | None = 8,
) -> BagCache | None:
    """The process-wide cache of ``store`` for ``data.cache = kind`` (None for ``none``).

    ``auto`` is resolved once per store (:func:`choose_cache`, logged). Every loader given the same
    store object shares the cache, so the training, validation and test loaders of all folds fill
    and use one cache; it is freed with the store object.
    """
    if kind not in CACHE_KINDS:
        raise ConfigError(f"data.cache must be one of {CACHE_KINDS}, got {kind!r}")
    if kind == "none":
        return None
    with _SHARED_LOCK:
        per_store = _SHARED.setdefault(store, {})
        if kind in per_store:
            return per_store[kind]
        where, budget = choose_cache(
            kind, cohort_bytes(store, knn_k), device=device, cache_gb=cache_gb
        )
        cache: BagCache | None = None
        if where == "host" and host_processes() > 1:
            cache = _shared_host_cache(store, budget)
        if cache is None and where != "none":
            cache = BagCache(store, where, budget, device=device)
        if cache is not None:
            logger.info(
                "%s cache for %s: up to %.2f GB", where, store.path, cache.budget_bytes / 1e9
            )
        per_store[kind] = cache
        return cache


def _shared_host_cache(store: CohortStore, budget: int) -> SharedHostCache | None:
    """The job's shared host cache of ``store``, or None (logged) when ``/dev/shm`` is unusable."""
    if not SHARED_ROOT.is_dir():
        logger.info(
            "host cache not shared between the %d processes on this machine (no %s); each "
            "process keeps its own",
            host_processes(),
            SHARED_ROOT,
        )
        return None
    remove_stale_shared_caches()
    directory = shared_cache_dir(store.path)
    try:
        if shutil.disk_usage(SHARED_ROOT).free < SHARED_RESERVE:
            raise OSError(f"less than {SHARED_RESERVE // 2**20} MiB free")
        cache = SharedHostCache(store, budget, directory)
    except OSError as exc:
        logger.info(
            "host cache not shared between the %d processes on this machine (%s: %s); each "
            "process keeps its own",
            host_processes(),
            SHARED_ROOT,
            exc,
        )
        return None
    logger.info(
        "host cache shared by the %d processes of this job on this machine: %s",
        host_processes(),
        directory,
    )
    return cache
