//! TensorBoard event files (`log.tensorboard = true`), written directly: no maintained Rust
//! TensorBoard crate exists, and the few pieces of the format a scalar log needs are small.
//!
//! An event file is a TFRecord stream. Each record is
//! `u64 LE length | u32 LE masked CRC32C of those 8 bytes | data | u32 LE masked CRC32C of data`,
//! where `masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8` (wrapping). Each record's data
//! is one `tensorflow.Event` protobuf:
//!
//! ```text
//! Event      { wall_time: double = 1; step: int64 = 2; file_version: string = 3;
//!              summary: Summary = 5; session_log: SessionLog = 7 }
//! Summary    { repeated Value value = 1 }
//! Value      { tag: string = 1; simple_value: float = 2 }
//! SessionLog { status: enum = 1 (START = 1) }
//! ```
//!
//! The first record carries `file_version = "brain.Event:2"`; every scalar is then one Event with
//! `wall_time`, `step` and a one-value `summary`.
//!
//! A resumed run starts a new event file beside the old ones (TensorBoard merges the files of
//! one folder, reading them in name order, hence the leading Unix seconds). Old files are never
//! truncated: a killed run's file may end in the steps past the checkpoint it resumes from, and
//! instead of rewriting it the new file opens with a `SessionLog START` event at the first new
//! step, which tells TensorBoard to drop the earlier data from that step on.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::TrainError;

/// The format marker of the first record, which TensorBoard checks.
const FILE_VERSION: &str = "brain.Event:2";

/// Appends scalar events to one new event file in a TensorBoard log folder.
pub(crate) struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it; `resume_step` is the checkpoint step
    /// a resumed run continues from (0 for a fresh run).
    pub(crate) fn create(dir: &Path, resume_step: u64) -> Result<Self, TrainError> {
        std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
        let host = hostname();
        let pid = std::process::id();
        let mut secs = unix_seconds() as u64;
        // A second writer of this process in the same second (tests, or a resume in-process)
        // takes the next free second, so that its file still sorts after the earlier one.
        let (file, path) = loop {
            let path = dir.join(format!("events.out.tfevents.{secs}.{host}.{pid}.moelab"));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (file, path),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => secs += 1,
                Err(source) => return Err(TrainError::io(&path)(source)),
            }
        };
        let mut writer = Self {
            file: BufWriter::new(file),
            path,
        };
        let wall_time = unix_seconds();
        writer.record(&header_event(wall_time))?;
        if resume_step > 0 {
            writer.record(&session_start_event(
                wall_time,
                resume_step.saturating_add(1),
            ))?;
        }
        writer.flush()?;
        Ok(writer)
    }

    /// Appends one scalar (buffered until [`EventWriter::flush`]).
    pub(crate) fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<(), TrainError> {
        self.record(&scalar_event(unix_seconds(), step, tag, value))
    }

    /// Hands buffered events to the OS, so that a killed run loses at most its last step.
    pub(crate) fn flush(&mut self) -> Result<(), TrainError> {
        let path = &self.path;
        self.file.flush().map_err(TrainError::io(path))
    }

    /// The event file being written.
    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> Result<(), TrainError> {
        let length = (data.len() as u64).to_le_bytes();
        let mut bytes = Vec::with_capacity(data.len() + 16);
        bytes.extend_from_slice(&length);
        bytes.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
        bytes.extend_from_slice(data);
        bytes.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.file
            .write_all(&bytes)
            .map_err(TrainError::io(&self.path))
    }
}

/// The first Event of a file: its wall time and format version.
fn header_event(wall_time: f64) -> Vec<u8> {
    let mut event = Vec::new();
    put_f64(&mut event, 1, wall_time);
    put_bytes(&mut event, 3, FILE_VERSION.as_bytes());
    event
}

/// An Event marking a (re)start at `step`: TensorBoard then drops what it read at `step` and
/// later, which on resume is the abandoned continuation.
fn session_start_event(wall_time: f64, step: u64) -> Vec<u8> {
    let mut session_log = Vec::new();
    put_varint_field(&mut session_log, 1, 1);
    let mut event = Vec::new();
    put_f64(&mut event, 1, wall_time);
    put_varint_field(&mut event, 2, step);
    // Field 7: 6 is the deprecated log_message, which TensorBoard does not act on.
    put_bytes(&mut event, 7, &session_log);
    event
}

/// An Event holding one scalar summary value.
fn scalar_event(wall_time: f64, step: u64, tag: &str, value: f64) -> Vec<u8> {
    let mut summary_value = Vec::new();
    put_bytes(&mut summary_value, 1, tag.as_bytes());
    // simple_value is a 32-bit float in the format.
    put_f32(&mut summary_value, 2, value as f32);
    let mut summary = Vec::new();
    put_bytes(&mut summary, 1, &summary_value);
    let mut event = Vec::new();
    put_f64(&mut event, 1, wall_time);
    put_varint_field(&mut event, 2, step);
    put_bytes(&mut event, 5, &summary);
    event
}

/// The TFRecord checksum: CRC32C, rotated and offset so that a CRC of data that itself holds
/// CRCs does not degenerate.
pub(crate) fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    // The format's `(crc >> 15) | (crc << 17)`.
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Seconds since the Unix epoch, the `wall_time` of events.
fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// This machine's name for the event file name (TensorBoard's convention), restricted to
/// characters that are safe in a file name; `localhost` when it cannot be read.
fn hostname() -> String {
    let name = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name = moelab_trace::report::file_name_chars(name.trim());
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

// Protobuf wire format: a field key is `(field << 3) | wire_type`, as a varint.
const WIRE_VARINT: u64 = 0;
const WIRE_FIXED64: u64 = 1;
const WIRE_LENGTH_DELIMITED: u64 = 2;
const WIRE_FIXED32: u64 = 5;

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_key(out: &mut Vec<u8>, field: u64, wire_type: u64) {
    put_varint(out, (field << 3) | wire_type);
}

/// An int64 or enum field; steps are below 2^63, so their varint equals the int64's.
fn put_varint_field(out: &mut Vec<u8>, field: u64, value: u64) {
    put_key(out, field, WIRE_VARINT);
    put_varint(out, value);
}

fn put_f64(out: &mut Vec<u8>, field: u64, value: f64) {
    put_key(out, field, WIRE_FIXED64);
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_f32(out: &mut Vec<u8>, field: u64, value: f32) {
    put_key(out, field, WIRE_FIXED32);
    out.extend_from_slice(&value.to_le_bytes());
}

/// A string, bytes or embedded-message field.
fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(out, field, WIRE_LENGTH_DELIMITED);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// One decoded Event: the fields moelab writes.
    #[derive(Debug, Default, PartialEq)]
    pub(crate) struct Event {
        pub wall_time: f64,
        pub step: u64,
        pub file_version: Option<String>,
        /// (tag, simple_value) of the summary's values.
        pub values: Vec<(String, f32)>,
        /// The SessionLog status, when the event has one.
        pub session_status: Option<u64>,
    }

    /// Reads an event file back, checking every length and both CRCs of each record.
    pub(crate) fn read_events(path: &Path) -> Vec<Event> {
        let bytes = std::fs::read(path).unwrap();
        let mut events = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let length_bytes = &bytes[at..at + 8];
            let length = u64::from_le_bytes(length_bytes.try_into().unwrap()) as usize;
            let length_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(
                length_crc,
                masked_crc32c(length_bytes),
                "length CRC at {at}"
            );
            let data = &bytes[at + 12..at + 12 + length];
            let data_crc = u32::from_le_bytes(
                bytes[at + 12 + length..at + 16 + length]
                    .try_into()
                    .unwrap(),
            );
            assert_eq!(data_crc, masked_crc32c(data), "data CRC at {at}");
            events.push(decode_event(data));
            at += 16 + length;
        }
        assert_eq!(at, bytes.len(), "the file ends on a record boundary");
        events
    }

    fn varint(data: &[u8], at: &mut usize) -> u64 {
        let mut value = 0u64;
        let mut shift = 0;
        loop {
            let byte = data[*at];
            *at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return value;
            }
            shift += 7;
        }
    }

    /// Splits a message into (field, wire type, payload); varints come back as their 8 LE bytes.
    fn fields(data: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < data.len() {
            let key = varint(data, &mut at);
            let (field, wire) = (key >> 3, key & 7);
            let payload = match wire {
                WIRE_VARINT => varint(data, &mut at).to_le_bytes().to_vec(),
                WIRE_FIXED64 => {
                    at += 8;
                    data[at - 8..at].to_vec()
                }
                WIRE_FIXED32 => {
                    at += 4;
                    data[at - 4..at].to_vec()
                }
                WIRE_LENGTH_DELIMITED => {
                    let n = varint(data, &mut at) as usize;
                    at += n;
                    data[at - n..at].to_vec()
                }
                other => panic!("unexpected wire type {other}"),
            };
            out.push((field, wire, payload));
        }
        out
    }

    fn decode_event(data: &[u8]) -> Event {
        let mut event = Event::default();
        for (field, wire, payload) in fields(data) {
            match (field, wire) {
                (1, WIRE_FIXED64) => event.wall_time = f64::from_le_bytes(payload_8(&payload)),
                (2, WIRE_VARINT) => event.step = u64::from_le_bytes(payload_8(&payload)),
                (3, WIRE_LENGTH_DELIMITED) => {
                    event.file_version = Some(String::from_utf8(payload).unwrap())
                }
                (5, WIRE_LENGTH_DELIMITED) => {
                    for (vf, vw, value) in fields(&payload) {
                        assert_eq!((vf, vw), (1, WIRE_LENGTH_DELIMITED), "Summary.value");
                        let (mut tag, mut simple) = (None, None);
                        for (f, w, p) in fields(&value) {
                            match (f, w) {
                                (1, WIRE_LENGTH_DELIMITED) => {
                                    tag = Some(String::from_utf8(p).unwrap())
                                }
                                (2, WIRE_FIXED32) => {
                                    simple = Some(f32::from_le_bytes(p.try_into().unwrap()))
                                }
                                other => panic!("unexpected Value field {other:?}"),
                            }
                        }
                        event.values.push((tag.unwrap(), simple.unwrap()));
                    }
                }
                (7, WIRE_LENGTH_DELIMITED) => {
                    let status = fields(&payload)
                        .into_iter()
                        .find(|(f, w, _)| (*f, *w) == (1, WIRE_VARINT))
                        .map(|(_, _, p)| u64::from_le_bytes(payload_8(&p)));
                    event.session_status = status;
                }
                other => panic!("unexpected Event field {other:?}"),
            }
        }
        event
    }

    fn payload_8(payload: &[u8]) -> [u8; 8] {
        payload.try_into().unwrap()
    }

    pub(crate) fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("moelab-tb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn crc32c_test_vector_and_mask() {
        // The standard CRC32C check value, and its mask computed by hand:
        // 0xE3069283 rotated right by 15 is 0x2507C60D; plus 0xA282EAD8 is 0xC78AB0E5.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
        // Masking wraps instead of overflowing.
        assert_eq!(masked_crc32c(b""), 0xA282_EAD8);
    }

    #[test]
    fn varints_match_the_protobuf_encoding() {
        for (value, expected) in [
            (0u64, vec![0x00]),
            (1, vec![0x01]),
            (127, vec![0x7f]),
            (150, vec![0x96, 0x01]),
            (300, vec![0xac, 0x02]),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out, expected, "{value}");
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn events_match_the_protobuf_library_bytes() {
        // Serialized by TensorBoard's own event_pb2 (Python protobuf), wall_time 1.5.
        assert_eq!(
            hex(&header_event(1.5)),
            "09000000000000f83f1a0d627261696e2e4576656e743a32"
        );
        assert_eq!(
            hex(&scalar_event(1.5, 300, "eval/loss/math", 2.5)),
            "09000000000000f83f10ac022a170a150a0e6576616c2f6c6f73732f6d6174681500002040"
        );
        assert_eq!(
            hex(&session_start_event(1.5, 41)),
            "09000000000000f83f10293a020801"
        );
    }

    #[test]
    fn scalars_round_trip_through_the_record_format() {
        let dir = scratch("roundtrip");
        let mut writer = EventWriter::create(&dir, 0).unwrap();
        writer.scalar("train/loss", 1, 4.25).unwrap();
        writer.scalar("train/lr", 1, 3e-3).unwrap();
        writer.scalar("eval/loss/math", 300, 2.5).unwrap();
        writer.flush().unwrap();
        let name = writer.path().file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert!(
            name.ends_with(&format!(".{}.moelab", std::process::id())),
            "{name}"
        );

        let events = read_events(writer.path());
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].file_version.as_deref(), Some(FILE_VERSION));
        assert!(events[0].values.is_empty() && events[0].wall_time > 1e9);
        let scalars: Vec<(u64, String, f32)> = events[1..]
            .iter()
            .map(|e| {
                assert_eq!(e.values.len(), 1);
                assert!(e.wall_time >= events[0].wall_time);
                (e.step, e.values[0].0.clone(), e.values[0].1)
            })
            .collect();
        assert_eq!(
            scalars,
            [
                (1, "train/loss".to_string(), 4.25),
                (1, "train/lr".to_string(), 3e-3),
                (300, "eval/loss/math".to_string(), 2.5),
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_resumed_writer_starts_a_new_file_with_a_session_start() {
        let dir = scratch("resume");
        let first = EventWriter::create(&dir, 0).unwrap();
        let second = EventWriter::create(&dir, 40).unwrap();
        assert_ne!(first.path(), second.path());
        // TensorBoard reads a folder's files in name order: the resumed one must come last.
        assert!(second.path() > first.path());
        assert_eq!(read_events(first.path()).len(), 1);
        let events = read_events(second.path());
        assert_eq!(events.len(), 2);
        assert_eq!((events[1].step, events[1].session_status), (41, Some(1)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
