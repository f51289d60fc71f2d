//! Writing token shards: documents appended one by one to a token file and its document
//! index, streamed to disk, cut into several shards of at most a configured size.
//!
//! Each shard is written under a temporary name and renamed into place when complete, so a
//! shard file that exists is whole; its sha256 and counts are computed while writing.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::hash::Hasher;
use crate::manifest::{Counts, ShardEntry, Split, TokenDtype};
use crate::{DataError, Result};

/// The shards of one (domain, source, split) of one unit: `{stem}.{NNNN}.tokens|.docs`.
pub(crate) struct ShardWriter {
    /// The dataset folder.
    out: PathBuf,
    /// Path of the shards without sequence number and extension, relative to `out`.
    stem: String,
    split: Split,
    dtype: TokenDtype,
    max_bytes: u64,
    open: Option<OpenShard>,
    done: Vec<ShardEntry>,
}

struct OpenShard {
    tokens_file: String,
    docs_file: String,
    tokens: BufWriter<File>,
    docs: BufWriter<File>,
    tokens_hash: Hasher,
    docs_hash: Hasher,
    counts: Counts,
}

impl ShardWriter {
    /// A writer of shards named `{stem}.NNNN.*` under `out`, each at most `max_bytes` of tokens
    /// (a single longer document gets a shard of its own).
    pub(crate) fn new(
        out: &Path,
        stem: String,
        split: Split,
        dtype: TokenDtype,
        max_bytes: u64,
    ) -> Self {
        ShardWriter {
            out: out.to_path_buf(),
            stem,
            split,
            dtype,
            max_bytes,
            open: None,
            done: Vec::new(),
        }
    }

    /// Appends one document's ids (its EOS included).
    pub(crate) fn push(&mut self, ids: &[u32]) -> Result<()> {
        let width = self.dtype.bytes() as u64;
        if let Some(open) = &self.open {
            if (open.counts.tokens + ids.len() as u64) * width > self.max_bytes {
                self.close()?;
            }
        }
        if self.open.is_none() {
            self.open = Some(self.start()?);
        }
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        let mut buf = Vec::with_capacity(ids.len().min(1 << 14) * width as usize);
        for chunk in ids.chunks(1 << 14) {
            buf.clear();
            match self.dtype {
                TokenDtype::U16 => {
                    for &id in chunk {
                        // Ids fit: the dtype was chosen from the vocabulary size.
                        buf.extend_from_slice(&(id as u16).to_le_bytes());
                    }
                }
                TokenDtype::U32 => {
                    for &id in chunk {
                        buf.extend_from_slice(&id.to_le_bytes());
                    }
                }
            }
            open.tokens_hash.update(&buf);
            let path = &open.tokens_file;
            open.tokens
                .write_all(&buf)
                .map_err(|e| DataError::io(self.out.join(path), e))?;
        }
        open.counts.tokens += ids.len() as u64;
        open.counts.documents += 1;
        let end = open.counts.tokens.to_le_bytes();
        open.docs_hash.update(&end);
        let path = &open.docs_file;
        open.docs
            .write_all(&end)
            .map_err(|e| DataError::io(self.out.join(path), e))?;
        Ok(())
    }

    fn start(&self) -> Result<OpenShard> {
        let seq = self.done.len();
        let tokens_file = format!("{}.{seq:04}.tokens", self.stem);
        let docs_file = format!("{}.{seq:04}.docs", self.stem);
        let create = |rel: &str| -> Result<BufWriter<File>> {
            let path = self.out.join(rel);
            let dir = moelab_io::parent(&path);
            std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
            let tmp = moelab_io::tmp_path(&path);
            let file = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
            Ok(BufWriter::with_capacity(1 << 20, file))
        };
        Ok(OpenShard {
            tokens: create(&tokens_file)?,
            docs: create(&docs_file)?,
            tokens_file,
            docs_file,
            tokens_hash: Hasher::new(),
            docs_hash: Hasher::new(),
            counts: Counts::default(),
        })
    }

    /// Completes the open shard: flush, fsync, rename both files into place.
    fn close(&mut self) -> Result<()> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        for (writer, rel) in [
            (open.tokens, &open.tokens_file),
            (open.docs, &open.docs_file),
        ] {
            let path = self.out.join(rel);
            let tmp = moelab_io::tmp_path(&path);
            let file = writer
                .into_inner()
                .map_err(|e| DataError::io(&tmp, e.into_error()))?;
            file.sync_all().map_err(|e| DataError::io(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))?;
        }
        let dir = moelab_io::parent(&self.out.join(&open.tokens_file)).to_path_buf();
        moelab_io::sync_dir(&dir).map_err(|e| DataError::io(&dir, e))?;
        self.done.push(ShardEntry {
            split: self.split,
            tokens_file: open.tokens_file,
            docs_file: open.docs_file,
            counts: open.counts,
            tokens_sha256: open.tokens_hash.hex(),
            docs_sha256: open.docs_hash.hex(),
        });
        Ok(())
    }

    /// Completes the last shard; returns every shard written, in order.
    pub(crate) fn finish(mut self) -> Result<Vec<ShardEntry>> {
        self.close()?;
        Ok(self.done)
    }
}
