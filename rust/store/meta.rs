//! Opening a store: everything docs/FORMAT.md lists under "What opening a store checks".
//!
//! [`CohortStore::open`] reads the root `zarr.json` and checks its momkd header (format, version,
//! completeness, sizes, slide ids), parses and checks each array's `zarr.json` (shape, data type,
//! chunk grid, codec chains, the sharding codec's configuration), opens the arrays with `zarrs` and
//! reads and checks `offsets`. Every message names the store and the offending key or array.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};
use zarrs::array::{Array, CodecOptions};
use zarrs::filesystem::FilesystemStore;
use zarrs::metadata_ext::codec::sharding::ShardingCodecConfigurationV1;

use super::read::RowArray;
use super::{CohortStore, CoordDtype, FeatureDtype};
use crate::error::{one_line, Error, Result};

/// The store format this reader implements.
pub const FORMAT_NAME: &str = "momkd-cohort";
/// Newest `format_version` this reader understands.
pub const FORMAT_VERSION: i64 = 1;

/// Codecs allowed by format version 1 (inside a shard, too).
const ALLOWED_CODECS: [&str; 5] = ["bytes", "zstd", "blosc", "gzip", "crc32c"];
/// The array-to-bytes codec of format version 1.1 sharded arrays.
const SHARDING: &str = "sharding_indexed";
/// Codecs allowed on a shard index.
const INDEX_CODECS: [&str; 2] = ["bytes", "crc32c"];

/// The validated parts of an array's `zarr.json`.
#[derive(Debug, Clone)]
pub(super) struct ArrayMeta {
    shape: Vec<u64>,
    data_type: String,
    /// The chunk grid's chunk shape (the shard shape of a sharded array).
    pub(super) chunk_shape: Vec<u64>,
    /// The inner chunk shape of a sharded array (format version 1.1).
    inner_chunk_shape: Option<Vec<u64>>,
    /// The sharding codec's configuration of a sharded array.
    pub(super) sharding: Option<ShardingCodecConfigurationV1>,
}

impl ArrayMeta {
    /// The read unit: the inner chunk of a sharded array, else the chunk.
    pub(super) fn read_chunk_shape(&self) -> &[u64] {
        self.inner_chunk_shape
            .as_deref()
            .unwrap_or(&self.chunk_shape)
    }
}

fn read_json(store: &str, file: &Path, what: &str) -> Result<Value> {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Store(format!(
                "store {store}: {what} is missing ({} not found)",
                file.display()
            )))
        }
        Err(e) => {
            return Err(Error::Store(format!(
                "store {store}: cannot read {}: {}",
                file.display(),
                one_line(e)
            )))
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        Error::Store(format!(
            "store {store}: {} is not valid JSON: {}",
            file.display(),
            one_line(e)
        ))
    })
}

fn get_uint(header: &Map<String, Value>, key: &str, store: &str) -> Result<u64> {
    match header.get(key) {
        Some(v) => v.as_u64().ok_or_else(|| {
            Error::Store(format!(
                "store {store}: header key '{key}' must be a non-negative integer, got {v}"
            ))
        }),
        None => Err(Error::Store(format!(
            "store {store}: header key '{key}' is missing"
        ))),
    }
}

/// Why a slide id is not acceptable, if it is not.
pub fn slide_id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        Some("is empty")
    } else if id.contains('/') || id.contains('\\') {
        Some("contains a path separator")
    } else if id.contains('\0') {
        Some("contains a NUL character")
    } else if id.starts_with('.') {
        Some("starts with '.'")
    } else {
        None
    }
}

/// Parse and check the parts of an array's `zarr.json` that format version 1 constrains.
fn array_meta(store: &str, root: &Path, name: &str) -> Result<ArrayMeta> {
    let file = root.join(name).join("zarr.json");
    let v = read_json(store, &file, &format!("array '{name}'"))?;
    let bad = |msg: String| Error::Store(format!("store {store}: array '{name}': {msg}"));
    let obj = v
        .as_object()
        .ok_or_else(|| bad("zarr.json is not a JSON object".into()))?;
    if obj.get("zarr_format").and_then(Value::as_i64) != Some(3) {
        return Err(bad("not a Zarr v3 array (zarr_format != 3)".into()));
    }
    if obj.get("node_type").and_then(Value::as_str) != Some("array") {
        return Err(bad("node_type is not 'array'".into()));
    }
    let shape: Vec<u64> = obj
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
        .ok_or_else(|| bad("'shape' is missing or not a list of integers".into()))?;
    let data_type = match obj.get("data_type") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(bad(format!(
                "data type {other} is not supported by format version 1"
            )))
        }
        None => return Err(bad("'data_type' is missing".into())),
    };
    let grid = obj
        .get("chunk_grid")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("'chunk_grid' is missing".into()))?;
    if grid.get("name").and_then(Value::as_str) != Some("regular") {
        return Err(bad(format!(
            "chunk grid {} is not supported (format version 1 uses 'regular')",
            grid.get("name").cloned().unwrap_or(Value::Null)
        )));
    }
    let chunk_shape: Vec<u64> = grid
        .get("configuration")
        .and_then(|c| c.get("chunk_shape"))
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
        .ok_or_else(|| bad("chunk_grid has no integer 'chunk_shape'".into()))?;
    if chunk_shape.len() != shape.len() || chunk_shape.contains(&0) {
        return Err(bad(format!(
            "chunk shape {chunk_shape:?} does not fit array shape {shape:?}"
        )));
    }
    let codecs = obj
        .get("codecs")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("'codecs' is missing".into()))?;
    let mut inner_chunk_shape = None;
    let mut sharding = None;
    if codecs.len() == 1 && codec_name(&codecs[0]) == SHARDING {
        let config = codecs[0]
            .get("configuration")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("the sharding codec has no 'configuration'".into()))?;
        let inner: Vec<u64> = config
            .get("chunk_shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad("the sharding codec has no integer 'chunk_shape'".into()))?;
        if inner.len() != shape.len() || inner.contains(&0) {
            return Err(bad(format!(
                "inner chunk shape {inner:?} does not fit array shape {shape:?}"
            )));
        }
        if inner.iter().zip(&chunk_shape).any(|(i, s)| s % i != 0) {
            return Err(bad(format!(
                "shard shape {chunk_shape:?} is not a multiple of the inner chunk shape {inner:?}"
            )));
        }
        let inner_codecs = config
            .get("codecs")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("the sharding codec has no 'codecs'".into()))?;
        check_codec_chain(inner_codecs, &ALLOWED_CODECS, "inner codecs", &bad)?;
        if let Some(index_codecs) = config.get("index_codecs") {
            let index_codecs = index_codecs
                .as_array()
                .ok_or_else(|| bad("the sharding codec's 'index_codecs' is not a list".into()))?;
            check_codec_chain(index_codecs, &INDEX_CODECS, "index codecs", &bad)?;
        }
        let parsed: ShardingCodecConfigurationV1 =
            serde_json::from_value(Value::Object(config.clone())).map_err(|e| {
                bad(format!(
                    "the sharding codec's configuration is not valid: {}",
                    one_line(e)
                ))
            })?;
        inner_chunk_shape = Some(inner);
        sharding = Some(parsed);
    } else {
        check_codec_chain(codecs, &ALLOWED_CODECS, "codecs", &bad)?;
    }
    if let Some(st) = obj.get("storage_transformers") {
        if st.as_array().is_some_and(|a| !a.is_empty()) || !(st.is_array() || st.is_null()) {
            return Err(bad(
                "storage transformers are not supported by format version 1".into(),
            ));
        }
    }
    Ok(ArrayMeta {
        shape,
        data_type,
        chunk_shape,
        inner_chunk_shape,
        sharding,
    })
}

fn codec_name(codec: &Value) -> &str {
    match codec {
        Value::String(s) => s.as_str(),
        Value::Object(m) => m.get("name").and_then(Value::as_str).unwrap_or(""),
        _ => "",
    }
}

/// Check a codec list: `bytes` followed by codecs of `allowed`.
fn check_codec_chain(
    codecs: &[Value],
    allowed: &[&str],
    what: &str,
    bad: &dyn Fn(String) -> Error,
) -> Result<()> {
    if codecs.is_empty() {
        return Err(bad(format!("'{what}' is empty")));
    }
    for (pos, codec) in codecs.iter().enumerate() {
        let cname = codec_name(codec);
        if !allowed.contains(&cname) {
            let sharding = if cname == SHARDING {
                " here (only as the single codec of features or coords)"
            } else {
                ""
            };
            return Err(bad(format!(
                "codec '{cname}' in {what} is not supported by format version 1{sharding} (allowed: {})",
                allowed.join(", ")
            )));
        }
        if (pos == 0) != (cname == "bytes") {
            return Err(bad(format!(
                "{what} must be 'bytes' followed by {}",
                allowed[1..].join(", ")
            )));
        }
    }
    Ok(())
}

fn open_array(
    store: &str,
    fs: &Arc<FilesystemStore>,
    name: &str,
) -> Result<Array<FilesystemStore>> {
    Array::open(fs.clone(), &format!("/{name}")).map_err(|e| {
        Error::Store(format!(
            "store {store}: array '{name}' cannot be opened: {}",
            one_line(e)
        ))
    })
}

impl CohortStore {
    /// Open and validate the store at `path`.
    ///
    /// # Errors
    /// [`Error::Store`] naming the store and the offending key or array for every check listed in
    /// FORMAT.md "What opening a store checks".
    pub fn open(path: &str) -> Result<CohortStore> {
        let root = PathBuf::from(path);
        let store = path;
        if !root.is_dir() {
            return Err(Error::Store(format!(
                "store {store}: not a directory (no such store)"
            )));
        }
        let group = read_json(store, &root.join("zarr.json"), "group metadata zarr.json")?;
        if group.get("zarr_format").and_then(Value::as_i64) != Some(3) {
            return Err(Error::Store(format!(
                "store {store}: not a Zarr v3 store (zarr_format != 3 in zarr.json)"
            )));
        }
        if group.get("node_type").and_then(Value::as_str) != Some("group") {
            return Err(Error::Store(format!(
                "store {store}: the root zarr.json is not a group"
            )));
        }
        let header_value = group
            .get("attributes")
            .and_then(|a| a.get("momkd"))
            .ok_or_else(|| {
                Error::Store(format!(
                    "store {store}: no momkd header (attributes[\"momkd\"] is missing in zarr.json)"
                ))
            })?;
        let header = header_value.as_object().ok_or_else(|| {
            Error::Store(format!(
                "store {store}: the momkd header is not a JSON object"
            ))
        })?;
        match header.get("format").and_then(Value::as_str) {
            Some(FORMAT_NAME) => {}
            Some(other) => {
                return Err(Error::Store(format!(
                    "store {store}: header 'format' is '{other}', expected '{FORMAT_NAME}'"
                )))
            }
            None => {
                return Err(Error::Store(format!(
                    "store {store}: header key 'format' is missing or not a string"
                )))
            }
        }
        match header.get("format_version").and_then(Value::as_i64) {
            Some(v) if v == FORMAT_VERSION => {}
            Some(v) if v > FORMAT_VERSION => {
                return Err(Error::Store(format!(
                    "store {store}: format_version {v} is newer than this momkd supports ({FORMAT_VERSION})"
                )))
            }
            Some(v) => {
                return Err(Error::Store(format!(
                    "store {store}: format_version {v} is not supported (expected {FORMAT_VERSION})"
                )))
            }
            None => {
                return Err(Error::Store(format!(
                    "store {store}: header key 'format_version' is missing or not an integer"
                )))
            }
        }
        match header.get("complete") {
            Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => {
                return Err(Error::Store(format!(
                    "store {store}: the store is incomplete (header 'complete' is false: an ingest was interrupted; rerun `momkd ingest` to resume it)"
                )))
            }
            _ => {
                return Err(Error::Store(format!(
                    "store {store}: header key 'complete' is missing or not a boolean"
                )))
            }
        }
        let feature_dim = get_uint(header, "feature_dim", store)?;
        let n_slides = get_uint(header, "n_slides", store)?;
        let n_patches = get_uint(header, "n_patches", store)?;
        if feature_dim == 0 {
            return Err(Error::Store(format!(
                "store {store}: header 'feature_dim' must be at least 1"
            )));
        }
        let ids_value = header
            .get("slide_ids")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                Error::Store(format!(
                    "store {store}: header key 'slide_ids' is missing or not a list"
                ))
            })?;
        let mut slide_ids = Vec::with_capacity(ids_value.len());
        let mut index = HashMap::with_capacity(ids_value.len());
        for (i, v) in ids_value.iter().enumerate() {
            let id = v.as_str().ok_or_else(|| {
                Error::Store(format!(
                    "store {store}: slide_ids[{i}] is not a string: {v}"
                ))
            })?;
            if let Some(problem) = slide_id_problem(id) {
                return Err(Error::Store(format!(
                    "store {store}: slide id {id:?} (slide_ids[{i}]) {problem}"
                )));
            }
            if index.insert(id.to_string(), i).is_some() {
                return Err(Error::Store(format!(
                    "store {store}: duplicate slide id {id:?} in slide_ids"
                )));
            }
            slide_ids.push(id.to_string());
        }
        if slide_ids.len() as u64 != n_slides {
            return Err(Error::Store(format!(
                "store {store}: slide_ids has {} entries but n_slides is {n_slides}",
                slide_ids.len()
            )));
        }

        let fmeta = array_meta(store, &root, "features")?;
        let cmeta = array_meta(store, &root, "coords")?;
        let ometa = array_meta(store, &root, "offsets")?;
        let bad =
            |name: &str, msg: String| Error::Store(format!("store {store}: array '{name}': {msg}"));
        if fmeta.shape.len() != 2 {
            return Err(bad(
                "features",
                format!("rank {} (expected 2)", fmeta.shape.len()),
            ));
        }
        let feat_dtype = match fmeta.data_type.as_str() {
            "float16" => FeatureDtype::F16,
            "float32" => FeatureDtype::F32,
            other => {
                return Err(bad(
                    "features",
                    format!("data type '{other}' is not supported (float16 or float32)"),
                ))
            }
        };
        if fmeta.shape[1] != feature_dim {
            return Err(bad(
                "features",
                format!(
                    "{} columns but the header says feature_dim {feature_dim}",
                    fmeta.shape[1]
                ),
            ));
        }
        if fmeta.shape[0] != n_patches {
            return Err(bad(
                "features",
                format!(
                    "{} rows but the header says n_patches {n_patches}",
                    fmeta.shape[0]
                ),
            ));
        }
        if fmeta.read_chunk_shape()[1] != feature_dim {
            return Err(bad(
                "features",
                format!(
                    "chunk shape {:?} does not span all {feature_dim} columns",
                    fmeta.read_chunk_shape()
                ),
            ));
        }
        if cmeta.shape.len() != 2 {
            return Err(bad(
                "coords",
                format!("rank {} (expected 2)", cmeta.shape.len()),
            ));
        }
        let coord_dtype = match cmeta.data_type.as_str() {
            "int32" => CoordDtype::I32,
            "int64" => CoordDtype::I64,
            other => {
                return Err(bad(
                    "coords",
                    format!("data type '{other}' is not supported (int32 or int64)"),
                ))
            }
        };
        if cmeta.shape[1] != 2 {
            return Err(bad(
                "coords",
                format!("{} columns (expected 2)", cmeta.shape[1]),
            ));
        }
        if cmeta.shape[0] != n_patches {
            return Err(bad(
                "coords",
                format!("{} rows but features has {n_patches}", cmeta.shape[0]),
            ));
        }
        if cmeta.read_chunk_shape()[1] != 2 {
            return Err(bad(
                "coords",
                format!(
                    "chunk shape {:?} does not span both columns",
                    cmeta.read_chunk_shape()
                ),
            ));
        }
        if ometa.shape.len() != 1 {
            return Err(bad(
                "offsets",
                format!("rank {} (expected 1)", ometa.shape.len()),
            ));
        }
        if ometa.data_type != "int64" {
            return Err(bad(
                "offsets",
                format!("data type '{}' is not supported (int64)", ometa.data_type),
            ));
        }
        if ometa.shape[0] != n_slides + 1 {
            return Err(bad(
                "offsets",
                format!(
                    "length {} but n_slides + 1 is {}",
                    ometa.shape[0],
                    n_slides + 1
                ),
            ));
        }

        let fs =
            Arc::new(FilesystemStore::new(&root).map_err(|e| {
                Error::Store(format!("store {store}: cannot open: {}", one_line(e)))
            })?);
        let features = RowArray::new(
            store,
            &root,
            "features",
            open_array(store, &fs, "features")?,
            &fmeta,
        )?;
        let coords = RowArray::new(
            store,
            &root,
            "coords",
            open_array(store, &fs, "coords")?,
            &cmeta,
        )?;
        let offsets_arr = open_array(store, &fs, "offsets")?;

        let offsets = read_offsets(
            store,
            &offsets_arr,
            n_slides as usize + 1,
            ometa.chunk_shape[0],
        )?;
        if offsets.first() != Some(&0) {
            return Err(bad(
                "offsets",
                format!("starts at {} (expected 0)", offsets[0]),
            ));
        }
        if let Some(i) = offsets.windows(2).position(|w| w[1] <= w[0]) {
            let what = if offsets[i + 1] == offsets[i] {
                format!(
                    "slide {:?} has no patches (offsets[{i}] == offsets[{}] == {})",
                    slide_ids.get(i).map_or("", String::as_str),
                    i + 1,
                    offsets[i]
                )
            } else {
                format!(
                    "not strictly increasing at index {} ({} after {})",
                    i + 1,
                    offsets[i + 1],
                    offsets[i]
                )
            };
            return Err(bad("offsets", what));
        }
        let last = *offsets.last().unwrap_or(&0);
        if last < 0 || last as u64 != n_patches {
            return Err(bad(
                "offsets",
                format!("ends at {last} but the store has {n_patches} patches"),
            ));
        }

        let header_json = serde_json::to_string(header_value).map_err(|e| {
            Error::Store(format!(
                "store {store}: cannot serialise the header: {}",
                one_line(e)
            ))
        })?;
        Ok(CohortStore {
            path: path.to_string(),
            slide_ids,
            index,
            feature_dim: feature_dim as usize,
            n_patches,
            feat_dtype,
            coord_dtype,
            feat_chunk_rows: fmeta.read_chunk_shape()[0],
            coord_chunk_rows: cmeta.read_chunk_shape()[0],
            offsets,
            header_json,
            features,
            coords,
        })
    }
}

fn read_offsets(
    store: &str,
    arr: &Array<FilesystemStore>,
    len: usize,
    chunk_rows: u64,
) -> Result<Vec<i64>> {
    let mut out = Vec::with_capacity(len);
    let n_chunks = (len as u64).div_ceil(chunk_rows);
    let options = CodecOptions::default().with_concurrent_target(1);
    for c in 0..n_chunks {
        let key = arr.chunk_key(&[c]);
        let data = match arr.retrieve_chunk_if_exists_opt::<Vec<i64>>(&[c], &options) {
            Ok(Some(d)) => d,
            Ok(None) => {
                return Err(Error::Store(format!(
                    "store {store}: array 'offsets': chunk {key} is missing"
                )))
            }
            Err(e) => {
                return Err(Error::Store(format!(
                    "store {store}: array 'offsets': chunk {key} is corrupt or truncated: {}",
                    one_line(e)
                )))
            }
        };
        let take = (len - out.len()).min(data.len());
        out.extend_from_slice(&data[..take]);
    }
    if out.len() != len {
        return Err(Error::Store(format!(
            "store {store}: array 'offsets' decoded to {} values, expected {len}",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::read_tests::{array_json, slides, write_store};

    #[test]
    fn slide_id_rules() {
        assert_eq!(slide_id_problem("TCGA-A1-A0SB"), None);
        assert!(slide_id_problem("").is_some());
        assert!(slide_id_problem("a/b").is_some());
        assert!(slide_id_problem("a\\b").is_some());
        assert!(slide_id_problem("a\0b").is_some());
        assert!(slide_id_problem(".hidden").is_some());
        assert!(slide_id_problem("..").is_some());
    }

    #[test]
    fn open_rejects_bad_headers() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s.zarr");
        write_store(&dir, &slides(2), 2, 4, true);
        let group_path = dir.join("zarr.json");
        let good: Value = serde_json::from_slice(&std::fs::read(&group_path).unwrap()).unwrap();
        let cases: Vec<(&str, Value, &str)> = vec![
            ("complete", Value::Bool(false), "incomplete"),
            ("format_version", Value::from(2), "newer"),
            ("format", Value::from("other"), "format"),
            ("n_slides", Value::from(4), "n_slides"),
            ("slide_ids", serde_json::json!(["a", "a", "c"]), "duplicate"),
            (
                "slide_ids",
                serde_json::json!(["a", "../b", "c"]),
                "path separator",
            ),
            ("feature_dim", Value::from(3), "feature_dim"),
        ];
        for (key, value, needle) in cases {
            let mut doc = good.clone();
            doc["attributes"]["momkd"][key] = value;
            std::fs::write(&group_path, doc.to_string()).unwrap();
            let err = CohortStore::open(dir.to_str().unwrap()).unwrap_err();
            assert!(
                matches!(&err, Error::Store(m) if m.contains(needle) && m.contains("s.zarr")),
                "{key}: {err:?}"
            );
        }
        std::fs::write(&group_path, good.to_string()).unwrap();
        assert!(CohortStore::open(dir.to_str().unwrap()).is_ok());
        std::fs::write(
            dir.join("offsets/zarr.json"),
            array_json(&[4], &[2], "int32"),
        )
        .unwrap();
        let err = CohortStore::open(dir.to_str().unwrap()).unwrap_err();
        assert!(
            matches!(&err, Error::Store(m) if m.contains("'offsets'")),
            "{err:?}"
        );
    }
}
