//! Reading bags: the chunks (or inner chunks) holding a bag's rows, decoded in parallel on the
//! caller's rayon pool with the values converted and checked in the same pass, failures named by
//! store, slide and chunk key; and the file byte ranges a read touches, for read-ahead.

use std::path::{Path, PathBuf};

use half::f16;
use rayon::prelude::*;
use zarrs::array::{Array, ArrayBytes, ArrayShardedExt, CodecOptions};
use zarrs::filesystem::FilesystemStore;

use super::meta::ArrayMeta;
use super::shard::{ShardError, ShardedArray};
use super::{BagData, CohortStore, CoordDtype, FeatureBuf, FeatureDtype, OutDtype};
use crate::convert::{
    f16_copy_checked, f16_to_f32_checked, f32_copy_checked, f32_to_f16_into_checked,
};
use crate::error::{one_line, Error, Result};
use crate::subsample::bag_rows;

/// One row-chunked array of the store (`features` or `coords`).
pub(super) struct RowArray {
    name: &'static str,
    array: Array<FilesystemStore>,
    /// The store's root folder (shard files are read from it directly).
    root: PathBuf,
    /// Rows per read unit (the inner chunk of a sharded array).
    chunk_rows: u64,
    pub(super) shards: Option<ShardedArray>,
}

impl RowArray {
    pub(super) fn new(
        store: &str,
        root: &Path,
        name: &'static str,
        array: Array<FilesystemStore>,
        meta: &ArrayMeta,
    ) -> Result<RowArray> {
        let chunk_rows = meta.read_chunk_shape()[0];
        let shards = match &meta.sharding {
            None => None,
            Some(config) => {
                if !array.is_exclusively_sharded() {
                    return Err(Error::Store(format!(
                        "store {store}: array '{name}': a sharded array must have 'sharding_indexed' as its only codec"
                    )));
                }
                Some(ShardedArray::new(&meta.chunk_shape, config).map_err(|e| {
                    Error::Store(format!(
                        "store {store}: array '{name}': unsupported sharding codec: {e}"
                    ))
                })?)
            }
        };
        Ok(RowArray {
            name,
            array,
            root: root.to_path_buf(),
            chunk_rows,
            shards,
        })
    }

    /// The storage key of the file holding read unit `chunk` (its shard file, if sharded).
    fn file_key(&self, chunk: u64) -> String {
        let outer = match &self.shards {
            None => chunk,
            Some(s) => chunk / s.chunks_per_shard(),
        };
        self.array.chunk_key(&[outer, 0]).to_string()
    }

    /// The storage key of the file holding read unit `chunk`, and the unit's place in it.
    fn label(&self, chunk: u64) -> String {
        match &self.shards {
            None => self.file_key(chunk),
            Some(s) => format!(
                "{} (inner chunk {})",
                self.file_key(chunk),
                chunk % s.chunks_per_shard()
            ),
        }
    }

    /// Read and decode read unit `chunk`; errors name the store, the slide and the chunk (and the
    /// inner chunk of a shard).
    fn fetch(&self, chunk: u64, ctx: &ReadCtx<'_>) -> Result<ArrayBytes<'static>> {
        let options = CodecOptions::default().with_concurrent_target(1);
        let prefix = || format!("store {}: slide {}", ctx.store, ctx.slide);
        let Some(s) = &self.shards else {
            return match self
                .array
                .retrieve_chunk_if_exists_opt::<ArrayBytes<'static>>(&[chunk, 0], &options)
            {
                Ok(Some(b)) => Ok(b),
                Ok(None) => Err(Error::Store(format!(
                    "{}: chunk {} is missing",
                    prefix(),
                    self.label(chunk)
                ))),
                Err(e) => Err(Error::Store(format!(
                    "{}: chunk {} is corrupt or truncated: {}",
                    prefix(),
                    self.label(chunk),
                    one_line(e)
                ))),
            };
        };
        let path = self.root.join(self.file_key(chunk));
        s.read(
            &path,
            chunk,
            self.array.data_type(),
            self.array.fill_value(),
            &options,
        )
        .map_err(|e| self.shard_error(e, chunk, &prefix()))
    }

    /// The message of a failed inner chunk read, after `prefix` (store and slide).
    fn shard_error(&self, e: ShardError, chunk: u64, prefix: &str) -> Error {
        let label = self.label(chunk);
        let shard = self.file_key(chunk);
        let name = self.name;
        Error::Store(match e {
            ShardError::MissingShard => {
                format!("{prefix}: chunk {label} is missing (no shard file {shard})")
            }
            ShardError::Empty => format!(
                "{prefix}: chunk {label} is missing: the shard index marks it empty, and a cohort \
                 store keeps every inner chunk (zarr-python leaves out chunks equal to the fill \
                 value unless the array is written with write_empty_chunks=True)"
            ),
            ShardError::BadIndex(why) => format!(
                "{prefix}: shard {shard} of array '{name}' has a corrupt or truncated shard index: {why}"
            ),
            ShardError::BadEntry {
                offset,
                nbytes,
                data_start,
                data_end,
            } => format!(
                "{prefix}: shard {shard} of array '{name}' has a corrupt shard index: the entry of \
                 inner chunk {} (offset {offset}, nbytes {nbytes}) lies outside the chunk data \
                 (bytes {data_start}..{data_end} of the file)",
                chunk % self.shards.as_ref().map_or(1, ShardedArray::chunks_per_shard)
            ),
            ShardError::Corrupt(why) => {
                format!("{prefix}: chunk {label} is corrupt or truncated: {why}")
            }
        })
    }

    /// The file byte ranges holding read units `first ..= last`, appended to `out` (one range per
    /// chunk file or inner chunk). Best effort: an unreadable shard index or an index entry
    /// outside its file leaves its chunks out, and the read itself then reports the problem.
    fn file_ranges(&self, first: u64, last: u64, out: &mut Vec<FileRange>) {
        for c in first..=last {
            let path = self.root.join(self.file_key(c));
            match &self.shards {
                None => out.push(FileRange {
                    path,
                    offset: 0,
                    len: 0,
                }),
                // One range per inner chunk (not one per shard span): the I/O threads then read a
                // bag's part of a shard as several parallel requests, as they do a bag's chunk
                // files. (Merging neighbours into ranges of up to 4 MiB measured no faster.)
                Some(s) => {
                    if let Ok((offset, len)) = s.byte_range(&path, c) {
                        if len > 0 {
                            out.push(FileRange { path, offset, len });
                        }
                    }
                }
            }
        }
    }
}

/// A byte range of one file of the store (`len == 0`: to the end of the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRange {
    /// The file.
    pub path: PathBuf,
    /// First byte.
    pub offset: u64,
    /// Number of bytes; `0` means to the end of the file.
    pub len: u64,
}

impl FileRange {
    /// Ask the kernel to read this range into the page cache (`posix_fadvise(WILLNEED)`; best
    /// effort: errors are ignored, the read itself reports them). On Linux the call returns once
    /// the reads are issued, which can take as long as the read: several threads calling it keep
    /// several reads in flight.
    pub fn will_need(&self) {
        will_need(&self.path, self.offset, self.len);
    }
}

/// `posix_fadvise(WILLNEED)` on a byte range of a file (`len == 0`: to the end).
#[cfg(target_os = "linux")]
fn will_need(path: &Path, offset: u64, len: u64) {
    use std::os::unix::io::AsRawFd;
    if let Ok(file) = std::fs::File::open(path) {
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: a plain syscall on a file descriptor that stays open for its duration.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn will_need(_path: &Path, _offset: u64, _len: u64) {}

/// The rows of one chunk that one read task copies.
#[derive(Debug)]
enum ChunkRows {
    /// `len` consecutive rows from `first` (chunk-local).
    Run { first: usize, len: usize },
    /// These chunk-local rows, increasing.
    Picked(Vec<usize>),
}

impl ChunkRows {
    fn len(&self) -> usize {
        match self {
            ChunkRows::Run { len, .. } => *len,
            ChunkRows::Picked(v) => v.len(),
        }
    }
}

/// One chunk to decode and the output rows it fills.
#[derive(Debug)]
struct ChunkTask {
    chunk: u64,
    /// First output row filled by this task.
    out_row: usize,
    rows: ChunkRows,
}

/// Split the rows `start .. start + n` (optionally only the slide-local rows `picked`) into
/// per-chunk tasks for an array with `chunk_rows` rows per chunk.
fn plan_chunks(start: u64, n: usize, picked: Option<&[usize]>, chunk_rows: u64) -> Vec<ChunkTask> {
    let mut tasks: Vec<ChunkTask> = Vec::new();
    match picked {
        None => {
            let end = start + n as u64;
            let mut row = start;
            while row < end {
                let chunk = row / chunk_rows;
                let chunk_end = ((chunk + 1) * chunk_rows).min(end);
                tasks.push(ChunkTask {
                    chunk,
                    out_row: (row - start) as usize,
                    rows: ChunkRows::Run {
                        first: (row - chunk * chunk_rows) as usize,
                        len: (chunk_end - row) as usize,
                    },
                });
                row = chunk_end;
            }
        }
        Some(rows) => {
            for (out, &local) in rows.iter().enumerate() {
                let g = start + local as u64;
                let chunk = g / chunk_rows;
                let in_chunk = (g - chunk * chunk_rows) as usize;
                match tasks.last_mut() {
                    Some(t) if t.chunk == chunk => {
                        if let ChunkRows::Picked(v) = &mut t.rows {
                            v.push(in_chunk);
                        }
                    }
                    _ => tasks.push(ChunkTask {
                        chunk,
                        out_row: out,
                        rows: ChunkRows::Picked(vec![in_chunk]),
                    }),
                }
            }
        }
    }
    tasks
}

/// Context for messages about one bag read.
struct ReadCtx<'a> {
    store: &'a str,
    slide: &'a str,
    /// What a rejected feature value is called in messages.
    bad_value: &'static str,
    /// Slide-local row of every output row (`None`: output row == slide row).
    picked: Option<&'a [usize]>,
}

impl ReadCtx<'_> {
    fn slide_row(&self, out_row: usize) -> usize {
        self.picked.map_or(out_row, |p| p[out_row])
    }
}

/// Decode the chunks listed in `tasks` of `array` (with `ncols` columns) into `out`, converting each
/// source row slice with `convert`, which returns the first bad element index of its input.
fn read_rows<T, O, F>(
    array: &RowArray,
    ncols: usize,
    tasks: &[ChunkTask],
    out: &mut [O],
    ctx: &ReadCtx<'_>,
    convert: F,
) -> Result<()>
where
    T: bytemuck::Pod + Send + Sync,
    O: Send,
    F: Fn(&[T], &mut [O]) -> Option<usize> + Sync,
{
    let mut pieces: Vec<(&ChunkTask, &mut [O])> = Vec::with_capacity(tasks.len());
    let mut rest = out;
    for t in tasks {
        let (head, tail) = rest.split_at_mut(t.rows.len() * ncols);
        pieces.push((t, head));
        rest = tail;
    }
    let results: Vec<Result<()>> = pieces
        .into_par_iter()
        .map(|(task, dst)| {
            let key = array.label(task.chunk);
            let bytes = array.fetch(task.chunk, ctx)?;
            let raw = bytes.into_fixed().map_err(|e| {
                Error::Store(format!(
                    "store {}: slide {}: chunk {key}: {}",
                    ctx.store,
                    ctx.slide,
                    one_line(e)
                ))
            })?;
            // Decoded chunk bytes are native-endian elements; view them in place when aligned.
            let copied: Vec<T>;
            let data: &[T] = match bytemuck::try_cast_slice::<u8, T>(&raw) {
                Ok(view) => view,
                Err(_) if raw.len() % std::mem::size_of::<T>() == 0 => {
                    copied = bytemuck::pod_collect_to_vec(&raw);
                    &copied
                }
                Err(_) => {
                    return Err(Error::Store(format!(
                        "store {}: slide {}: chunk {key} decoded to {} bytes, not a whole number of elements",
                        ctx.store,
                        ctx.slide,
                        raw.len()
                    )))
                }
            };
            let bad_row = |out_offset: usize| -> Error {
                let out_row = task.out_row + out_offset;
                Error::Data(format!(
                    "store {}: slide {}: {} in row {} (chunk {key})",
                    ctx.store,
                    ctx.slide,
                    ctx.bad_value,
                    ctx.slide_row(out_row)
                ))
            };
            let short = |need: usize| -> Error {
                Error::Store(format!(
                    "store {}: slide {}: chunk {key} decoded to {} values, expected at least {need}",
                    ctx.store,
                    ctx.slide,
                    data.len()
                ))
            };
            match &task.rows {
                ChunkRows::Run { first, len } => {
                    let lo = first * ncols;
                    let hi = (first + len) * ncols;
                    let src = data.get(lo..hi).ok_or_else(|| short(hi))?;
                    if let Some(bad) = convert(src, dst) {
                        return Err(bad_row(bad / ncols));
                    }
                }
                ChunkRows::Picked(rows) => {
                    for (k, (&r, d)) in rows.iter().zip(dst.chunks_mut(ncols)).enumerate() {
                        let src = data
                            .get(r * ncols..(r + 1) * ncols)
                            .ok_or_else(|| short((r + 1) * ncols))?;
                        if convert(src, d).is_some() {
                            return Err(bad_row(k));
                        }
                    }
                }
            }
            Ok(())
        })
        .collect();
    results.into_iter().collect()
}

impl CohortStore {
    /// Ask the kernel to start reading the chunks of slide `index` into the page cache, so that
    /// many reads are in flight while the decoding threads work on earlier bags. Best effort: it
    /// never fails (a bad index or an unreadable file is reported by the read itself).
    pub fn advise(&self, index: usize) {
        for range in self.file_ranges(index) {
            range.will_need();
        }
    }

    /// The file byte ranges that reading bag `index` touches (features and coordinates), in
    /// storage order; empty for an index outside the store.
    pub fn file_ranges(&self, index: usize) -> Vec<FileRange> {
        let mut out = Vec::new();
        if index >= self.slide_ids.len() || self.offsets[index + 1] == self.offsets[index] {
            return out;
        }
        let (start, end) = (
            self.offsets[index] as u64,
            self.offsets[index + 1] as u64 - 1,
        );
        for arr in [&self.features, &self.coords] {
            arr.file_ranges(start / arr.chunk_rows, end / arr.chunk_rows, &mut out);
        }
        out
    }

    /// Read slide `index`, optionally subsampled to `max_patches` rows (deterministic in
    /// `(seed, epoch, index)`, rows kept in storage order). Runs its parallel decode on the rayon
    /// pool that is current when called (use `pool.install`).
    ///
    /// # Errors
    /// [`Error::SlideNotFound`], [`Error::Config`] for `max_patches == Some(0)`, [`Error::Store`]
    /// for a missing/corrupt chunk, [`Error::Data`] for a non-finite feature value.
    pub fn read(
        &self,
        index: usize,
        max_patches: Option<usize>,
        seed: u64,
        epoch: u64,
    ) -> Result<BagData> {
        self.read_as(index, max_patches, seed, epoch, OutDtype::F32)
    }

    /// [`CohortStore::read`] handing the features over as `out` (float16 from a float32 store is
    /// overflow-checked: a value above 65504 is an [`Error::Data`] naming the row).
    ///
    /// # Errors
    /// As [`CohortStore::read`].
    pub fn read_as(
        &self,
        index: usize,
        max_patches: Option<usize>,
        seed: u64,
        epoch: u64,
        out: OutDtype,
    ) -> Result<BagData> {
        let p = self.bag_len(index)?;
        if max_patches == Some(0) {
            return Err(Error::Config("max_patches must be at least 1".into()));
        }
        let picked = bag_rows(p, max_patches, seed, epoch, index);
        let n_rows = picked.as_ref().map_or(p, Vec::len);
        let start = self.offsets[index] as u64;
        let ctx = ReadCtx {
            store: &self.path,
            slide: &self.slide_ids[index],
            bad_value: match (self.feat_dtype, out) {
                (FeatureDtype::F32, OutDtype::F16) => {
                    "non-finite feature value, or one that overflows float16 (|x| > 65504),"
                }
                _ => "non-finite feature value",
            },
            picked: picked.as_deref(),
        };
        let d = self.feature_dim;
        let ftasks = plan_chunks(start, p, picked.as_deref(), self.feat_chunk_rows);
        let mut coords = vec![0i64; n_rows * 2];
        let ctasks = plan_chunks(start, p, picked.as_deref(), self.coord_chunk_rows);
        let fa = &self.features;
        let (fres, cres) = rayon::join(
            || -> Result<FeatureBuf> {
                Ok(match (self.feat_dtype, out) {
                    (FeatureDtype::F16, OutDtype::F32) => {
                        let mut v = vec![0f32; n_rows * d];
                        read_rows::<f16, f32, _>(fa, d, &ftasks, &mut v, &ctx, f16_to_f32_checked)?;
                        FeatureBuf::F32(v)
                    }
                    (FeatureDtype::F32, OutDtype::F32) => {
                        let mut v = vec![0f32; n_rows * d];
                        read_rows::<f32, f32, _>(fa, d, &ftasks, &mut v, &ctx, f32_copy_checked)?;
                        FeatureBuf::F32(v)
                    }
                    (FeatureDtype::F16, OutDtype::F16) => {
                        let mut v = vec![f16::ZERO; n_rows * d];
                        read_rows::<f16, f16, _>(fa, d, &ftasks, &mut v, &ctx, f16_copy_checked)?;
                        FeatureBuf::F16(v)
                    }
                    (FeatureDtype::F32, OutDtype::F16) => {
                        let mut v = vec![f16::ZERO; n_rows * d];
                        read_rows::<f32, f16, _>(
                            fa,
                            d,
                            &ftasks,
                            &mut v,
                            &ctx,
                            f32_to_f16_into_checked,
                        )?;
                        FeatureBuf::F16(v)
                    }
                })
            },
            || match self.coord_dtype {
                CoordDtype::I32 => read_rows::<i32, i64, _>(
                    &self.coords,
                    2,
                    &ctasks,
                    &mut coords,
                    &ctx,
                    |src, dst| {
                        for (o, &v) in dst.iter_mut().zip(src) {
                            *o = i64::from(v);
                        }
                        None
                    },
                ),
                CoordDtype::I64 => read_rows::<i64, i64, _>(
                    &self.coords,
                    2,
                    &ctasks,
                    &mut coords,
                    &ctx,
                    |src, dst| {
                        dst.copy_from_slice(src);
                        None
                    },
                ),
            },
        );
        let features = fres?;
        cres?;
        Ok(BagData {
            n_rows,
            dim: d,
            features,
            coords,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_contiguous_rows_across_chunks() {
        // Rows 5..17 with 4 rows per chunk: chunks 1 (5..8), 2 (8..12), 3 (12..16), 4 (16..17).
        let t = plan_chunks(5, 12, None, 4);
        let got: Vec<(u64, usize, usize, usize)> = t
            .iter()
            .map(|t| match t.rows {
                ChunkRows::Run { first, len } => (t.chunk, t.out_row, first, len),
                ChunkRows::Picked(_) => panic!("expected runs"),
            })
            .collect();
        assert_eq!(
            got,
            vec![(1, 0, 1, 3), (2, 3, 0, 4), (3, 7, 0, 4), (4, 11, 0, 1)]
        );
    }

    #[test]
    fn plan_picked_rows_groups_by_chunk() {
        // Slide starts at global row 6; local rows 0, 1, 5, 6 -> global 6, 7, 11, 12; chunk size 4.
        let t = plan_chunks(6, 10, Some(&[0, 1, 5, 6]), 4);
        assert_eq!(t.len(), 3);
        assert_eq!((t[0].chunk, t[0].out_row), (1, 0));
        assert!(matches!(&t[0].rows, ChunkRows::Picked(v) if v == &vec![2, 3]));
        assert_eq!((t[1].chunk, t[1].out_row), (2, 2));
        assert!(matches!(&t[1].rows, ChunkRows::Picked(v) if v == &vec![3]));
        assert_eq!((t[2].chunk, t[2].out_row), (3, 3));
        assert!(matches!(&t[2].rows, ChunkRows::Picked(v) if v == &vec![0]));
    }
}

/// Stores written by hand from FORMAT.md (JSON documents + zstd chunk files), independent of zarrs.
#[cfg(test)]
pub(crate) mod read_tests {
    use super::*;
    use std::io::Write;

    pub(crate) struct Slide {
        pub id: &'static str,
        pub feats: Vec<f32>,
        pub coords: Vec<i32>,
    }

    fn zstd_bytes(raw: &[u8]) -> Vec<u8> {
        let mut enc = zstd::Encoder::new(Vec::new(), 3).unwrap();
        enc.include_checksum(true).unwrap();
        enc.write_all(raw).unwrap();
        enc.finish().unwrap()
    }

    pub(crate) fn array_json(shape: &[usize], chunks: &[usize], dtype: &str) -> String {
        serde_json::json!({
            "zarr_format": 3, "node_type": "array", "shape": shape, "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0,
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 3, "checksum": true}}],
            "attributes": {}
        })
        .to_string()
    }

    /// Write `values` (row-major, `cols` columns) as chunks of `rows` rows; edge chunk zero-padded.
    fn write_chunks(dir: &Path, name: &str, cols: usize, rows: usize, values: &[u8], item: usize) {
        let chunk_bytes = rows * cols.max(1) * item;
        let n_chunks = values.len().div_ceil(chunk_bytes).max(1);
        for c in 0..n_chunks {
            let mut raw = vec![0u8; chunk_bytes];
            let lo = c * chunk_bytes;
            let hi = ((c + 1) * chunk_bytes).min(values.len());
            raw[..hi - lo].copy_from_slice(&values[lo..hi]);
            let path = if cols == 0 {
                dir.join(name).join("c").join(c.to_string())
            } else {
                dir.join(name).join("c").join(c.to_string()).join("0")
            };
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, zstd_bytes(&raw)).unwrap();
        }
    }

    pub(crate) fn write_store(dir: &Path, slides: &[Slide], d: usize, rows: usize, use_f16: bool) {
        let n: usize = slides.iter().map(|s| s.coords.len() / 2).sum();
        let ids: Vec<&str> = slides.iter().map(|s| s.id).collect();
        let group = serde_json::json!({
            "zarr_format": 3, "node_type": "group",
            "attributes": {"momkd": {
                "format": "momkd-cohort", "format_version": 1, "complete": true,
                "feature_dim": d, "n_slides": slides.len(), "n_patches": n, "slide_ids": ids,
                "encoder": "test"}}
        });
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("zarr.json"), group.to_string()).unwrap();
        for name in ["features", "coords", "offsets"] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
        }
        let dtype = if use_f16 { "float16" } else { "float32" };
        std::fs::write(
            dir.join("features/zarr.json"),
            array_json(&[n, d], &[rows, d], dtype),
        )
        .unwrap();
        std::fs::write(
            dir.join("coords/zarr.json"),
            array_json(&[n, 2], &[rows, 2], "int32"),
        )
        .unwrap();
        std::fs::write(
            dir.join("offsets/zarr.json"),
            array_json(&[slides.len() + 1], &[2], "int64"),
        )
        .unwrap();
        let feats: Vec<u8> = slides
            .iter()
            .flat_map(|s| s.feats.iter())
            .flat_map(|&v| {
                if use_f16 {
                    f16::from_f32(v).to_le_bytes().to_vec()
                } else {
                    v.to_le_bytes().to_vec()
                }
            })
            .collect();
        write_chunks(
            dir,
            "features",
            d,
            rows,
            &feats,
            if use_f16 { 2 } else { 4 },
        );
        let coords: Vec<u8> = slides
            .iter()
            .flat_map(|s| s.coords.iter())
            .flat_map(|v| v.to_le_bytes())
            .collect();
        write_chunks(dir, "coords", 2, rows, &coords, 4);
        let mut offsets = vec![0i64];
        for s in slides {
            offsets.push(offsets.last().unwrap() + (s.coords.len() / 2) as i64);
        }
        let off: Vec<u8> = offsets.iter().flat_map(|v| v.to_le_bytes()).collect();
        write_chunks(dir, "offsets", 0, 2, &off, 8);
    }

    pub(crate) fn slides(d: usize) -> Vec<Slide> {
        let mk = |id: &'static str, p: usize, base: f32| Slide {
            id,
            feats: (0..p * d).map(|i| base + i as f32 * 0.25).collect(),
            coords: (0..p)
                .flat_map(|i| [i as i32 * 256, (i % 3) as i32 * 256])
                .collect(),
        };
        vec![mk("a", 5, 1.0), mk("b", 11, -3.0), mk("c", 2, 100.0)]
    }

    fn expect_bag(s: &Slide, d: usize, bag: &BagData) {
        assert_eq!(bag.n_rows, s.coords.len() / 2);
        assert_eq!(bag.dim, d);
        assert_eq!(bag.features, s.feats);
        let c: Vec<i64> = s.coords.iter().map(|&v| i64::from(v)).collect();
        assert_eq!(bag.coords, c);
    }

    #[test]
    fn file_ranges_are_the_chunk_files_a_read_touches() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s.zarr");
        write_store(&dir, &slides(3), 3, 4, true);
        let st = CohortStore::open(dir.to_str().unwrap()).unwrap();
        // Slide b is rows 5..16 of the store: chunks 1, 2 and 3 of 4 rows, in both arrays.
        let got: Vec<(String, u64, u64)> = st
            .file_ranges(1)
            .into_iter()
            .map(|r| {
                let rel = r
                    .path
                    .strip_prefix(&dir)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                (rel, r.offset, r.len)
            })
            .collect();
        let want: Vec<(String, u64, u64)> = ["features", "coords"]
            .iter()
            .flat_map(|a| (1..=3).map(move |c| (format!("{a}/c/{c}/0"), 0, 0)))
            .collect();
        assert_eq!(got, want);
        for r in st.file_ranges(1) {
            assert!(r.path.is_file(), "{}", r.path.display());
        }
        assert!(st.file_ranges(3).is_empty());
    }

    #[test]
    fn reads_every_slide_across_chunk_boundaries() {
        for (use_f16, rows) in [(true, 4), (false, 3), (true, 64)] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("s.zarr");
            let d = 3;
            let sl = slides(d);
            write_store(&dir, &sl, d, rows, use_f16);
            let st = CohortStore::open(dir.to_str().unwrap()).unwrap();
            assert_eq!(st.len(), 3);
            assert_eq!(st.offsets(), &[0, 5, 16, 18]);
            assert_eq!(
                st.dtype(),
                if use_f16 {
                    FeatureDtype::F16
                } else {
                    FeatureDtype::F32
                }
            );
            assert_eq!(st.index_of("b").unwrap(), 1);
            assert!(matches!(st.index_of("zz"), Err(Error::SlideNotFound(_))));
            for (i, s) in sl.iter().enumerate() {
                expect_bag(s, d, &st.read(i, None, 0, 0).unwrap());
            }
            // Subsampled rows are exactly the picked rows of the full bag.
            let full = st.read(1, None, 0, 0).unwrap();
            let sub = st.read(1, Some(4), 7, 1).unwrap();
            let picked = bag_rows(11, Some(4), 7, 1, 1).unwrap();
            assert_eq!(sub.n_rows, 4);
            for (k, &r) in picked.iter().enumerate() {
                assert_eq!(
                    sub.features.as_f32().unwrap()[k * d..(k + 1) * d],
                    full.features.as_f32().unwrap()[r * d..(r + 1) * d]
                );
                assert_eq!(sub.coords[k * 2..k * 2 + 2], full.coords[r * 2..r * 2 + 2]);
            }
        }
    }

    #[test]
    fn missing_corrupt_and_nan_chunks_name_the_chunk() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s.zarr");
        let d = 3;
        let mut sl = slides(d);
        sl[2].feats[4] = f32::NAN; // slide c, row 1
        write_store(&dir, &sl, d, 4, true);
        let st = CohortStore::open(dir.to_str().unwrap()).unwrap();
        let err = st.read(2, None, 0, 0).unwrap_err();
        assert!(
            matches!(&err, Error::Data(m) if m.contains("slide c") && m.contains("row 1") && m.contains("features/c/4/0")),
            "{err:?}"
        );
        std::fs::remove_file(dir.join("features/c/3/0")).unwrap();
        let err = st.read(1, None, 0, 0).unwrap_err();
        assert!(
            matches!(&err, Error::Store(m) if m.contains("slide b") && m.contains("features/c/3/0") && m.contains("missing")),
            "{err:?}"
        );
        let chunk = dir.join("coords/c/0/0");
        let bytes = std::fs::read(&chunk).unwrap();
        std::fs::write(&chunk, &bytes[..bytes.len() / 2]).unwrap();
        let err = st.read(0, None, 0, 0).unwrap_err();
        assert!(
            matches!(&err, Error::Store(m) if m.contains("slide a") && m.contains("coords/c/0/0")),
            "{err:?}"
        );
    }
}
