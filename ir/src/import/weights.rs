//! Weights from `model.safetensors` (or a sharded checkpoint's `model.safetensors.index.json`).

use super::build::ParamSource;
use super::ImportError;
use crate::tensor::Tensor;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Buffers that Hugging Face checkpoints may carry and that are not parameters.
const BUFFER_SUFFIXES: &[&str] = &["attn.bias", "attn.masked_bias", "rotary_emb.inv_freq"];

/// Prefixes under which Hugging Face stores the base model's tensors.
const PREFIXES: &[&str] = &["", "transformer.", "model."];

/// True when `dir` holds weights (a `model.safetensors` or its sharded index): anything under
/// those names is read, so that a directory or a broken link is an error, not a silent random
/// initialisation.
pub fn has_weights(dir: &Path) -> bool {
    let present = |name: &str| std::fs::symlink_metadata(dir.join(name)).is_ok();
    present("model.safetensors") || present("model.safetensors.index.json")
}

fn fail(path: &Path, message: impl Into<String>) -> ImportError {
    ImportError { path: path.to_path_buf(), message: message.into() }
}

/// The checkpoint files: one, or those named by the index.
fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>, ImportError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    if std::fs::symlink_metadata(&single).is_ok() {
        return Err(fail(
            &single,
            "is not a readable file (a directory or a broken link?); remove it or put the weights there",
        ));
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|e| fail(&index, format!("cannot read: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| fail(&index, format!("not valid JSON: {e}")))?;
    let map =
        json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| fail(&index, "has no `weight_map` object"))?;
    let mut files: Vec<String> = Vec::new();
    for (k, v) in map {
        let f = v.as_str().ok_or_else(|| fail(&index, format!("weight_map entry `{k}` is not a file name")))?;
        if f.contains('/') || f.contains("..") {
            return Err(fail(&index, format!("weight_map entry `{k}` names `{f}`, outside the model directory")));
        }
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    files.sort();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Converts one tensor's little-endian bytes to f32.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F64 => {
            bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32).collect()
        }
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => return None,
    })
}

fn dtype_size(dtype: Dtype) -> usize {
    dtype.bitsize() / 8
}

/// The data of a tensor must be exactly as long as its shape and dtype say.
fn check_byte_length(path: &Path, name: &str, view: &safetensors::tensor::TensorView) -> Result<(), ImportError> {
    let need = view.shape().iter().try_fold(dtype_size(view.dtype()), |acc, &d| acc.checked_mul(d));
    if need != Some(view.data().len()) {
        let need = need.map_or("more than addressable".to_string(), |n| n.to_string());
        return Err(fail(
            path,
            format!("tensor `{name}` holds {} bytes, not the {need} its shape needs", view.data().len()),
        ));
    }
    Ok(())
}

/// Reads every parameter named in `sources` from the checkpoint in `dir`.
///
/// Returns the tensors by graph parameter name (f32), and warnings for checkpoint tensors that
/// no parameter uses.
pub fn load_weights(
    dir: &Path,
    sources: &[ParamSource],
) -> Result<(HashMap<String, Tensor>, Vec<String>), ImportError> {
    load_from_files(&checkpoint_files(dir)?, sources)
}

/// [`load_weights`] from explicit safetensors files (e.g. saved gradients, which use the
/// checkpoint's names and layout).
pub fn load_from_files(
    files: &[PathBuf],
    sources: &[ParamSource],
) -> Result<(HashMap<String, Tensor>, Vec<String>), ImportError> {
    let blobs: Vec<(PathBuf, Vec<u8>)> = files
        .iter()
        .map(|p| std::fs::read(p).map(|b| (p.clone(), b)).map_err(|e| fail(p, format!("cannot read: {e}"))))
        .collect::<Result<_, _>>()?;
    let mut tables = Vec::new();
    for (path, bytes) in &blobs {
        let st =
            SafeTensors::deserialize(bytes).map_err(|e| fail(path, format!("not a valid safetensors file: {e}")))?;
        tables.push((path.as_path(), st));
    }
    // key -> (file index)
    let mut where_is: BTreeMap<String, usize> = BTreeMap::new();
    for (i, (_, st)) in tables.iter().enumerate() {
        for name in st.names() {
            where_is.insert(name.to_string(), i);
        }
    }
    let mut used: HashSet<String> = HashSet::new();
    let mut out = HashMap::new();
    let shown = tables[0].0;
    for s in sources {
        let found = PREFIXES.iter().map(|p| format!("{p}{}", s.key)).find(|k| where_is.contains_key(k));
        let Some(key) = found else {
            return Err(fail(
                shown,
                format!(
                    "has no tensor `{}` (also looked for `transformer.{0}` and `model.{0}`); parameter `%{}` needs it, shape {:?}",
                    s.key, s.param, s.key_shape
                ),
            ));
        };
        let (path, st) = &tables[where_is[&key]];
        let view = st.tensor(&key).map_err(|e| fail(path, format!("tensor `{key}`: {e}")))?;
        if view.shape() != s.key_shape.as_slice() {
            return Err(fail(
                path,
                format!(
                    "tensor `{key}` has shape {:?} but the config implies {:?} (for parameter `%{}`)",
                    view.shape(),
                    s.key_shape,
                    s.param
                ),
            ));
        }
        check_byte_length(path, &key, &view)?;
        let values = to_f32(view.dtype(), view.data()).ok_or_else(|| {
            fail(path, format!("tensor `{key}` has dtype {:?}; expected F32, F64, BF16 or F16", view.dtype()))
        })?;
        used.insert(key.clone());
        let (shape, values) = match s.last_dim_range {
            None => (s.key_shape.clone(), values),
            Some((start, end)) => {
                let last = *s.key_shape.last().expect("fused tensors have rank >= 1");
                let cut: Vec<f32> = values.chunks(last).flat_map(|row| row[start..end].iter().copied()).collect();
                let mut shape = s.key_shape.clone();
                *shape.last_mut().expect("rank >= 1") = end - start;
                (shape, cut)
            }
        };
        out.insert(s.param.clone(), Tensor::f32(shape, values));
    }
    let warnings = where_is
        .keys()
        .filter(|k| !used.contains(*k) && !BUFFER_SUFFIXES.iter().any(|b| k.ends_with(b)))
        .map(|k| format!("checkpoint tensor `{k}` is not used by the imported graph"))
        .collect();
    Ok((out, warnings))
}

/// Reads every tensor of a safetensors file: floating tensors as f32 storage (logical dtype
/// kept for BF16/F16), I64/I32 as integers.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, ImportError> {
    use crate::types::DType;
    let bytes = std::fs::read(path).map_err(|e| fail(path, format!("cannot read: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| fail(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        check_byte_length(path, &name, &view)?;
        let shape = view.shape().to_vec();
        let data = view.data();
        let t = match view.dtype() {
            Dtype::I64 => Tensor::int(
                DType::I64,
                shape,
                data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect(),
            ),
            Dtype::I32 => Tensor::int(
                DType::I32,
                shape,
                data.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64).collect(),
            ),
            d => {
                let logical = match d {
                    Dtype::BF16 => DType::Bf16,
                    Dtype::F16 => DType::F16,
                    _ => DType::F32,
                };
                let values = to_f32(d, data)
                    .ok_or_else(|| fail(path, format!("tensor `{name}` has unsupported dtype {d:?}")))?;
                let mut t = Tensor::f32(shape, values);
                t.dtype = logical;
                t
            }
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Writes tensors to a safetensors file (floating tensors as F32, integers as I64), atomically.
pub fn write_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<(), ImportError> {
    write_tensors_with_metadata(path, tensors, None)
}

/// [`write_tensors`] with a string-to-string metadata map in the file header.
pub fn write_tensors_with_metadata(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), ImportError> {
    use crate::tensor::Data;
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let (dtype, bytes) = match &t.data {
                Data::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                _ => (Dtype::F32, t.to_f32().iter().flat_map(|x| x.to_le_bytes()).collect()),
            };
            (name.clone(), dtype, t.shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = encoded
        .iter()
        .map(|(n, d, s, b)| safetensors::tensor::TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<_, _>>()
        .map_err(|e| fail(path, format!("cannot encode: {e}")))?;
    let bytes = safetensors::serialize(views, metadata).map_err(|e| fail(path, format!("cannot encode: {e}")))?;
    write_atomically(path, &bytes)
}

/// The prefix of the temporary files [`write_atomically`] writes beside `path`
/// (`NAME.tmp.PID.NANOS`), for cleaning up after a killed writer.
pub fn temp_prefix(path: &Path) -> String {
    format!("{}.tmp.", path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
}

/// Writes `bytes` to `path` so that readers see the old file or the whole new one: a
/// temporary file with a name no other writer uses (process id and time), flushed to disk,
/// renamed over `path`, and the directory flushed so that the rename survives a crash.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ImportError> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let tmp = dir.join(format!("{}{}.{nanos}", temp_prefix(path), std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(&tmp, format!("cannot write: {e}")));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(path, format!("cannot move the written file into place: {e}")));
    }
    // The rename is durable once the directory is: best effort where directories cannot be
    // opened for syncing.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The metadata map of a safetensors file's header (empty when it has none).
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>, ImportError> {
    let bytes = std::fs::read(path).map_err(|e| fail(path, format!("cannot read: {e}")))?;
    let (_, meta) =
        SafeTensors::read_metadata(&bytes).map_err(|e| fail(path, format!("not a valid safetensors file: {e}")))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}
