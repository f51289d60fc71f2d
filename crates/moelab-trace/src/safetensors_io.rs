//! Small helpers over the `safetensors` crate: owned little-endian tensors for writing, typed and
//! shape-checked reads, metadata parsing with errors that name the file and key, atomic writes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::str::FromStr;

use safetensors::{Dtype, SafeTensors, View};

use crate::error::{Result, TraceError};

/// A tensor held as little-endian bytes, ready to serialise.
pub(crate) struct OwnedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

macro_rules! owned_ctor {
    ($name:ident, $ty:ty, $dtype:expr) => {
        /// Builds a tensor of this element type from row-major values.
        pub(crate) fn $name(shape: &[usize], values: &[$ty]) -> OwnedTensor {
            let mut data = Vec::with_capacity(values.len() * std::mem::size_of::<$ty>());
            for v in values {
                data.extend_from_slice(&v.to_le_bytes());
            }
            OwnedTensor {
                dtype: $dtype,
                shape: shape.to_vec(),
                data,
            }
        }
    };
}

impl OwnedTensor {
    owned_ctor!(i64, i64, Dtype::I64);
    owned_ctor!(f64, f64, Dtype::F64);
    owned_ctor!(u32, u32, Dtype::U32);
    owned_ctor!(f32, f32, Dtype::F32);
}

/// Serialises tensors + metadata and writes them atomically to `path`.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[(&str, OwnedTensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (*n, t)), Some(metadata))
        .map_err(|source| TraceError::SafeTensors {
            path: path.to_path_buf(),
            source,
        })?;
    sort_metadata(&mut bytes);
    write_atomic(path, &bytes)
}

/// Rewrites the header's `__metadata__` with sorted keys, so that the same content gives the
/// same bytes (`safetensors::serialize` takes a `HashMap`, whose order changes from run to run).
/// The rewritten header has exactly the original length: same tokens, another order.
fn sort_metadata(bytes: &mut [u8]) {
    let Some(len) = bytes.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
        return;
    };
    let end = 8 + u64::from_le_bytes(len) as usize;
    let Some(header) = bytes.get(8..end).and_then(|h| std::str::from_utf8(h).ok()) else {
        return;
    };
    let Ok(mut parsed) =
        serde_json::from_str::<std::collections::BTreeMap<String, serde_json::Value>>(header)
    else {
        return;
    };
    if let Some(meta) = parsed.get_mut("__metadata__") {
        if let Ok(sorted) =
            serde_json::from_value::<std::collections::BTreeMap<String, String>>(meta.clone())
        {
            let mut object = serde_json::Map::new();
            for (k, v) in sorted {
                object.insert(k, serde_json::Value::String(v));
            }
            *meta = serde_json::Value::Object(object);
        }
    }
    let Ok(canonical) = serde_json::to_string(&parsed) else {
        return;
    };
    let padded = format!("{canonical:<width$}", width = end - 8);
    if padded.len() == end - 8 {
        bytes[8..end].copy_from_slice(padded.as_bytes());
    }
}

/// Writes `bytes` to `path` so that readers see either the old file or the complete new one
/// (moelab-io's shared helper: a hidden temp file beside it, which `read_dir`'s chunk pattern
/// skips, fsync, rename, fsync of the folder).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    moelab_io::write_atomic(path, bytes).map_err(|e| TraceError::io("writing", path, e))
}

/// A parsed safetensors file with its path, for typed reads with good errors.
pub(crate) struct Loaded<'a> {
    pub(crate) path: &'a Path,
    tensors: SafeTensors<'a>,
    metadata: HashMap<String, String>,
}

/// Reads a whole file into memory, naming it on error.
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| TraceError::io("reading", path, e))
}

macro_rules! typed_read {
    ($name:ident, $ty:ty, $dtype:expr) => {
        /// Reads a tensor that must have this dtype and exactly `shape`.
        pub(crate) fn $name(&self, name: &str, shape: &[usize]) -> Result<Vec<$ty>> {
            let bytes = self.raw(name, $dtype, shape)?;
            const W: usize = std::mem::size_of::<$ty>();
            Ok(bytes
                .chunks_exact(W)
                .map(|c| {
                    let mut a = [0u8; W];
                    a.copy_from_slice(c);
                    <$ty>::from_le_bytes(a)
                })
                .collect())
        }
    };
}

impl<'a> Loaded<'a> {
    /// Parses `bytes` (the contents of `path`).
    pub(crate) fn parse(path: &'a Path, bytes: &'a [u8]) -> Result<Self> {
        let err = |source| TraceError::SafeTensors {
            path: path.to_path_buf(),
            source,
        };
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(err)?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let tensors = SafeTensors::deserialize(bytes).map_err(err)?;
        Ok(Loaded {
            path,
            tensors,
            metadata,
        })
    }

    /// Whether a tensor of this name exists.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.tensors.names().contains(&name)
    }

    /// Returns the shape of a tensor.
    pub(crate) fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.view(name)?.shape().to_vec())
    }

    /// The named tensor, or an error naming the file and the tensor.
    fn view(&self, name: &str) -> Result<safetensors::tensor::TensorView<'a>> {
        self.tensors
            .tensor(name)
            .map_err(|_| TraceError::MissingTensor {
                path: self.path.to_path_buf(),
                name: name.to_string(),
            })
    }

    fn raw(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<&'a [u8]> {
        let view = self.view(name)?;
        let bad = |reason: String| TraceError::BadTensor {
            path: self.path.to_path_buf(),
            name: name.to_string(),
            reason,
        };
        if view.dtype() != dtype {
            return Err(bad(format!(
                "dtype is {:?}, expected {dtype:?}",
                view.dtype()
            )));
        }
        if view.shape() != shape {
            return Err(bad(format!(
                "shape is {:?}, expected {shape:?}",
                view.shape()
            )));
        }
        Ok(view.data())
    }

    typed_read!(i64s, i64, Dtype::I64);
    typed_read!(f64s, f64, Dtype::F64);
    typed_read!(u32s, u32, Dtype::U32);
    typed_read!(f32s, f32, Dtype::F32);

    /// Returns a required metadata value.
    pub(crate) fn meta(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| TraceError::MissingMetadata {
                path: self.path.to_path_buf(),
                key: key.to_string(),
            })
    }

    /// Parses a required metadata value with `FromStr`.
    pub(crate) fn meta_parse<T: FromStr>(&self, key: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let raw = self.meta(key)?;
        raw.parse().map_err(|e: T::Err| TraceError::BadMetadata {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            reason: format!("cannot parse {raw:?}: {e}"),
        })
    }

    /// Parses a required metadata value as JSON.
    pub(crate) fn meta_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        let raw = self.meta(key)?;
        serde_json::from_str(raw).map_err(|e| TraceError::BadMetadata {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            reason: format!("cannot parse {raw:?} as JSON: {e}"),
        })
    }

    /// Checks the `format` key equals `expected`.
    pub(crate) fn expect_format(&self, expected: &str) -> Result<()> {
        let found = self.meta("format")?;
        if found != expected {
            return Err(TraceError::BadMetadata {
                path: self.path.to_path_buf(),
                key: "format".to_string(),
                reason: format!("is {found:?}, expected {expected:?}"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::test_util::tmp_dir;

    #[test]
    fn atomic_writes_replace_whole_files_and_fail_as_io_errors_naming_the_path() {
        let dir = tmp_dir("atomic");
        let path = dir.join("a.json");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "a temp file was left"
        );
        let missing = dir.join("no-such-folder").join("b.json");
        let err = write_atomic(&missing, b"x").unwrap_err();
        assert!(
            matches!(&err, TraceError::Io { action: "writing", path, .. } if *path == missing),
            "{err:?}"
        );
        assert!(err.to_string().contains("no-such-folder"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
