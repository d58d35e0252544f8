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
