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
