//! Reading corpus files: the formats corpora ship in (JSONL, optionally gzip or zstd
//! compressed, as written by Dolma and datatrove; Parquet; plain text), nested field paths,
//! and why a record could not be used.
//!
//! A [`RecordReader`] streams one file's records in order without holding the file in memory;
//! [`parse`] turns a record into a document (or a [`Skip`] reason) and is cheap to run in
//! parallel, so the reader only decompresses and splits lines.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde::{Deserialize, Serialize};

use crate::{DataError, Result};

/// How a file's bytes hold documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// One JSON object per line (`.jsonl`, `.json.gz`, ...: Dolma, datatrove, most dumps).
    Jsonl,
    /// A Parquet table, one row per document.
    Parquet,
    /// The whole file is one document.
    Text,
}

/// Extensions read as JSONL (Dolma names its gzipped JSONL files `.json.gz`).
const JSONL_EXTENSIONS: [&str; 7] = [
    ".jsonl",
    ".jsonl.gz",
    ".jsonl.zst",
    ".ndjson",
    ".json.gz",
    ".json.zst",
    ".jsonl.zstd",
];
const TEXT_EXTENSIONS: [&str; 3] = [".txt", ".txt.gz", ".txt.zst"];
const PARQUET_EXTENSIONS: [&str; 1] = [".parquet"];

/// The extensions `prepare` reads, for error messages.
pub(crate) const SUPPORTED: &str =
    ".jsonl/.ndjson/.json.gz/.jsonl.gz/.jsonl.zst (JSON lines), .parquet, .txt/.txt.gz/.txt.zst (one document per file)";

/// The format of a file by its extension (None: not a corpus file).
pub(crate) fn format_of(path: &Path) -> Option<Format> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let has = |exts: &[&str]| exts.iter().any(|e| name.ends_with(e));
    if has(&JSONL_EXTENSIONS) {
        Some(Format::Jsonl)
    } else if has(&PARQUET_EXTENSIONS) {
        Some(Format::Parquet)
    } else if has(&TEXT_EXTENSIONS) {
        Some(Format::Text)
    } else {
        None
    }
}

/// Whether the file's bytes on disk are compressed (their text is larger than the file).
pub(crate) fn is_compressed(path: &Path) -> bool {
    let name = path.to_string_lossy().to_lowercase();
    [".gz", ".zst", ".zstd", ".parquet"]
        .iter()
        .any(|e| name.ends_with(e))
}

/// A dotted path into a record: `text`, `metadata.domain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldPath(pub String);

impl FieldPath {
    /// The path's parts; `a.b` is field `b` of the object in field `a`.
    fn parts(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }

    /// Checks the path is usable: non-empty parts.
    pub(crate) fn check(&self, option: &str) -> Result<()> {
        if self.0.is_empty() || self.parts().any(str::is_empty) {
            return Err(DataError::Prepare(format!(
                "{option} `{}` is not a field path; write a field name or a dotted path such as `metadata.domain`",
                self.0
            )));
        }
        Ok(())
    }

    /// The string at this path of a JSON record: Ok(None) when absent or null.
    fn get_json<'a>(
        &self,
        value: &'a serde_json::Value,
    ) -> std::result::Result<Option<&'a str>, ()> {
        let mut v = value;
        for part in self.parts() {
            match v.get(part) {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(next) => v = next,
            }
        }
        v.as_str().map(Some).ok_or(())
    }

    /// The string at this path of a Parquet row.
    fn get_row<'a>(&self, row: &'a Row) -> std::result::Result<Option<&'a str>, ()> {
        let mut parts = self.parts().peekable();
        let mut current = row;
        while let Some(part) = parts.next() {
            let Some((_, field)) = current.get_column_iter().find(|(name, _)| *name == part) else {
                return Ok(None);
            };
            match field {
                Field::Null => return Ok(None),
                Field::Group(group) if parts.peek().is_some() => current = group,
                Field::Str(s) if parts.peek().is_none() => return Ok(Some(s)),
                _ => return Err(()),
            }
        }
        Ok(None)
    }

    /// The first part: the top-level column a Parquet reader must read.
    fn top(&self) -> &str {
        self.parts().next().unwrap_or("")
    }
}

/// Which fields of a record hold its text, domain and source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fields {
    /// The document's text (`text`).
    pub text: FieldPath,
    /// The domain, for files whose folder does not say it (`domain`, `metadata.domain`).
    pub domain: FieldPath,
    /// The source inside the domain; absent means `default` (`source`).
    pub source: FieldPath,
}

impl Default for Fields {
    fn default() -> Self {
        Fields {
            text: FieldPath("text".into()),
            domain: FieldPath("domain".into()),
            source: FieldPath("source".into()),
        }
    }
}

/// Why a record was not used (counted per file; an error under `--strict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Skip {
    /// Not valid UTF-8.
    InvalidUtf8,
    /// A JSON line that does not parse.
    MalformedJson,
    /// No string at the text field.
    NoText,
    /// No string at the domain field (files whose folder gives no domain).
    NoDomain,
    /// A domain or source value that cannot name a folder.
    BadName,
    /// Only whitespace.
    Empty,
    /// Longer than the per-document cap (`--max-document-bytes`).
    TooLong,
}

/// Per-reason counts of skipped records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipCounts {
    /// Records (or text files) that were not valid UTF-8.
    pub invalid_utf8: u64,
    /// JSON lines that did not parse.
    pub malformed_json: u64,
    /// Records without a string at the text field.
    pub no_text: u64,
    /// Records without a string at the domain field.
    pub no_domain: u64,
    /// Records whose domain or source cannot be a name (see the README).
    pub bad_name: u64,
    /// Documents with no text but whitespace.
    pub empty: u64,
    /// Documents (JSON lines, text files, Parquet values) longer than `--max-document-bytes`.
    #[serde(default)]
    pub too_long: u64,
}

impl SkipCounts {
    /// All skipped records.
    pub fn total(&self) -> u64 {
        self.invalid_utf8
            + self.malformed_json
            + self.no_text
            + self.no_domain
            + self.bad_name
            + self.empty
            + self.too_long
    }

    pub(crate) fn count(&mut self, skip: Skip) {
        *match skip {
            Skip::InvalidUtf8 => &mut self.invalid_utf8,
            Skip::MalformedJson => &mut self.malformed_json,
            Skip::NoText => &mut self.no_text,
            Skip::NoDomain => &mut self.no_domain,
            Skip::BadName => &mut self.bad_name,
            Skip::Empty => &mut self.empty,
            Skip::TooLong => &mut self.too_long,
        } += 1;
    }

    /// "3 malformed JSON, 1 empty" (nothing skipped: "none").
    pub fn describe(&self, fields: &Fields) -> String {
        let parts: Vec<String> = [
            (self.malformed_json, "malformed JSON".to_string()),
            (self.no_text, format!("no string `{}`", fields.text.0)),
            (self.no_domain, format!("no string `{}`", fields.domain.0)),
            (self.bad_name, "unusable domain/source name".to_string()),
            (self.invalid_utf8, "invalid UTF-8".to_string()),
            (self.empty, "empty".to_string()),
            (self.too_long, "too long".to_string()),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

/// One record as read from a file, before parsing.
pub(crate) enum RawRecord {
    /// A JSON line's bytes.
    Json(Vec<u8>),
    /// A whole text file's bytes.
    Text(Vec<u8>),
    /// A Parquet row's fields: text, domain and source (already strings or a skip).
    Columns(std::result::Result<(String, Option<String>, Option<String>), Skip>),
    /// A record longer than the cap, not held: at least this many bytes.
    TooLong(u64),
}

impl RawRecord {
    /// Bytes held (for batching).
    pub(crate) fn len(&self) -> usize {
        match self {
            RawRecord::Json(b) | RawRecord::Text(b) => b.len(),
            RawRecord::Columns(Ok((t, _, _))) => t.len(),
            RawRecord::Columns(Err(_)) | RawRecord::TooLong(_) => 0,
        }
    }
}

/// A usable document.
pub(crate) struct ParsedDoc {
    pub(crate) domain: String,
    pub(crate) source: String,
    pub(crate) text: String,
}

/// Longest part of a domain or source name, in bytes (file systems allow 255 per name, and a
/// shard's file name adds the unit's name to it).
pub const MAX_NAME_BYTES: usize = 100;
/// Most `/`-separated parts of a source name (each is one folder level of its shards).
pub const MAX_SOURCE_PARTS: usize = 8;

/// A name for a domain (one folder level) or a source (`/`-separated folder levels).
pub(crate) fn is_name(s: &str, slashes: bool) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= MAX_NAME_BYTES
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    };
    if slashes {
        s.split('/').count() <= MAX_SOURCE_PARTS && s.split('/').all(part_ok)
    } else {
        part_ok(s)
    }
}

/// A name shortened for a message (a hostile one may be megabytes long).
fn short(name: &str) -> String {
    match name.char_indices().nth(60) {
        Some((i, _)) => format!("{}... ({} bytes)", &name[..i], name.len()),
        None => name.to_string(),
    }
}

/// Why a record is skipped: the reason, a detail for `--strict`, and (for a text file) the
/// line the problem is on.
pub(crate) struct Rejected {
    pub(crate) skip: Skip,
    pub(crate) detail: String,
    pub(crate) line: Option<u64>,
}

impl From<(Skip, String)> for Rejected {
    fn from((skip, detail): (Skip, String)) -> Self {
        Rejected {
            skip,
            detail,
            line: None,
        }
    }
}

/// A record -> its document, or why it is skipped.
/// `fixed` is the domain and source a folder gives; otherwise they come from the record.
pub(crate) fn parse(
    raw: RawRecord,
    fields: &Fields,
    fixed: Option<&(String, String)>,
) -> std::result::Result<ParsedDoc, Rejected> {
    let (text, domain, source) = record_strings(raw, fields, fixed)?;
    if text.trim().is_empty() {
        return Err((Skip::Empty, "empty document".to_string()).into());
    }
    let (domain, source) = match fixed {
        Some((d, s)) => (d.clone(), s.clone()),
        None => {
            let domain = domain.ok_or_else(|| {
                Rejected::from((
                    Skip::NoDomain,
                    format!("no string field `{}` (the domain)", fields.domain.0),
                ))
            })?;
            let source = source.unwrap_or_else(|| "default".into());
            if !is_name(&domain, false) {
                return Err((
                    Skip::BadName,
                    format!(
                        "domain `{}` may use only letters, digits, '_', '-' and '.', at most {MAX_NAME_BYTES} of them",
                        short(&domain)
                    ),
                )
                    .into());
            }
            if !is_name(&source, true) {
                return Err((
                    Skip::BadName,
                    format!(
                        "source `{}` may use only letters, digits, '_', '-', '.' and '/' between at most \
                         {MAX_SOURCE_PARTS} parts of at most {MAX_NAME_BYTES} bytes",
                        short(&source)
                    ),
                )
                    .into());
            }
            (domain, source)
        }
    };
    Ok(ParsedDoc {
        domain,
        source,
        text,
    })
}

/// A record's text, and its domain and source as the record names them (None where absent,
/// or where a folder fixes them).
fn record_strings(
    raw: RawRecord,
    fields: &Fields,
    fixed: Option<&(String, String)>,
) -> std::result::Result<(String, Option<String>, Option<String>), Rejected> {
    Ok(match raw {
        RawRecord::TooLong(bytes) => {
            return Err((
                Skip::TooLong,
                format!(
                    "document of more than {bytes} bytes, over --max-document-bytes (raise it to keep such documents)"
                ),
            )
                .into())
        }
        RawRecord::Text(bytes) => {
            let text = String::from_utf8(bytes).map_err(|e| {
                let valid = e.utf8_error().valid_up_to();
                let line = 1 + e.as_bytes()[..valid]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count() as u64;
                Rejected {
                    skip: Skip::InvalidUtf8,
                    detail: "invalid UTF-8".into(),
                    line: Some(line),
                }
            })?;
            (text, None, None)
        }
        RawRecord::Json(bytes) => {
            let line = std::str::from_utf8(&bytes)
                .map_err(|_| Rejected::from((Skip::InvalidUtf8, "invalid UTF-8".to_string())))?;
            let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                Rejected::from((Skip::MalformedJson, format!("malformed JSON ({e})")))
            })?;
            let get = |path: &FieldPath, skip: Skip| {
                path.get_json(&value)
                    .map_err(|()| {
                        Rejected::from((skip, format!("field `{}` is not a string", path.0)))
                    })
                    .map(|s| s.map(str::to_string))
            };
            let text = get(&fields.text, Skip::NoText)?.ok_or_else(|| {
                Rejected::from((Skip::NoText, format!("no string field `{}`", fields.text.0)))
            })?;
            if fixed.is_some() {
                (text, None, None)
            } else {
                let domain = get(&fields.domain, Skip::NoDomain)?;
                let source = get(&fields.source, Skip::BadName)?;
                (text, domain, source)
            }
        }
        RawRecord::Columns(columns) => {
            let (text, domain, source) = columns.map_err(|skip| {
                let what = match skip {
                    Skip::NoText => format!("no string column `{}`", fields.text.0),
                    _ => "a column is not a string".to_string(),
                };
                Rejected::from((skip, what))
            })?;
            (text, domain, source)
        }
    })
}

/// Default cap on one document (a JSON line, a text file, a Parquet value), in bytes.
pub const DEFAULT_MAX_DOCUMENT_BYTES: u64 = 64 << 20;
/// Default cap on how many times its size a compressed file may expand to.
pub const DEFAULT_MAX_EXPANSION: u64 = 100;
/// A compressed file may always expand to this much, whatever its ratio (small files of
/// repetitive text compress far better than corpora do).
pub const EXPANSION_FLOOR_BYTES: u64 = 16 << 20;

/// Bounds on what one corpus file may make prepare hold or decompress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest document kept; longer ones are skipped as "too long" without being held.
    pub max_document_bytes: u64,
    /// A compressed file may expand to at most this many times its size (or
    /// [`EXPANSION_FLOOR_BYTES`]); past it the file is refused as a likely decompression bomb.
    pub max_expansion: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_document_bytes: DEFAULT_MAX_DOCUMENT_BYTES,
            max_expansion: DEFAULT_MAX_EXPANSION,
        }
    }
}

impl Limits {
    /// Most bytes a compressed file of `size` bytes may expand to.
    fn expansion_cap(&self, size: u64) -> u64 {
        size.saturating_mul(self.max_expansion)
            .max(EXPANSION_FLOOR_BYTES)
    }
}

/// Streams one file's records in order; `line` of each is 1-based (row or line number).
pub(crate) struct RecordReader {
    path: PathBuf,
    kind: ReaderKind,
    line: u64,
    max_document_bytes: u64,
}

enum ReaderKind {
    Lines(Box<dyn BufRead + Send>),
    Whole(Option<Box<dyn Read + Send>>),
    Parquet(ParquetRows),
}

/// Rows of a Parquet file, streamed (only the named columns are read).
struct ParquetRows {
    rows: parquet::record::reader::RowIter<'static>,
    fields: Fields,
    fixed: bool,
}

/// A decompressing reader that fails once it has produced more than `cap` bytes.
struct Capped<R> {
    inner: R,
    produced: u64,
    cap: u64,
    compressed: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.produced += n as u64;
        if self.produced > self.cap {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!(
                    "it expands past {} bytes, {}x its {} bytes on disk: a likely decompression bomb; \
                     if the file is genuine, raise --max-expansion",
                    self.cap,
                    self.cap / self.compressed.max(1),
                    self.compressed
                ),
            ));
        }
        Ok(n)
    }
}

fn decompressed(path: &Path, file: File, limits: &Limits) -> Box<dyn Read + Send> {
    let name = path.to_string_lossy().to_lowercase();
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let capped = |inner: Box<dyn Read + Send>| -> Box<dyn Read + Send> {
        Box::new(Capped {
            inner,
            produced: 0,
            cap: limits.expansion_cap(size),
            compressed: size,
        })
    };
    if name.ends_with(".gz") {
        capped(Box::new(flate2::read::MultiGzDecoder::new(
            BufReader::with_capacity(1 << 16, file),
        )))
    } else if name.ends_with(".zst") || name.ends_with(".zstd") {
        match zstd::stream::read::Decoder::new(file) {
            Ok(d) => capped(Box::new(d)),
            // Only fails allocating its context; report it as a read error on first use.
            Err(e) => Box::new(FailingReader(Some(e))),
        }
    } else {
        Box::new(file)
    }
}

struct FailingReader(Option<std::io::Error>);

impl Read for FailingReader {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(self
            .0
            .take()
            .unwrap_or_else(|| std::io::Error::other("decoder unavailable")))
    }
}

/// Reads one line (without its `\n`) into `line`, holding at most `cap` bytes of it: a longer
/// line is read to its end but not kept. Returns the line's length, or None at the end.
fn read_bounded_line(
    reader: &mut dyn BufRead,
    line: &mut Vec<u8>,
    cap: u64,
) -> std::io::Result<Option<u64>> {
    line.clear();
    let mut length = 0u64;
    let mut any = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(any.then_some(length));
        }
        any = true;
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if length + chunk.len() as u64 <= cap {
            line.extend_from_slice(chunk);
        } else if length <= cap {
            // Past the cap: what was kept is dropped, the rest only counted.
            *line = Vec::new();
        }
        length += chunk.len() as u64;
        let used = done.unwrap_or(buf.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(Some(length));
        }
    }
}

impl RecordReader {
    /// Opens a file of `format`; `fixed` says a folder gives the domain (Parquet then reads
    /// only the text column).
    pub(crate) fn open(
        path: &Path,
        format: Format,
        fields: &Fields,
        fixed: bool,
        limits: &Limits,
    ) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let kind = match format {
            Format::Jsonl => ReaderKind::Lines(Box::new(BufReader::with_capacity(
                1 << 20,
                decompressed(path, file, limits),
            ))),
            Format::Text => ReaderKind::Whole(Some(decompressed(path, file, limits))),
            Format::Parquet => {
                ReaderKind::Parquet(ParquetRows::open(path, file, fields, fixed, limits)?)
            }
        };
        Ok(RecordReader {
            path: path.to_path_buf(),
            kind,
            line: 0,
            max_document_bytes: limits.max_document_bytes,
        })
    }

    fn corrupt(&self, e: impl std::fmt::Display) -> DataError {
        DataError::Input {
            path: self.path.clone(),
            line: self.line,
            reason: format!("cannot read ({e}); the file is truncated or corrupt"),
        }
    }

    /// A read error: a decompression past its cap says so, anything else is corruption.
    fn read_error(&self, e: std::io::Error) -> DataError {
        if e.kind() == std::io::ErrorKind::FileTooLarge {
            return DataError::Input {
                path: self.path.clone(),
                line: self.line,
                reason: e.to_string(),
            };
        }
        self.corrupt(e)
    }

    /// The next record and its line (or row) number; None at the end of the file.
    pub(crate) fn next_record(&mut self) -> Result<Option<(u64, RawRecord)>> {
        let cap = self.max_document_bytes;
        match &mut self.kind {
            ReaderKind::Lines(reader) => loop {
                let mut line = Vec::new();
                let n = match read_bounded_line(reader.as_mut(), &mut line, cap) {
                    Ok(Some(n)) => n,
                    Ok(None) => return Ok(None),
                    Err(e) => {
                        self.line += 1;
                        return Err(self.read_error(e));
                    }
                };
                self.line += 1;
                if n > cap {
                    return Ok(Some((self.line, RawRecord::TooLong(n))));
                }
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some((self.line, RawRecord::Json(line))));
            },
            ReaderKind::Whole(reader) => {
                let Some(r) = reader.take() else {
                    return Ok(None);
                };
                let mut bytes = Vec::new();
                self.line = 1;
                // One byte past the cap tells a document at the cap from a longer one, which
                // is not read further.
                if let Err(e) = r.take(cap.saturating_add(1)).read_to_end(&mut bytes) {
                    return Err(self.read_error(e));
                }
                if bytes.len() as u64 > cap {
                    return Ok(Some((1, RawRecord::TooLong(cap + 1))));
                }
                Ok(Some((1, RawRecord::Text(bytes))))
            }
            ReaderKind::Parquet(rows) => match rows.next_row() {
                Ok(None) => Ok(None),
                Ok(Some(columns)) => {
                    self.line += 1;
                    let long = columns.as_ref().map_or(0, |(t, _, _)| t.len() as u64);
                    if long > cap {
                        return Ok(Some((self.line, RawRecord::TooLong(long))));
                    }
                    Ok(Some((self.line, RawRecord::Columns(columns))))
                }
                Err(e) => {
                    self.line += 1;
                    Err(self.corrupt(e))
                }
            },
        }
    }
}

type Columns = std::result::Result<(String, Option<String>, Option<String>), Skip>;

impl ParquetRows {
    fn open(
        path: &Path,
        file: File,
        fields: &Fields,
        fixed: bool,
        limits: &Limits,
    ) -> Result<Self> {
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let reader = SerializedFileReader::new(file).map_err(|e| DataError::Input {
            path: path.to_path_buf(),
            line: 0,
            reason: format!("not a readable Parquet file ({e})"),
        })?;
        // The row groups' uncompressed sizes are in the footer: a bomb is refused unread.
        let uncompressed: u64 = reader
            .metadata()
            .row_groups()
            .iter()
            .map(|g| u64::try_from(g.total_byte_size()).unwrap_or(u64::MAX))
            .fold(0, u64::saturating_add);
        if uncompressed > limits.expansion_cap(size) {
            return Err(DataError::Input {
                path: path.to_path_buf(),
                line: 0,
                reason: format!(
                    "its row groups hold {uncompressed} bytes uncompressed, more than {}x its {size} bytes \
                     on disk: a likely decompression bomb; if the file is genuine, raise --max-expansion",
                    limits.max_expansion
                ),
            });
        }
        let schema = reader.metadata().file_metadata().schema();
        let columns: Vec<String> = schema
            .get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let mut wanted = vec![fields.text.top()];
        if !fixed {
            wanted.push(fields.domain.top());
            wanted.push(fields.source.top());
        }
        if !columns.iter().any(|c| c == fields.text.top()) {
            return Err(DataError::Input {
                path: path.to_path_buf(),
                line: 0,
                reason: format!(
                    "no column `{}` for the text (columns: {}); pass --text-field",
                    fields.text.top(),
                    columns.join(", ")
                ),
            });
        }
        // Read only the columns the fields name: a corpus table often carries much more.
        let chosen: Vec<_> = schema
            .get_fields()
            .iter()
            .filter(|f| wanted.contains(&f.name()))
            .cloned()
            .collect();
        let bad = |e: parquet::errors::ParquetError| DataError::Input {
            path: path.to_path_buf(),
            line: 0,
            reason: format!("cannot select columns {wanted:?} ({e})"),
        };
        let projection = parquet::schema::types::Type::group_type_builder(schema.name())
            .with_fields(chosen)
            .build()
            .map_err(bad)?;
        let rows = parquet::record::reader::RowIter::from_file_into(Box::new(reader))
            .project(Some(projection))
            .map_err(bad)?;
        Ok(ParquetRows {
            rows,
            fields: fields.clone(),
            fixed,
        })
    }

    fn next_row(&mut self) -> parquet::errors::Result<Option<Columns>> {
        match self.rows.next() {
            None => Ok(None),
            Some(row) => Ok(Some(self.columns(&row?))),
        }
    }

    fn columns(&self, row: &Row) -> Columns {
        let text = match self.fields.text.get_row(row) {
            Ok(Some(t)) => t.to_string(),
            Ok(None) | Err(()) => return Err(Skip::NoText),
        };
        if self.fixed {
            return Ok((text, None, None));
        }
        let domain = self
            .fields
            .domain
            .get_row(row)
            .map_err(|()| Skip::NoDomain)?
            .map(str::to_string);
        let source = self
            .fields
            .source
            .get_row(row)
            .map_err(|()| Skip::BadName)?
            .map(str::to_string);
        Ok((text, domain, source))
    }
}
