//! The cohort store (docs/FORMAT.md): open, validate, read bags.
//!
//! Opening checks everything FORMAT.md lists under "What opening a store checks" from the raw
//! `zarr.json` documents, then opens the three arrays with `zarrs`. Reading a bag walks the chunks
//! covering its rows, decodes them in parallel on the caller's rayon pool, and converts/checks the
//! values in the same pass, so that every failure names the store, the slide and the chunk key.
//! The inner chunks of a sharded array are read by [`shard`], which checks them exactly as
//! unsharded chunks are checked.
//!
//! This file holds [`CohortStore`], the types it hands over and its accessors; the work is done
//! in one submodule per concern:
//! - `meta`: opening ([`CohortStore::open`]): the root and array `zarr.json` documents, the
//!   momkd header and `offsets`, read and checked.
//! - `read`: reading bags ([`CohortStore::read`], [`CohortStore::file_ranges`]): chunk planning,
//!   the parallel decode with its checks, read-ahead byte ranges.
//! - `shard`: the inner chunks of sharded arrays: shard indexes and their entries, inner chunk
//!   decode.

mod meta;
mod read;
mod shard;

pub use meta::{slide_id_problem, FORMAT_NAME, FORMAT_VERSION};
#[cfg(test)]
pub(crate) use read::read_tests;
pub use read::FileRange;

use std::collections::HashMap;

use half::f16;

use crate::error::{Error, Result};
use read::RowArray;

/// On-disk data type of `features`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureDtype {
    F16,
    F32,
}

impl FeatureDtype {
    /// The Zarr / numpy name.
    pub fn name(self) -> &'static str {
        match self {
            FeatureDtype::F16 => "float16",
            FeatureDtype::F32 => "float32",
        }
    }
}

/// On-disk data type of `coords`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CoordDtype {
    I32,
    I64,
}

/// The data type features are handed over in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    /// float32 (converted from a float16 store).
    F32,
    /// float16 (converted, overflow-checked, from a float32 store): half the bytes.
    F16,
}

impl OutDtype {
    /// Parse `"float32"` / `"float16"`.
    ///
    /// # Errors
    /// [`Error::Config`] for any other name.
    pub fn parse(name: &str) -> Result<OutDtype> {
        match name {
            "float32" => Ok(OutDtype::F32),
            "float16" => Ok(OutDtype::F16),
            other => Err(Error::Config(format!(
                "dtype must be 'float32' or 'float16', got {other:?}"
            ))),
        }
    }
}

/// Row-major `(P, D)` features in the requested data type.
#[derive(Debug, Clone, PartialEq)]
pub enum FeatureBuf {
    /// float32 values.
    F32(Vec<f32>),
    /// float16 values.
    F16(Vec<f16>),
}

impl FeatureBuf {
    /// The float32 values, if that is the type.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            FeatureBuf::F32(v) => Some(v),
            FeatureBuf::F16(_) => None,
        }
    }
    /// The float16 values, if that is the type.
    pub fn as_f16(&self) -> Option<&[f16]> {
        match self {
            FeatureBuf::F16(v) => Some(v),
            FeatureBuf::F32(_) => None,
        }
    }
}

impl PartialEq<Vec<f32>> for FeatureBuf {
    fn eq(&self, other: &Vec<f32>) -> bool {
        self.as_f32() == Some(other.as_slice())
    }
}

/// One bag as read from the store: row-major buffers ready to hand to numpy.
#[derive(Debug, Clone, PartialEq)]
pub struct BagData {
    /// Number of rows `P`.
    pub n_rows: usize,
    /// Feature dimension `D`.
    pub dim: usize,
    /// `(P, D)` float32 or float16.
    pub features: FeatureBuf,
    /// `(P, 2)` int64, `x` then `y`.
    pub coords: Vec<i64>,
}

/// An open, validated cohort store.
pub struct CohortStore {
    path: String,
    slide_ids: Vec<String>,
    index: HashMap<String, usize>,
    feature_dim: usize,
    n_patches: u64,
    feat_dtype: FeatureDtype,
    coord_dtype: CoordDtype,
    feat_chunk_rows: u64,
    coord_chunk_rows: u64,
    offsets: Vec<i64>,
    header_json: String,
    features: RowArray,
    coords: RowArray,
}

impl std::fmt::Debug for CohortStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CohortStore")
            .field("path", &self.path)
            .field("n_slides", &self.slide_ids.len())
            .field("n_patches", &self.n_patches)
            .field("feature_dim", &self.feature_dim)
            .finish()
    }
}

impl CohortStore {
    /// The path the store was opened with.
    pub fn path(&self) -> &str {
        &self.path
    }
    /// Slide ids in storage order.
    pub fn slide_ids(&self) -> &[String] {
        &self.slide_ids
    }
    /// Number of slides.
    pub fn len(&self) -> usize {
        self.slide_ids.len()
    }
    /// True for a store without slides.
    pub fn is_empty(&self) -> bool {
        self.slide_ids.is_empty()
    }
    /// Feature dimension `D`.
    pub fn feature_dim(&self) -> usize {
        self.feature_dim
    }
    /// Total number of patches `N`.
    pub fn n_patches(&self) -> u64 {
        self.n_patches
    }
    /// On-disk feature data type.
    pub fn dtype(&self) -> FeatureDtype {
        self.feat_dtype
    }
    /// Rows per chunk of `features` (per inner chunk of a sharded store).
    pub fn chunk_rows(&self) -> u64 {
        self.feat_chunk_rows
    }
    /// Rows per shard of `features`, for a sharded (format version 1.1) store.
    pub fn shard_rows(&self) -> Option<u64> {
        self.features
            .shards
            .as_ref()
            .map(|s| s.chunks_per_shard() * self.feat_chunk_rows)
    }

    /// The root `attributes["momkd"]` as JSON text.
    pub fn header_json(&self) -> &str {
        &self.header_json
    }
    /// CSR offsets, length `S + 1`.
    pub fn offsets(&self) -> &[i64] {
        &self.offsets
    }

    /// Index of `slide_id` in storage order.
    ///
    /// # Errors
    /// [`Error::SlideNotFound`] naming the store and the id.
    pub fn index_of(&self, slide_id: &str) -> Result<usize> {
        self.index.get(slide_id).copied().ok_or_else(|| {
            Error::SlideNotFound(format!(
                "store {}: no slide with id {slide_id:?}",
                self.path
            ))
        })
    }

    /// Check that `index` names a slide.
    ///
    /// # Errors
    /// [`Error::SlideNotFound`] when it is out of range.
    pub fn check_index(&self, index: usize) -> Result<()> {
        if index < self.slide_ids.len() {
            Ok(())
        } else {
            Err(Error::SlideNotFound(format!(
                "store {}: slide index {index} is out of range (the store has {} slides)",
                self.path,
                self.slide_ids.len()
            )))
        }
    }

    /// Number of patches of slide `index`.
    ///
    /// # Errors
    /// [`Error::SlideNotFound`] when `index` is out of range.
    pub fn bag_len(&self, index: usize) -> Result<usize> {
        self.check_index(index)?;
        Ok((self.offsets[index + 1] - self.offsets[index]) as usize)
    }
}
