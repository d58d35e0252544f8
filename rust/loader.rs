//! The prefetching bag loader.
//!
//! A [`Prefetcher`] walks a list of slide indices in order. It keeps up to `prefetch` bags in
//! flight on its own rayon pool (never the global one); each job reads a bag (chunks decoded in
//! parallel on the same pool), builds the k-NN graph and sends the result through its own channel.
//! The consumer receives results strictly in the order of the index list. Dropping the prefetcher
//! sets a cancel flag so queued jobs return at once, and drops the pool, whose threads then exit.
//!
//! Reading ahead is separate from decoding: [`ReadAhead::threads`] I/O threads ask the kernel
//! (`posix_fadvise(WILLNEED)`) to read the chunk files of the next [`ReadAhead::bags`] bags beyond
//! the ones being decoded, file by file from one shared queue. On Linux that call returns only once
//! its reads are issued, which on a cold page cache takes about as long as the read itself; several
//! I/O threads therefore keep several reads in flight whatever the number of decoding threads, and
//! the decoding threads find their chunks in memory.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{catch_panics, Error, Result};
use crate::knn::{knn_edges, pairs_from_i64};
use crate::store::{CohortStore, FeatureBuf, FileRange, OutDtype};

/// A bag ready for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Bag {
    /// Slide index in the store.
    pub index: usize,
    /// Number of rows `P`.
    pub n_rows: usize,
    /// Feature dimension `D`.
    pub dim: usize,
    /// `(P, D)` float32 or float16, row-major.
    pub features: FeatureBuf,
    /// `(P, 2)` int64.
    pub coords: Vec<i64>,
    /// `(2, E)` int64 (sources then neighbours), when a k-NN graph was requested.
    pub edges: Option<Vec<i64>>,
}

/// What to do with each bag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Subsample bags larger than this (without replacement, storage order).
    pub max_patches: Option<usize>,
    /// Subsampling seed.
    pub seed: u64,
    /// Subsampling epoch.
    pub epoch: u64,
    /// Neighbours per patch of the k-NN graph; `None`: no graph.
    pub knn_k: Option<usize>,
    /// Data type the features are handed over in.
    pub dtype: OutDtype,
}

/// How far, and with how many I/O threads, a [`Prefetcher`] reads ahead of its decoding threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAhead {
    /// Bags beyond the ones submitted for decoding whose chunk files are requested (`0`: off).
    pub bags: usize,
    /// I/O threads issuing the requests (reads in flight at once).
    pub threads: usize,
}

impl ReadAhead {
    /// No reading ahead.
    pub const OFF: ReadAhead = ReadAhead {
        bags: 0,
        threads: 0,
    };
}

/// Build a rayon pool of `num_threads` named worker threads.
///
/// # Errors
/// [`Error::Config`] for zero threads, [`Error::Internal`] when the threads cannot be started.
pub fn build_pool(num_threads: usize, name: &'static str) -> Result<ThreadPool> {
    if num_threads == 0 {
        return Err(Error::Config("num_threads must be at least 1".into()));
    }
    ThreadPoolBuilder::new()
        .num_threads(num_threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .panic_handler(|_| {})
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the loader threads: {e}")))
}

/// Read one bag and build its graph; every panic becomes an error.
pub fn load_bag(store: &CohortStore, index: usize, opts: &LoadOptions) -> Result<Bag> {
    let context = format!("store {}: slide index {index}", store.path());
    catch_panics(&context, || {
        let data = store.read_as(index, opts.max_patches, opts.seed, opts.epoch, opts.dtype)?;
        let edges = match opts.knn_k {
            Some(k) => Some(knn_edges(&pairs_from_i64(&data.coords), k).map_err(|e| {
                Error::Data(format!(
                    "store {}: slide {}: {}",
                    store.path(),
                    store.slide_ids()[index],
                    e.message()
                ))
            })?),
            None => None,
        };
        Ok(Bag {
            index,
            n_rows: data.n_rows,
            dim: data.dim,
            features: data.features,
            coords: data.coords,
            edges,
        })
    })
}

/// An in-order iterator over bags, decoded ahead of the consumer.
pub struct Prefetcher {
    store: Arc<CohortStore>,
    indices: Vec<usize>,
    opts: LoadOptions,
    pool: Arc<ThreadPool>,
    prefetch: usize,
    pending: VecDeque<Receiver<Result<Bag>>>,
    next_submit: usize,
    cancel: Arc<AtomicBool>,
    finished: bool,
    /// Bags advised beyond the ones submitted for decoding.
    readahead: usize,
    /// Position in `indices` of the next bag to advise.
    next_advise: usize,
    /// Feeds the read-ahead I/O threads (absent when reading ahead is off).
    advise_tx: Option<Sender<FileRange>>,
}

impl Prefetcher {
    /// Start loading the first `prefetch` bags of `indices`, without read-ahead.
    ///
    /// # Errors
    /// [`Error::SlideNotFound`] for an index outside the store, [`Error::Config`] for
    /// `num_threads == 0`, `prefetch == 0` or `max_patches == Some(0)`.
    pub fn new(
        store: Arc<CohortStore>,
        indices: Vec<usize>,
        num_threads: usize,
        prefetch: usize,
        opts: LoadOptions,
    ) -> Result<Prefetcher> {
        Prefetcher::with_readahead(store, indices, num_threads, prefetch, ReadAhead::OFF, opts)
    }

    /// Like [`Prefetcher::new`], and keep the chunk files of up to `readahead.bags` further bags
    /// (beyond the `prefetch` being decoded) requested from the kernel by `readahead.threads` I/O
    /// threads.
    ///
    /// # Errors
    /// As [`Prefetcher::new`]; [`Error::Config`] for `readahead.bags > 0` with no I/O thread;
    /// [`Error::Internal`] when an I/O thread cannot be started.
    pub fn with_readahead(
        store: Arc<CohortStore>,
        indices: Vec<usize>,
        num_threads: usize,
        prefetch: usize,
        readahead: ReadAhead,
        opts: LoadOptions,
    ) -> Result<Prefetcher> {
        if prefetch == 0 {
            return Err(Error::Config("prefetch must be at least 1".into()));
        }
        if opts.max_patches == Some(0) {
            return Err(Error::Config("max_patches must be at least 1".into()));
        }
        for &i in &indices {
            store.check_index(i)?;
        }
        let pool = Arc::new(build_pool(num_threads, "momkd-loader")?);
        let cancel = Arc::new(AtomicBool::new(false));
        if readahead.bags > 0 && readahead.threads == 0 {
            return Err(Error::Config(
                "read-ahead needs at least 1 I/O thread (io_threads), or readahead=0".into(),
            ));
        }
        let advise_tx = if readahead.bags > 0 && !indices.is_empty() {
            let (tx, rx) = channel::<FileRange>();
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..readahead.threads {
                let rx = Arc::clone(&rx);
                let stop = Arc::clone(&cancel);
                std::thread::Builder::new()
                    .name(format!("momkd-readahead-{i}"))
                    .spawn(move || loop {
                        // Ends when the prefetcher (the sender) is dropped and the queue is empty.
                        let next = match rx.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => break,
                        };
                        match next {
                            Ok(range) if !stop.load(Ordering::Relaxed) => range.will_need(),
                            Ok(_) => {} // stopped: drain the queue without reading
                            Err(_) => break,
                        }
                    })
                    .map_err(|e| {
                        Error::Internal(format!("cannot start a read-ahead thread: {e}"))
                    })?;
            }
            Some(tx)
        } else {
            None
        };
        let mut p = Prefetcher {
            store,
            indices,
            opts,
            pool,
            prefetch,
            pending: VecDeque::with_capacity(prefetch),
            next_submit: 0,
            cancel,
            finished: false,
            readahead: readahead.bags,
            next_advise: 0,
            advise_tx,
        };
        p.fill();
        Ok(p)
    }

    /// Number of bags the iteration yields in total.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// True when there are no bags at all.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    fn fill(&mut self) {
        if let Some(tx) = &self.advise_tx {
            // Everything this call submits for decoding, and `readahead` bags beyond it.
            let submit = self.prefetch.saturating_sub(self.pending.len());
            let until = (self.next_submit + submit + self.readahead).min(self.indices.len());
            while self.next_advise < until {
                for range in self.store.file_ranges(self.indices[self.next_advise]) {
                    // A send fails only when the threads are gone; reading then goes on without.
                    let _ = tx.send(range);
                }
                self.next_advise += 1;
            }
            if self.next_advise == self.indices.len() {
                // Everything is requested: the I/O threads end once they have drained the queue.
                self.advise_tx = None;
            }
        }
        while !self.finished
            && self.pending.len() < self.prefetch
            && self.next_submit < self.indices.len()
        {
            let index = self.indices[self.next_submit];
            self.next_submit += 1;
            let (tx, rx) = sync_channel(1);
            let store = Arc::clone(&self.store);
            let cancel = Arc::clone(&self.cancel);
            let opts = self.opts;
            self.pool.spawn(move || {
                if cancel.load(Ordering::Relaxed) {
                    return;
                }
                let result = load_bag(&store, index, &opts);
                // The receiver is gone when the consumer stopped early: nothing to do then.
                let _ = tx.send(result);
            });
            self.pending.push_back(rx);
        }
    }

    /// Block until the next bag (in order) is ready. `None` at the end. After an error the
    /// iteration is over: later calls return `None`.
    pub fn next_bag(&mut self) -> Option<Result<Bag>> {
        if self.finished {
            return None;
        }
        let rx = self.pending.pop_front()?;
        let result = rx.recv().unwrap_or_else(|_| {
            Err(Error::Internal(format!(
                "store {}: a loader thread ended without a result",
                self.store.path()
            )))
        });
        if result.is_err() {
            self.stop();
        } else {
            // Refill only now, so that at most `prefetch` bags are held besides the one handed out.
            self.fill();
        }
        Some(result)
    }

    fn stop(&mut self) {
        self.finished = true;
        self.cancel.store(true, Ordering::Relaxed);
        self.pending.clear();
        self.advise_tx = None;
    }
}

impl Iterator for Prefetcher {
    type Item = Result<Bag>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_bag()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::read_tests::{slides, write_store};

    fn open_store(tmp: &tempfile::TempDir) -> Arc<CohortStore> {
        let dir = tmp.path().join("s.zarr");
        write_store(&dir, &slides(3), 3, 4, true);
        Arc::new(CohortStore::open(dir.to_str().unwrap()).unwrap())
    }

    const OPTS: LoadOptions = LoadOptions {
        max_patches: None,
        seed: 0,
        epoch: 0,
        knn_k: Some(2),
        dtype: OutDtype::F32,
    };

    #[test]
    fn yields_in_order_with_graphs() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let order = vec![2, 0, 1, 2, 0, 1, 1];
        let pf = Prefetcher::new(Arc::clone(&store), order.clone(), 2, 2, OPTS).unwrap();
        assert_eq!(pf.len(), 7);
        let got: Vec<Bag> = pf.map(|b| b.unwrap()).collect();
        assert_eq!(got.iter().map(|b| b.index).collect::<Vec<_>>(), order);
        for b in &got {
            let direct = store.read(b.index, None, 0, 0).unwrap();
            assert_eq!(b.features, direct.features);
            assert_eq!(b.coords, direct.coords);
            let edges = knn_edges(&pairs_from_i64(&direct.coords), 2).unwrap();
            assert_eq!(b.edges.as_ref(), Some(&edges));
        }
    }

    #[test]
    fn readahead_and_float16_yield_the_same_bags() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let order = vec![1, 2, 0, 1, 2];
        let plain: Vec<Bag> = Prefetcher::new(Arc::clone(&store), order.clone(), 1, 1, OPTS)
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
        let opts = LoadOptions {
            dtype: OutDtype::F16,
            ..OPTS
        };
        let half: Vec<Bag> = Prefetcher::with_readahead(
            Arc::clone(&store),
            order.clone(),
            2,
            2,
            ReadAhead {
                bags: 3,
                threads: 2,
            },
            opts,
        )
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
        assert_eq!(half.len(), plain.len());
        for (h, p) in half.iter().zip(&plain) {
            assert_eq!(h.index, p.index);
            assert_eq!(h.coords, p.coords);
            assert_eq!(h.edges, p.edges);
            // The store is float16: float16 out, widened, equals the float32 hand-off exactly.
            let widened: Vec<f32> = h
                .features
                .as_f16()
                .unwrap()
                .iter()
                .map(|v| v.to_f32())
                .collect();
            assert_eq!(p.features, widened);
        }
    }

    #[test]
    fn readahead_needs_an_io_thread() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let ra = ReadAhead {
            bags: 2,
            threads: 0,
        };
        match Prefetcher::with_readahead(store, vec![0, 1], 1, 1, ra, OPTS) {
            Err(Error::Config(m)) => assert!(m.contains("io_threads"), "{m}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("read-ahead without I/O threads was accepted"),
        }
    }

    #[test]
    fn subsampling_matches_store_read() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let opts = LoadOptions {
            max_patches: Some(3),
            seed: 5,
            epoch: 2,
            knn_k: None,
            dtype: OutDtype::F32,
        };
        let got: Vec<Bag> = Prefetcher::new(Arc::clone(&store), vec![0, 1, 2], 1, 1, opts)
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
        for b in got {
            let direct = store.read(b.index, Some(3), 5, 2).unwrap();
            assert_eq!(b.features, direct.features);
            assert_eq!(b.n_rows, direct.n_rows.min(3));
            assert!(b.edges.is_none());
        }
    }

    #[test]
    fn stops_at_the_first_error_and_drops_early() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        std::fs::remove_file(tmp.path().join("s.zarr/features/c/3/0")).unwrap();
        let mut pf = Prefetcher::new(Arc::clone(&store), vec![0, 1, 2, 0], 2, 3, OPTS).unwrap();
        assert_eq!(pf.next().unwrap().unwrap().index, 0);
        let err = pf.next().unwrap().unwrap_err();
        assert!(
            matches!(&err, Error::Store(m) if m.contains("slide b")),
            "{err:?}"
        );
        assert!(pf.next().is_none());
        // Dropping with work still queued must return promptly.
        let mut pf = Prefetcher::new(Arc::clone(&store), vec![0; 200], 2, 8, OPTS).unwrap();
        assert!(pf.next().unwrap().is_ok());
        drop(pf);
    }

    #[test]
    fn rejects_bad_arguments() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_store(&tmp);
        let e = |r: Result<Prefetcher>| r.err().unwrap();
        assert!(matches!(
            e(Prefetcher::new(Arc::clone(&store), vec![0, 3], 1, 1, OPTS)),
            Error::SlideNotFound(_)
        ));
        assert!(matches!(
            e(Prefetcher::new(Arc::clone(&store), vec![0], 0, 1, OPTS)),
            Error::Config(_)
        ));
        assert!(matches!(
            e(Prefetcher::new(Arc::clone(&store), vec![0], 1, 0, OPTS)),
            Error::Config(_)
        ));
        let opts = LoadOptions {
            max_patches: Some(0),
            ..OPTS
        };
        assert!(matches!(
            e(Prefetcher::new(store, vec![0], 1, 1, opts)),
            Error::Config(_)
        ));
    }
}
