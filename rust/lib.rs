//! momkd's Rust core, exposed to Python as `momkd._core`.
//!
//! The pure-Rust logic lives in one module per concern; `py` is the thin PyO3 layer and is only
//! built with the default `python` feature.

pub mod convert;
pub mod error;
pub mod knn;
pub mod loader;
pub mod store;
pub mod subsample;

#[cfg(feature = "python")]
mod py;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keep freed memory committed for a second before returning it to the OS (mimalloc's default is
/// 10 ms). A loader frees one bag (tens of MB) and allocates the next within milliseconds; with the
/// default, every bag's buffer is returned and faulted in again page by page.
#[cfg(feature = "mimalloc")]
pub fn tune_allocator() {
    // `mi_option_purge_delay` of mimalloc's `mi_option_t` (v2: the option after
    // `mi_option_eager_commit_delay` = 14).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting a mimalloc option is thread-safe and has no preconditions.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
}

/// Rust core of momkd: cohort store reader, prefetching bag loader, k-NN graph, checked casts.
#[cfg(feature = "python")]
#[pyo3::pymodule]
mod _core {
    use pyo3::prelude::*;

    #[pymodule_export]
    use super::py::{
        bag_rows, check_finite, knn_graph, to_float16_checked, IngestError, MomkdError,
        PyBagPrefetcher, PyStore, StoreError,
    };

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        super::py::init_module(m)
    }
}
