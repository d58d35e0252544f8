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

/// Sharded stores written by hand from FORMAT.md and the Zarr v3 `sharding_indexed` layout
/// (inner chunks, then an index of little-endian `(offset, nbytes)` pairs and its crc32c),
/// independent of zarrs' sharding code.
#[cfg(test)]
mod shard_tests {
    use super::read_tests::{slides, write_store, Slide};
    use super::*;
    use std::path::Path;

    /// How the hand-written shards are laid out.
    #[derive(Clone, Copy)]
    struct Layout {
        rows: usize,
        shard_rows: usize,
        index_crc: bool,
        index_at_end: bool,
    }

    const LAYOUT: Layout = Layout {
        rows: 4,
        shard_rows: 8,
        index_crc: true,
        index_at_end: true,
    };

    fn with_crc(raw: &[u8]) -> Vec<u8> {
        let mut out = raw.to_vec();
        out.extend_from_slice(&crc32c::crc32c(raw).to_le_bytes());
        out
    }

    fn sharded_json(shape: &[usize], cols: usize, dtype: &str, l: Layout) -> String {
        let mut index_codecs =
            vec![serde_json::json!({"name": "bytes", "configuration": {"endian": "little"}})];
        if l.index_crc {
            index_codecs.push(serde_json::json!({"name": "crc32c"}));
        }
        serde_json::json!({
            "zarr_format": 3, "node_type": "array", "shape": shape, "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [l.shard_rows, cols]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0,
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [l.rows, cols],
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                           {"name": "crc32c"}],
                "index_codecs": index_codecs,
                "index_location": if l.index_at_end { "end" } else { "start" }}}],
            "attributes": {}
        })
        .to_string()
    }

    /// Write `values` (`cols` columns of `item` bytes) as shard files; returns the row blocks'
    /// encoded sizes.
    fn write_shards(dir: &Path, name: &str, cols: usize, item: usize, values: &[u8], l: Layout) {
        let block = l.rows * cols * item;
        let per_shard = l.shard_rows / l.rows;
        let shard_bytes = block * per_shard;
        let n_shards = values.len().div_ceil(shard_bytes);
        let index_len = 16 * per_shard + if l.index_crc { 4 } else { 0 };
        for s in 0..n_shards {
            let mut data = Vec::new();
            let mut index = Vec::new();
            let base = if l.index_at_end { 0 } else { index_len };
            for k in 0..per_shard {
                let lo = (s * per_shard + k) * block;
                let mut raw = vec![0u8; block];
                if lo < values.len() {
                    let hi = (lo + block).min(values.len());
                    raw[..hi - lo].copy_from_slice(&values[lo..hi]);
                }
                let enc = with_crc(&raw);
                index.extend_from_slice(&((base + data.len()) as u64).to_le_bytes());
                index.extend_from_slice(&(enc.len() as u64).to_le_bytes());
                data.extend_from_slice(&enc);
            }
            if l.index_crc {
                index = with_crc(&index);
            }
            let file = if l.index_at_end {
                [data, index].concat()
            } else {
                [index, data].concat()
            };
            let path = dir.join(name).join("c").join(s.to_string()).join("0");
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, file).unwrap();
        }
    }

    /// A float32 store of `slides(3)` with sharded `features` and `coords`.
    fn write_sharded(dir: &Path, l: Layout) -> Vec<Slide> {
        let d = 3;
        let sl = slides(d);
        write_store(dir, &sl, d, l.rows, false);
        let n: usize = sl.iter().map(|s| s.coords.len() / 2).sum();
        for name in ["features", "coords"] {
            std::fs::remove_dir_all(dir.join(name).join("c")).unwrap();
        }
        std::fs::write(
            dir.join("features/zarr.json"),
            sharded_json(&[n, d], d, "float32", l),
        )
        .unwrap();
        std::fs::write(
            dir.join("coords/zarr.json"),
            sharded_json(&[n, 2], 2, "int32", l),
        )
        .unwrap();
        let feats: Vec<u8> = sl
            .iter()
            .flat_map(|s| s.feats.iter().flat_map(|v| v.to_le_bytes()))
            .collect();
        write_shards(dir, "features", d, 4, &feats, l);
        let coords: Vec<u8> = sl
            .iter()
            .flat_map(|s| s.coords.iter().flat_map(|v| v.to_le_bytes()))
            .collect();
        write_shards(dir, "coords", 2, 4, &coords, l);
        sl
    }

    fn open(dir: &Path) -> CohortStore {
        CohortStore::open(dir.to_str().unwrap()).unwrap()
    }

    /// The `(offset, nbytes)` index entry position of inner chunk `k` in a shard file.
    fn entry_at(file_len: usize, k: usize, l: Layout) -> usize {
        let index_len = 16 * (l.shard_rows / l.rows) + if l.index_crc { 4 } else { 0 };
        let start = if l.index_at_end {
            file_len - index_len
        } else {
            0
        };
        start + 16 * k
    }

    fn store_err(r: Result<BagData>) -> String {
        match r {
            Err(Error::Store(m)) => m,
            other => panic!("expected a StoreError, got {other:?}"),
        }
    }

    #[test]
    fn hand_written_shards_read_exactly_with_the_index_at_either_end() {
        for (index_crc, index_at_end) in [(true, true), (false, true), (true, false)] {
            let l = Layout {
                index_crc,
                index_at_end,
                ..LAYOUT
            };
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("s.zarr");
            let sl = write_sharded(&dir, l);
            let st = open(&dir);
            assert_eq!(st.shard_rows(), Some(8));
            for (i, s) in sl.iter().enumerate() {
                let bag = st.read(i, None, 0, 0).unwrap();
                assert_eq!(bag.features, s.feats);
                let c: Vec<i64> = s.coords.iter().map(|&v| i64::from(v)).collect();
                assert_eq!(bag.coords, c);
            }
            // Slide b is rows 5..16: inner chunks 1, 2, 3 (shard 0 holds 0 and 1, shard 1 holds
            // 2 and 3), each 4 rows x 3 float32 + crc32c = 52 bytes (coords: 4 x 2 x 4 + 4 = 36).
            let base = if index_at_end {
                0
            } else {
                16 * 2 + if index_crc { 4 } else { 0 }
            };
            let got: Vec<(String, u64, u64)> = st
                .file_ranges(1)
                .into_iter()
                .map(|r| {
                    let rel = r.path.strip_prefix(&dir).unwrap();
                    (rel.to_string_lossy().into_owned(), r.offset, r.len)
                })
                .collect();
            let want: Vec<(String, u64, u64)> = vec![
                ("features/c/0/0".into(), base + 52, 52),
                ("features/c/1/0".into(), base, 52),
                ("features/c/1/0".into(), base + 52, 52),
                ("coords/c/0/0".into(), base + 36, 36),
                ("coords/c/1/0".into(), base, 36),
                ("coords/c/1/0".into(), base + 36, 36),
            ];
            assert_eq!(got, want);
        }
    }

    #[test]
    fn a_flipped_byte_in_an_inner_chunk_or_its_checksum_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s.zarr");
        write_sharded(&dir, LAYOUT);
        let shard = dir.join("features/c/1/0");
        let good = std::fs::read(&shard).unwrap();
        // Inner chunk 1 of shard 1 is bytes 52..104: a value byte, then its crc32c trailer.
        for pos in [60, 101] {
            let mut bad = good.clone();
            bad[pos] ^= 0x10;
            std::fs::write(&shard, &bad).unwrap();
            let m = store_err(open(&dir).read(1, None, 0, 0));
            assert!(
                m.contains("s.zarr")
                    && m.contains("slide b")
                    && m.contains("features/c/1/0 (inner chunk 1)")
                    && m.contains("corrupt"),
                "{m}"
            );
        }
    }

    #[test]
    fn index_entries_are_checked_before_anything_is_read() {
        let l = Layout {
            index_crc: false,
            ..LAYOUT
        };
        let half = 1u64 << 63;
        let cases: Vec<(u64, u64, &str)> = vec![
            (0, half, "nbytes 9223372036854775808"),
            (0, u64::MAX, "nbytes 18446744073709551615"),
            (half, half, "offset 9223372036854775808"),
            (u64::MAX - 2, 8, "offset 18446744073709551613"),
            (52, 53, "nbytes 53"), // runs into the index at the end
            (u64::MAX, 52, "offset 18446744073709551615"), // half an empty marker
        ];
        for (offset, nbytes, needle) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("s.zarr");
            write_sharded(&dir, l);
            let shard = dir.join("features/c/1/0");
            let mut bytes = std::fs::read(&shard).unwrap();
            let at = entry_at(bytes.len(), 1, l);
            bytes[at..at + 8].copy_from_slice(&offset.to_le_bytes());
            bytes[at + 8..at + 16].copy_from_slice(&nbytes.to_le_bytes());
            std::fs::write(&shard, &bytes).unwrap();
            let st = open(&dir);
            let m = store_err(st.read(1, None, 0, 0));
            assert!(
                m.contains("slide b")
                    && m.contains("shard features/c/1/0")
                    && m.contains("inner chunk 1")
                    && m.contains(needle)
                    && m.contains("bytes 0..104"),
                "{m}"
            );
            // Read-ahead leaves the bad entry out instead of requesting it.
            assert!(st
                .file_ranges(1)
                .iter()
                .all(|r| r.len <= 52 && r.offset < 104));
            // Slides in other inner chunks still read.
            assert!(st.read(0, None, 0, 0).is_ok());
        }
    }

    #[test]
    fn an_entry_overlapping_an_index_at_the_start_is_an_error() {
        let l = Layout {
            index_crc: false,
            index_at_end: false,
            ..LAYOUT
        };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s.zarr");
        write_sharded(&dir, l);
        let shard = dir.join("features/c/1/0");
        let mut bytes = std::fs::read(&shard).unwrap();
        let at = entry_at(bytes.len(), 0, l);
        bytes[at..at + 8].copy_from_slice(&8u64.to_le_bytes()); // inside the 32-byte index
        std::fs::write(&shard, &bytes).unwrap();
        let m = store_err(open(&dir).read(1, None, 0, 0));
        assert!(
            m.contains("inner chunk 0") && m.contains("offset 8") && m.contains("bytes 32..136"),
            "{m}"
        );
    }

    #[test]
    fn empty_entries_and_missing_shards_are_missing_chunks() {
        let l = Layout {
            index_crc: false,
            ..LAYOUT
        };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s.zarr");
        write_sharded(&dir, l);
        let shard = dir.join("coords/c/1/0");
        let mut bytes = std::fs::read(&shard).unwrap();
        let at = entry_at(bytes.len(), 0, l);
        bytes[at..at + 16].fill(0xFF);
        std::fs::write(&shard, &bytes).unwrap();
        let m = store_err(open(&dir).read(1, None, 0, 0));
        assert!(
            m.contains("slide b")
                && m.contains("coords/c/1/0 (inner chunk 0) is missing")
                && m.contains("marks it empty"),
            "{m}"
        );
        std::fs::remove_file(&shard).unwrap();
        let m = store_err(open(&dir).read(1, None, 0, 0));
        assert!(
            m.contains("coords/c/1/0 (inner chunk 0) is missing") && m.contains("no shard file"),
            "{m}"
        );
        // Slide a lies in shard 0 only.
        assert!(open(&dir).read(0, None, 0, 0).is_ok());
    }

    #[test]
    fn corrupt_or_truncated_indexes_name_the_shard() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s.zarr");
        write_sharded(&dir, LAYOUT);
        let shard = dir.join("features/c/1/0");
        let good = std::fs::read(&shard).unwrap();
        let n = good.len();
        let mut flipped = good.clone();
        flipped[n - 10] ^= 1;
        for bad in [flipped, good[..n - 1].to_vec(), good[..10].to_vec(), vec![]] {
            std::fs::write(&shard, &bad).unwrap();
            let m = store_err(open(&dir).read(1, None, 0, 0));
            assert!(
                m.contains("slide b")
                    && m.contains("shard features/c/1/0 of array 'features'")
                    && m.contains("shard index"),
                "{m}"
            );
        }
    }
}
