//! The thin PyO3 layer: exceptions, `Store`, `BagPrefetcher` and the free functions of
//! `momkd._core`. Everything here converts arguments, releases the GIL around the Rust work and
//! hands buffers to numpy without copying.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use half::f16;
use numpy::ndarray::{Array2, ArrayD, IxDyn};
use numpy::{
    Element, IntoPyArray, PyArray2, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyBaseException, PyException, PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use rayon::ThreadPool;

use crate::convert::{
    f32_to_f16_checked, f64_to_f16_checked, first_non_finite_f16, first_non_finite_f32,
    first_non_finite_f64, BadValue, F16Result,
};
use crate::error::{catch_panics, Error};
use crate::knn::knn_edges;
use crate::loader::{build_pool, Bag, LoadOptions, Prefetcher, ReadAhead};
use crate::store::{CohortStore, FeatureBuf, OutDtype};

const MODULE: &str = "momkd._core";

pyo3::create_exception!(
    momkd._core,
    MomkdError,
    PyException,
    "Base class of every momkd error."
);
pyo3::create_exception!(
    momkd._core,
    StoreError,
    MomkdError,
    "A bad, corrupt, incomplete or unsupported cohort store."
);
pyo3::create_exception!(
    momkd._core,
    IngestError,
    MomkdError,
    "Ingesting feature files into a cohort store failed."
);

static SLIDE_NOT_FOUND: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static DATA_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static CONFIG_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// An exception class deriving from both `MomkdError` and a builtin (e.g. `KeyError`).
///
/// `create_exception!` takes a single base, so these are made with `type(...)` once and cached.
/// `__str__` is `BaseException.__str__` so that `KeyError`'s quoting does not wrap the message.
fn dual_base_type<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyType>>,
    name: &str,
    doc: &str,
    builtin: Bound<'py, PyType>,
) -> PyResult<Bound<'py, PyType>> {
    let ty = cell.get_or_try_init(py, || -> PyResult<Py<PyType>> {
        let bases = PyTuple::new(py, [py.get_type::<MomkdError>(), builtin])?;
        let ns = PyDict::new(py);
        ns.set_item("__module__", MODULE)?;
        ns.set_item("__doc__", doc)?;
        ns.set_item("__qualname__", name)?;
        ns.set_item(
            "__str__",
            py.get_type::<PyBaseException>().getattr("__str__")?,
        )?;
        let made = py
            .import("builtins")?
            .getattr("type")?
            .call1((name, bases, ns))?;
        Ok(made.cast_into::<PyType>()?.unbind())
    })?;
    Ok(ty.bind(py).clone())
}

/// `SlideNotFoundError(MomkdError, KeyError)`.
pub fn slide_not_found_error(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    dual_base_type(
        py,
        &SLIDE_NOT_FOUND,
        "SlideNotFoundError",
        "A slide id or index that the store does not hold.",
        py.get_type::<PyKeyError>(),
    )
}

/// `DataError(MomkdError, ValueError)`.
pub fn data_error(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    dual_base_type(
        py,
        &DATA_ERROR,
        "DataError",
        "Invalid data: NaN/Inf, empty bag, bad shapes, duplicate ids, bad labels, missing expression.",
        py.get_type::<PyValueError>(),
    )
}

/// `ConfigError(MomkdError, ValueError)`.
pub fn config_error(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    dual_base_type(
        py,
        &CONFIG_ERROR,
        "ConfigError",
        "An invalid configuration value or argument.",
        py.get_type::<PyValueError>(),
    )
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        Python::attach(|py| {
            let typed = |ty: PyResult<Bound<'_, PyType>>, msg: String| match ty {
                Ok(t) => PyErr::from_type(t, msg),
                Err(err) => err,
            };
            match e {
                Error::Store(m) => StoreError::new_err(m),
                Error::SlideNotFound(m) => typed(slide_not_found_error(py), m),
                Error::Data(m) => typed(data_error(py), m),
                Error::Config(m) => typed(config_error(py), m),
                Error::Internal(m) => MomkdError::new_err(m),
            }
        })
    }
}

/// Add the dual-base exception classes and `__version__` to the module.
pub fn init_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    #[cfg(feature = "mimalloc")]
    crate::tune_allocator();
    m.add("SlideNotFoundError", slide_not_found_error(py)?)?;
    m.add("DataError", data_error(py)?)?;
    m.add("ConfigError", config_error(py)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

fn non_negative(value: i64, what: &str) -> Result<usize, Error> {
    usize::try_from(value).map_err(|_| Error::Config(format!("{what} must be >= 0, got {value}")))
}

/// Seeds and epochs: any integer in `0 .. 2**64`.
fn seed_value(value: i128, what: &str) -> Result<u64, Error> {
    u64::try_from(value).map_err(|_| {
        Error::Config(format!(
            "{what} must be an integer in [0, 2**64), got {value}"
        ))
    })
}

fn features_to_numpy<'py>(
    py: Python<'py>,
    n: usize,
    d: usize,
    data: FeatureBuf,
) -> PyResult<Bound<'py, PyAny>> {
    let wrong = |e: numpy::ndarray::ShapeError| {
        Error::Internal(format!("features buffer has the wrong size: {e}"))
    };
    Ok(match data {
        FeatureBuf::F32(v) => Array2::from_shape_vec((n, d), v)
            .map_err(wrong)?
            .into_pyarray(py)
            .into_any(),
        FeatureBuf::F16(v) => Array2::from_shape_vec((n, d), v)
            .map_err(wrong)?
            .into_pyarray(py)
            .into_any(),
    })
}

fn i64_to_numpy<'py>(
    py: Python<'py>,
    rows: usize,
    cols: usize,
    data: Vec<i64>,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let arr = Array2::from_shape_vec((rows, cols), data)
        .map_err(|e| Error::Internal(format!("integer buffer has the wrong size: {e}")))?;
    Ok(arr.into_pyarray(py))
}

/// An open, validated cohort store (docs/FORMAT.md).
#[pyclass(module = "momkd._core", name = "Store", frozen)]
pub struct PyStore {
    inner: Arc<CohortStore>,
    num_threads: usize,
    pool: OnceLock<Result<Arc<ThreadPool>, Error>>,
}

impl PyStore {
    fn pool(&self) -> Result<Arc<ThreadPool>, Error> {
        self.pool
            .get_or_init(|| build_pool(self.num_threads, "momkd-read").map(Arc::new))
            .clone()
    }
}

type ReadResult<'py> = (Bound<'py, PyAny>, Bound<'py, PyArray2<i64>>);

#[pymethods]
impl PyStore {
    /// Open and validate the store at `path`; `num_threads` sizes the pool that `read` decodes on.
    #[staticmethod]
    #[pyo3(signature = (path, *, num_threads = None))]
    fn open(py: Python<'_>, path: PathBuf, num_threads: Option<i64>) -> PyResult<PyStore> {
        let num_threads = match num_threads {
            Some(n) => non_negative(n, "num_threads")?,
            None => std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
        };
        if num_threads == 0 {
            return Err(Error::Config("num_threads must be at least 1".into()).into());
        }
        let path = path.to_string_lossy().into_owned();
        let context = format!("store {path}");
        let store = py.detach(|| catch_panics(&context, || CohortStore::open(&path)))?;
        Ok(PyStore {
            inner: Arc::new(store),
            num_threads,
            pool: OnceLock::new(),
        })
    }

    #[getter]
    fn path(&self) -> &str {
        self.inner.path()
    }

    #[getter]
    fn slide_ids(&self) -> Vec<String> {
        self.inner.slide_ids().to_vec()
    }

    #[getter]
    fn feature_dim(&self) -> usize {
        self.inner.feature_dim()
    }

    #[getter]
    fn n_patches(&self) -> u64 {
        self.inner.n_patches()
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.dtype().name()
    }

    #[getter]
    fn chunk_rows(&self) -> u64 {
        self.inner.chunk_rows()
    }

    /// Rows per shard of `features` (sharded stores), else `None`.
    #[getter]
    fn shard_rows(&self) -> Option<u64> {
        self.inner.shard_rows()
    }

    #[getter]
    fn header_json(&self) -> &str {
        self.inner.header_json()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "Store(path={:?}, slides={}, patches={}, feature_dim={}, dtype={})",
            self.inner.path(),
            self.inner.len(),
            self.inner.n_patches(),
            self.inner.feature_dim(),
            self.inner.dtype().name()
        )
    }

    /// Storage index of `slide_id`; `SlideNotFoundError` naming the store and the id.
    fn index_of(&self, slide_id: &str) -> PyResult<usize> {
        Ok(self.inner.index_of(slide_id)?)
    }

    /// The file byte ranges `(path, offset, length)` that reading slide `index` touches (length
    /// `0`: to the end of the file); what the read-ahead threads request. Empty out of range.
    fn file_ranges(&self, index: usize) -> Vec<(String, u64, u64)> {
        self.inner
            .file_ranges(index)
            .into_iter()
            .map(|r| (r.path.to_string_lossy().into_owned(), r.offset, r.len))
            .collect()
    }

    /// CSR offsets, int64 `(S + 1,)`.
    fn offsets<'py>(&self, py: Python<'py>) -> Bound<'py, numpy::PyArray1<i64>> {
        self.inner.offsets().to_vec().into_pyarray(py)
    }

    /// Read slide `index`: features float32 (or `dtype`) `(P, D)`, coords int64 `(P, 2)`.
    #[pyo3(signature = (index, max_patches = None, seed = 0, epoch = 0, dtype = "float32"))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        index: i64,
        max_patches: Option<i64>,
        seed: i128,
        epoch: i128,
        dtype: &str,
    ) -> PyResult<ReadResult<'py>> {
        let out = OutDtype::parse(dtype)?;
        let (seed, epoch) = (seed_value(seed, "seed")?, seed_value(epoch, "epoch")?);
        let index = usize::try_from(index).map_err(|_| {
            Error::SlideNotFound(format!(
                "store {}: slide index {index} is out of range (the store has {} slides)",
                self.inner.path(),
                self.inner.len()
            ))
        })?;
        let max_patches = max_patches
            .map(|m| non_negative(m, "max_patches"))
            .transpose()?;
        let pool = self.pool()?;
        let store = &self.inner;
        let context = format!("store {}: slide index {index}", store.path());
        let bag = py.detach(|| {
            catch_panics(&context, || {
                pool.install(|| store.read_as(index, max_patches, seed, epoch, out))
            })
        })?;
        let features = features_to_numpy(py, bag.n_rows, bag.dim, bag.features)?;
        let coords = i64_to_numpy(py, bag.n_rows, 2, bag.coords)?;
        Ok((features, coords))
    }
}

type NextItem<'py> = (
    usize,
    Bound<'py, PyAny>,
    Bound<'py, PyArray2<i64>>,
    Option<Bound<'py, PyArray2<i64>>>,
);

/// Iterator over bags in the given order, decoded ahead of the consumer on its own thread pool.
#[pyclass(module = "momkd._core", name = "BagPrefetcher", frozen)]
pub struct PyBagPrefetcher {
    inner: Mutex<Prefetcher>,
    len: usize,
}

#[pymethods]
impl PyBagPrefetcher {
    #[new]
    #[pyo3(signature = (store, indices, *, num_threads = 2, prefetch = 4, max_patches = None,
                        seed = 0, epoch = 0, knn_k = Some(8), dtype = "float32", readahead = 0,
                        io_threads = 8),
           text_signature = "(store, indices, *, num_threads=2, prefetch=4, max_patches=None, seed=0, epoch=0, knn_k=8, dtype='float32', readahead=0, io_threads=8)")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        store: &Bound<'_, PyStore>,
        indices: Vec<i64>,
        num_threads: i64,
        prefetch: i64,
        max_patches: Option<i64>,
        seed: i128,
        epoch: i128,
        knn_k: Option<i64>,
        dtype: &str,
        readahead: i64,
        io_threads: i64,
    ) -> PyResult<PyBagPrefetcher> {
        let st = Arc::clone(&store.get().inner);
        let idx = indices
            .iter()
            .map(|&i| {
                usize::try_from(i).map_err(|_| {
                    Error::SlideNotFound(format!(
                        "store {}: slide index {i} is out of range (the store has {} slides)",
                        st.path(),
                        st.len()
                    ))
                })
            })
            .collect::<Result<Vec<usize>, Error>>()?;
        let opts = LoadOptions {
            max_patches: max_patches
                .map(|m| non_negative(m, "max_patches"))
                .transpose()?,
            seed: seed_value(seed, "seed")?,
            epoch: seed_value(epoch, "epoch")?,
            knn_k: knn_k.map(|k| non_negative(k, "knn_k")).transpose()?,
            dtype: OutDtype::parse(dtype)?,
        };
        let len = idx.len();
        let p = Prefetcher::with_readahead(
            st,
            idx,
            non_negative(num_threads, "num_threads")?,
            non_negative(prefetch, "prefetch")?,
            ReadAhead {
                bags: non_negative(readahead, "readahead")?,
                threads: non_negative(io_threads, "io_threads")?,
            },
            opts,
        )?;
        Ok(PyBagPrefetcher {
            inner: Mutex::new(p),
            len,
        })
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<NextItem<'py>>> {
        let inner = &self.inner;
        let next: Option<Result<Bag, Error>> = py.detach(|| match inner.lock() {
            Ok(mut guard) => guard.next_bag(),
            Err(_) => Some(Err(Error::Internal(
                "the bag prefetcher is unusable after a failure in another thread".into(),
            ))),
        });
        let bag = match next {
            None => return Ok(None),
            Some(r) => r?,
        };
        let features = features_to_numpy(py, bag.n_rows, bag.dim, bag.features)?;
        let coords = i64_to_numpy(py, bag.n_rows, 2, bag.coords)?;
        let edges = match bag.edges {
            Some(e) => {
                let n_edges = e.len() / 2;
                Some(i64_to_numpy(py, 2, n_edges, e)?)
            }
            None => None,
        };
        Ok(Some((bag.index, features, coords, edges)))
    }

    fn __len__(&self) -> usize {
        self.len
    }
}

fn dtype_name(obj: &Bound<'_, PyAny>) -> String {
    obj.getattr("dtype")
        .and_then(|d| d.str().map(|s| s.to_string()))
        .unwrap_or_else(|_| obj.get_type().name().map_or("?".into(), |n| n.to_string()))
}

fn coords_pairs<T: Element + Copy + Into<f64>>(
    arr: &PyReadonlyArrayDyn<'_, T>,
) -> Result<Vec<[f64; 2]>, Error> {
    let shape = arr.shape();
    if shape.len() != 2 || shape[1] != 2 {
        return Err(Error::Data(format!(
            "knn_graph: coords must have shape (P, 2), got {shape:?}"
        )));
    }
    let view = arr.as_array();
    Ok(view
        .outer_iter()
        .map(|row| [row[0].into(), row[1].into()])
        .collect())
}

fn coords_pairs_i64(arr: &PyReadonlyArrayDyn<'_, i64>) -> Result<Vec<[f64; 2]>, Error> {
    let shape = arr.shape();
    if shape.len() != 2 || shape[1] != 2 {
        return Err(Error::Data(format!(
            "knn_graph: coords must have shape (P, 2), got {shape:?}"
        )));
    }
    Ok(arr
        .as_array()
        .outer_iter()
        .map(|row| [row[0] as f64, row[1] as f64])
        .collect())
}

/// Rows of a bag of `n` rows that a read with `max_patches` keeps (increasing, int64), or `None`
/// when the bag is kept whole: the same rows as `Store.read` / `BagPrefetcher` for `(seed, epoch,
/// index)`.
#[pyfunction]
#[pyo3(signature = (n, max_patches, seed, epoch, index))]
pub fn bag_rows<'py>(
    py: Python<'py>,
    n: i64,
    max_patches: Option<i64>,
    seed: i128,
    epoch: i128,
    index: i64,
) -> PyResult<Option<Bound<'py, numpy::PyArray1<i64>>>> {
    let n = non_negative(n, "n")?;
    let max_patches = max_patches
        .map(|m| non_negative(m, "max_patches"))
        .transpose()?;
    if max_patches == Some(0) {
        return Err(Error::Config("max_patches must be at least 1".into()).into());
    }
    let rows = crate::subsample::bag_rows(
        n,
        max_patches,
        seed_value(seed, "seed")?,
        seed_value(epoch, "epoch")?,
        non_negative(index, "index")?,
    );
    Ok(rows.map(|r| {
        r.into_iter()
            .map(|v| v as i64)
            .collect::<Vec<i64>>()
            .into_pyarray(py)
    }))
}

/// k-NN graph on patch coordinates: edge_index int64 `(2, P * min(k, P - 1))`.
#[pyfunction]
#[pyo3(signature = (coords, k = 8))]
pub fn knn_graph<'py>(
    py: Python<'py>,
    coords: &Bound<'py, PyAny>,
    k: i64,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let k = non_negative(k, "k")?;
    let pairs = if let Ok(a) = coords.extract::<PyReadonlyArrayDyn<'_, i64>>() {
        coords_pairs_i64(&a)?
    } else if let Ok(a) = coords.extract::<PyReadonlyArrayDyn<'_, i32>>() {
        coords_pairs(&a)?
    } else if let Ok(a) = coords.extract::<PyReadonlyArrayDyn<'_, f32>>() {
        coords_pairs(&a)?
    } else if let Ok(a) = coords.extract::<PyReadonlyArrayDyn<'_, f64>>() {
        coords_pairs(&a)?
    } else {
        return Err(Error::Data(format!(
            "knn_graph: coords must be a numpy array of int32, int64, float32 or float64, got {}",
            dtype_name(coords)
        ))
        .into());
    };
    let edges = py
        .detach(|| catch_panics("knn_graph", || knn_edges(&pairs, k)))
        .map_err(|e| match e {
            Error::Data(m) => Error::Data(format!("knn_graph: {m}")),
            other => other,
        })?;
    let n_edges = edges.len() / 2;
    i64_to_numpy(py, 2, n_edges, edges)
}

fn label(name: &str) -> &str {
    if name.is_empty() {
        "array"
    } else {
        name
    }
}

fn row_len(shape: &[usize]) -> usize {
    shape.iter().skip(1).product::<usize>().max(1)
}

fn check_ndim(shape: &[usize], name: &str, func: &str) -> Result<(), Error> {
    if shape.is_empty() {
        return Err(Error::Data(format!(
            "{}: {func} needs an array with at least one dimension (rows), got a scalar",
            label(name)
        )));
    }
    Ok(())
}

fn f16_error(name: &str, shape: &[usize], pos: usize, why: BadValue, value: f64) -> Error {
    let row = pos / row_len(shape);
    match why {
        BadValue::NonFinite => Error::Data(format!(
            "{}: row {row} has a non-finite value ({value})",
            label(name)
        )),
        BadValue::Overflow => Error::Data(format!(
            "{}: row {row} has the value {value}, which overflows float16 (|x| > 65504)",
            label(name)
        )),
    }
}

fn to_f16_generic<'py, T>(
    py: Python<'py>,
    arr: PyReadonlyArrayDyn<'py, T>,
    name: &str,
    convert: fn(&[T]) -> F16Result,
) -> PyResult<Bound<'py, PyArrayDyn<f16>>>
where
    T: Element + Copy + Send + Sync + Into<f64>,
{
    let shape = arr.shape().to_vec();
    check_ndim(&shape, name, "to_float16_checked")?;
    let view = arr.as_array();
    let standard = view.as_standard_layout();
    let data = standard
        .as_slice()
        .ok_or_else(|| Error::Internal("cannot get a contiguous view of the input".into()))?;
    let out = py.detach(|| convert(data));
    let out = out.map_err(|(pos, why)| f16_error(name, &shape, pos, why, data[pos].into()))?;
    let arr = ArrayD::from_shape_vec(IxDyn(&shape), out)
        .map_err(|e| Error::Internal(format!("float16 buffer has the wrong size: {e}")))?;
    Ok(arr.into_pyarray(py))
}

/// float32/float64 `(P, D)` -> float16 `(P, D)`; `DataError` naming `name` and the first bad row.
#[pyfunction]
#[pyo3(signature = (x, name = ""))]
pub fn to_float16_checked<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<Bound<'py, PyArrayDyn<f16>>> {
    if let Ok(a) = x.extract::<PyReadonlyArrayDyn<'py, f32>>() {
        to_f16_generic(py, a, name, f32_to_f16_checked)
    } else if let Ok(a) = x.extract::<PyReadonlyArrayDyn<'py, f64>>() {
        to_f16_generic(py, a, name, f64_to_f16_checked)
    } else {
        Err(Error::Data(format!(
            "{}: to_float16_checked needs a float32 or float64 numpy array, got {}",
            label(name),
            dtype_name(x)
        ))
        .into())
    }
}

fn finite_generic<T>(
    py: Python<'_>,
    arr: PyReadonlyArrayDyn<'_, T>,
    name: &str,
    first_bad: fn(&[T]) -> Option<usize>,
    to_f64: fn(T) -> f64,
) -> PyResult<()>
where
    T: Element + Copy + Send + Sync,
{
    let shape = arr.shape().to_vec();
    check_ndim(&shape, name, "check_finite")?;
    let view = arr.as_array();
    let standard = view.as_standard_layout();
    let data = standard
        .as_slice()
        .ok_or_else(|| Error::Internal("cannot get a contiguous view of the input".into()))?;
    if let Some(pos) = py.detach(|| first_bad(data)) {
        return Err(f16_error(name, &shape, pos, BadValue::NonFinite, to_f64(data[pos])).into());
    }
    Ok(())
}

/// float16/float32 `(P, D)`: `DataError` naming `name` and the first row with a NaN/Inf.
#[pyfunction]
#[pyo3(signature = (x, name = ""))]
pub fn check_finite(py: Python<'_>, x: &Bound<'_, PyAny>, name: &str) -> PyResult<()> {
    if let Ok(a) = x.extract::<PyReadonlyArrayDyn<'_, f32>>() {
        finite_generic(py, a, name, first_non_finite_f32, f64::from)
    } else if let Ok(a) = x.extract::<PyReadonlyArrayDyn<'_, f16>>() {
        finite_generic(py, a, name, first_non_finite_f16, f64::from)
    } else if let Ok(a) = x.extract::<PyReadonlyArrayDyn<'_, f64>>() {
        finite_generic(py, a, name, first_non_finite_f64, |v| v)
    } else {
        Err(Error::Data(format!(
            "{}: check_finite needs a float16 or float32 numpy array, got {}",
            label(name),
            dtype_name(x)
        ))
        .into())
    }
}
