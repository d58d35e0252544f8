//! Inner chunks of sharded arrays (docs/FORMAT.md, "Sharded stores (format version 1.1)").
//!
//! A shard file holds inner chunks and an index of their byte ranges (Zarr v3 `sharding_indexed`).
//! This module reads the index once per shard (decoded by the index codec chain, its crc32c
//! checked), checks each entry against the file before anything is allocated or read, and decodes
//! every inner chunk whole with the inner codec chain, so that an inner chunk is verified exactly as
//! an unsharded chunk is: crc32c, zstd's checksum and the decoded size included.
//!
//! An inner chunk that the index marks empty, or whose shard file does not exist, is missing: the
//! store format does not allow fill values in place of features or coordinates (FORMAT.md).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::num::NonZeroU64;
use std::path::Path;
use std::sync::{Arc, RwLock};

use zarrs::array::codec::api::ArrayToBytesCodecTraits;
use zarrs::array::codec::CodecChain;
use zarrs::array::{ArrayBytes, BytesRepresentation, CodecOptions, DataType, FillValue};
use zarrs::metadata_ext::codec::sharding::{ShardingCodecConfigurationV1, ShardingIndexLocation};

use crate::error::one_line;

/// The index entry (both offset and nbytes) of an inner chunk that is not stored.
const EMPTY: u64 = u64::MAX;

/// Why an inner chunk could not be read. [`crate::store`] turns these into messages naming the
/// store, the slide, the shard file and the inner chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ShardError {
    /// The shard file does not exist.
    MissingShard,
    /// The shard index marks the inner chunk empty (not stored).
    Empty,
    /// The shard index cannot be read or does not decode (truncated file, checksum mismatch).
    BadIndex(String),
    /// The inner chunk's index entry points outside the file's chunk data.
    BadEntry {
        offset: u64,
        nbytes: u64,
        data_start: u64,
        data_end: u64,
    },
    /// The inner chunk's bytes cannot be read or do not decode.
    Corrupt(String),
}

/// A decoded shard index and the part of the file that may hold chunk data.
#[derive(Debug)]
struct ShardIndex {
    /// `(offset, nbytes)` pairs, one per inner chunk, in C order of the inner chunk grid.
    entries: Vec<u64>,
    /// First byte after the index (index at the start) or 0.
    data_start: u64,
    /// First byte of the index (index at the end) or the file length.
    data_end: u64,
}

impl ShardIndex {
    /// The checked byte range `(offset, nbytes)` of entry `k`.
    fn range(&self, k: u64) -> Result<(u64, u64), ShardError> {
        let at = usize::try_from(k).ok().and_then(|k| k.checked_mul(2));
        let (offset, nbytes) = match at.and_then(|i| self.entries.get(i..i.checked_add(2)?)) {
            Some(&[o, n]) => (o, n),
            _ => {
                return Err(ShardError::BadIndex(format!(
                    "it has no entry for inner chunk {k}"
                )))
            }
        };
        if offset == EMPTY && nbytes == EMPTY {
            return Err(ShardError::Empty);
        }
        match offset.checked_add(nbytes) {
            Some(end) if offset >= self.data_start && end <= self.data_end => Ok((offset, nbytes)),
            _ => Err(ShardError::BadEntry {
                offset,
                nbytes,
                data_start: self.data_start,
                data_end: self.data_end,
            }),
        }
    }
}

/// The sharding layout of one array and its cache of decoded shard indexes.
pub(crate) struct ShardedArray {
    /// Inner chunks along the rows of one shard.
    chunks_per_shard: u64,
    /// Index entries per row of inner chunks (shard columns / inner columns; 1 in momkd's stores).
    entries_per_row: u64,
    inner_shape: Vec<NonZeroU64>,
    inner_codecs: CodecChain,
    index_codecs: CodecChain,
    /// Shape of the decoded index: `(chunks_per_shard, entries_per_row, 2)`.
    index_shape: Vec<NonZeroU64>,
    /// Encoded size of the index in bytes.
    index_len: u64,
    index_at_end: bool,
    cache: RwLock<HashMap<u64, Arc<ShardIndex>>>,
}

impl std::fmt::Debug for ShardedArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedArray")
            .field("chunks_per_shard", &self.chunks_per_shard)
            .field("inner_shape", &self.inner_shape)
            .field("index_len", &self.index_len)
            .field("index_at_end", &self.index_at_end)
            .finish_non_exhaustive()
    }
}

fn non_zero(values: &[u64]) -> Option<Vec<NonZeroU64>> {
    values.iter().map(|&v| NonZeroU64::new(v)).collect()
}

impl ShardedArray {
    /// The layout of a 2-D array with shards of `shard_shape` and the sharding codec `config`.
    ///
    /// # Errors
    /// A one-line description of what is unsupported or inconsistent.
    pub(crate) fn new(
        shard_shape: &[u64],
        config: &ShardingCodecConfigurationV1,
    ) -> Result<ShardedArray, String> {
        let inner: Vec<u64> = config.chunk_shape.iter().map(|v| v.get()).collect();
        if shard_shape.len() != 2 || inner.len() != 2 {
            return Err(format!(
                "shard shape {shard_shape:?} and inner chunk shape {inner:?} must both be 2-D"
            ));
        }
        if inner.contains(&0) || shard_shape.iter().zip(&inner).any(|(s, i)| s % i != 0) {
            return Err(format!(
                "shard shape {shard_shape:?} is not a multiple of the inner chunk shape {inner:?}"
            ));
        }
        let chunks_per_shard = shard_shape[0] / inner[0];
        let entries_per_row = shard_shape[1] / inner[1];
        let inner_codecs = CodecChain::from_metadata(&config.codecs)
            .map_err(|e| format!("inner codecs: {}", one_line(e)))?;
        let index_codecs = CodecChain::from_metadata(&config.index_codecs)
            .map_err(|e| format!("index codecs: {}", one_line(e)))?;
        let index_shape = non_zero(&[chunks_per_shard, entries_per_row, 2])
            .ok_or_else(|| "empty shard index shape".to_string())?;
        let index_len = match index_codecs.encoded_representation(
            &index_shape,
            &zarrs::array::data_type::uint64(),
            &FillValue::from(EMPTY),
        ) {
            Ok(BytesRepresentation::FixedSize(n)) => n,
            Ok(_) => return Err("the index codecs do not have a fixed encoded size".into()),
            Err(e) => return Err(format!("index codecs: {}", one_line(e))),
        };
        Ok(ShardedArray {
            chunks_per_shard,
            entries_per_row,
            inner_shape: non_zero(&inner).ok_or_else(|| "empty inner chunk shape".to_string())?,
            inner_codecs,
            index_codecs,
            index_shape,
            index_len,
            index_at_end: config.index_location == ShardingIndexLocation::End,
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// Inner chunks (row blocks) per shard.
    pub(crate) fn chunks_per_shard(&self) -> u64 {
        self.chunks_per_shard
    }

    /// The shard holding row block `chunk`, and the block's index entry in it.
    fn locate(&self, chunk: u64) -> (u64, u64) {
        (
            chunk / self.chunks_per_shard,
            (chunk % self.chunks_per_shard).saturating_mul(self.entries_per_row),
        )
    }

    /// The decoded index of shard `shard` (file `path`), read once and cached.
    fn index(&self, path: &Path, shard: u64) -> Result<Arc<ShardIndex>, ShardError> {
        if let Some(found) = self.cache.read().ok().and_then(|c| c.get(&shard).cloned()) {
            return Ok(found);
        }
        let index = Arc::new(self.read_index(path)?);
        if let Ok(mut cache) = self.cache.write() {
            cache.insert(shard, Arc::clone(&index));
        }
        Ok(index)
    }

    fn read_index(&self, path: &Path) -> Result<ShardIndex, ShardError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ShardError::MissingShard)
            }
            Err(e) => {
                return Err(ShardError::BadIndex(format!(
                    "cannot open: {}",
                    one_line(e)
                )))
            }
        };
        let len = file
            .metadata()
            .map_err(|e| ShardError::BadIndex(format!("cannot stat: {}", one_line(e))))?
            .len();
        if len < self.index_len {
            return Err(ShardError::BadIndex(format!(
                "the file has {len} bytes, fewer than the {} bytes of its index",
                self.index_len
            )));
        }
        let at = if self.index_at_end {
            len - self.index_len
        } else {
            0
        };
        // Bounded by the file's length (checked above).
        let mut raw = vec![0u8; to_usize(self.index_len)?];
        read_at(&file, &mut raw, at)
            .map_err(|e| ShardError::BadIndex(format!("cannot read: {}", one_line(e))))?;
        let decoded = self
            .index_codecs
            .decode(
                Cow::Owned(raw),
                &self.index_shape,
                &zarrs::array::data_type::uint64(),
                &FillValue::from(EMPTY),
                &CodecOptions::default(),
            )
            .and_then(|b| b.into_fixed().map(Cow::into_owned).map_err(Into::into))
            .map_err(|e| ShardError::BadIndex(one_line(e)))?;
        let (words, rest) = decoded.as_chunks::<8>();
        let n = self.index_shape.iter().map(|v| v.get()).product::<u64>();
        if !rest.is_empty() || words.len() as u64 != n {
            return Err(ShardError::BadIndex(format!(
                "decoded to {} bytes, expected {}",
                decoded.len(),
                n * 8
            )));
        }
        let entries = words.iter().map(|w| u64::from_ne_bytes(*w)).collect();
        let (data_start, data_end) = if self.index_at_end {
            (0, at)
        } else {
            (self.index_len, len)
        };
        Ok(ShardIndex {
            entries,
            data_start,
            data_end,
        })
    }

    /// The checked byte range `(offset, nbytes)` of row block `chunk` in its shard file `path`.
    ///
    /// # Errors
    /// Every [`ShardError`] but [`ShardError::Corrupt`].
    pub(crate) fn byte_range(&self, path: &Path, chunk: u64) -> Result<(u64, u64), ShardError> {
        let (shard, entry) = self.locate(chunk);
        self.index(path, shard)?.range(entry)
    }

    /// Read and decode row block `chunk` from its shard file `path`, verified by the inner codec
    /// chain exactly as an unsharded chunk is.
    ///
    /// # Errors
    /// A [`ShardError`] saying what is wrong.
    pub(crate) fn read(
        &self,
        path: &Path,
        chunk: u64,
        data_type: &DataType,
        fill_value: &FillValue,
        options: &CodecOptions,
    ) -> Result<ArrayBytes<'static>, ShardError> {
        let (offset, nbytes) = self.byte_range(path, chunk)?;
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ShardError::MissingShard)
            }
            Err(e) => return Err(ShardError::Corrupt(format!("cannot open: {}", one_line(e)))),
        };
        // The entry lies inside the file (checked against its length), so this is bounded.
        let mut raw = vec![0u8; to_usize(nbytes)?];
        read_at(&file, &mut raw, offset).map_err(|e| {
            ShardError::Corrupt(format!(
                "cannot read bytes {offset}..{} of the shard: {}",
                offset + nbytes,
                one_line(e)
            ))
        })?;
        self.inner_codecs
            .decode(
                Cow::Owned(raw),
                &self.inner_shape,
                data_type,
                fill_value,
                options,
            )
            .map_err(|e| ShardError::Corrupt(one_line(e)))
    }
}

fn to_usize(n: u64) -> Result<usize, ShardError> {
    usize::try_from(n).map_err(|_| ShardError::Corrupt(format!("{n} bytes do not fit in memory")))
}

/// Read exactly `buf.len()` bytes at `offset`.
#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

/// Read exactly `buf.len()` bytes at `offset`.
#[cfg(not(unix))]
fn read_at(mut file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

/// Sharded stores written by hand from FORMAT.md and the Zarr v3 `sharding_indexed` layout
/// (inner chunks, then an index of little-endian `(offset, nbytes)` pairs and its crc32c),
/// independent of zarrs' sharding code.
#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::error::{Error, Result};
    use crate::store::read_tests::{slides, write_store, Slide};
    use crate::store::{BagData, CohortStore};

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
