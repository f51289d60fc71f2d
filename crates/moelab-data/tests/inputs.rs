//! The formats corpora ship in: Dolma and datatrove JSONL (compressed), nested field paths,
//! Parquet, plain text; sources with `/`; skip reasons per file; failures leave no dataset.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{options, text, write};
use moelab_data::{
    prepare, DataConfig, Dataset, FieldPath, MixtureStream, PrepareOptions, TokenizerChoice,
};

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, bytes).unwrap();
    enc.finish().unwrap()
}

/// Training and validation documents of every (domain/source).
fn documents(ds: &Dataset) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for (d, domain) in ds.domains().iter().enumerate() {
        for (s, source) in ds.sources(d).iter().enumerate() {
            let src = &ds.manifest().domains[d].sources[s];
            out.push((
                format!("{domain}/{source}"),
                src.train.documents + src.validation.documents,
            ));
            assert_eq!(ds.train_counts(d, s), src.train);
        }
    }
    out
}

#[test]
fn dolma_layout_with_nested_domain_field_and_sources_with_slashes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for i in 0..24u64 {
        let (source, domain) = match i % 3 {
            0 => ("common-crawl/2019", "web"),
            1 => ("common-crawl/2020", "web"),
            _ => ("wikipedia", "wiki"),
        };
        let rec = serde_json::json!({
            "id": format!("doc-{i}"), "text": text(i, 40), "source": source,
            "added": "2024-01-01", "metadata": {"domain": domain, "length": 40}
        });
        lines.push_str(&(rec.to_string() + "\n"));
    }
    // One record of each way to be unusable.
    for bad in [
        serde_json::json!({"id": "a", "text": text(90, 9), "metadata": {}}),
        serde_json::json!({"id": "b", "text": text(91, 9), "metadata": {"domain": 5}}),
        serde_json::json!({"id": "c", "text": text(92, 9), "source": "../up", "metadata": {"domain": "web"}}),
        serde_json::json!({"id": "d", "text": "  \n", "metadata": {"domain": "web"}}),
        serde_json::json!({"id": "e", "body": "no text", "metadata": {"domain": "web"}}),
    ] {
        lines.push_str(&(bad.to_string() + "\n"));
    }
    lines.push_str("{\"id\": \"f\", \"text\": \n");
    let file = tmp.path().join("dolma-0000.json.gz");
    std::fs::write(&file, gz(lines.as_bytes())).unwrap();
    let out = tmp.path().join("out");
    let mut opts = options(&file, &out);
    opts.inputs = vec![file.clone()];

    // Without the nested path nothing has a domain: the error says so per file.
    let err = prepare(&opts, &|_| {}).unwrap_err().to_string();
    assert!(err.contains("27 no string `domain`"), "{err}");
    assert!(err.contains("--domain-field (now `domain`"), "{err}");
    assert!(!out.exists(), "a failed prepare leaves no output folder");

    opts.fields.domain = FieldPath("metadata.domain".into());
    let report = prepare(&opts, &|_| {}).unwrap();
    let stats = &report.manifest.inputs[0];
    assert_eq!(stats.documents, 24);
    let s = stats.skipped;
    assert_eq!(
        (
            s.no_domain,
            s.bad_name,
            s.empty,
            s.no_text,
            s.malformed_json
        ),
        (2, 1, 1, 1, 1),
        "{s:?}"
    );
    let ds = Dataset::open(&out).unwrap();
    ds.verify().unwrap();
    assert_eq!(
        documents(&ds),
        [
            ("web/common-crawl/2019".to_string(), 8),
            ("web/common-crawl/2020".to_string(), 8),
            ("wiki/wikipedia".to_string(), 8)
        ]
    );
    let shard = &ds.manifest().domains[0].sources[0].shards[0].tokens_file;
    assert!(
        shard.starts_with("shards/web/common-crawl/2019/"),
        "{shard}"
    );

    // A source with `/` is addressed like any other in a source mixture.
    let mut cfg = DataConfig::new(&out, 8);
    cfg.mixture.insert("web".into(), 1.0);
    cfg.source_mixture.insert(
        "web".into(),
        [("common-crawl/2019".to_string(), 1.0)]
            .into_iter()
            .collect(),
    );
    let stream = MixtureStream::new(Arc::new(ds), &cfg, 0).unwrap();
    let batch = stream.batch(0, 4).unwrap();
    assert!(batch.source_ids.iter().all(|&s| s == 0));

    // --strict stops at the first bad record with file and line.
    opts.strict = true;
    opts.out = tmp.path().join("strict");
    let err = prepare(&opts, &|_| {}).unwrap_err().to_string();
    assert!(
        err.contains("dolma-0000.json.gz:25") && err.contains("metadata.domain"),
        "{err}"
    );
    assert!(!opts.out.exists());
}

#[test]
fn datatrove_layout_with_nested_text_and_source_fields_zstd() {
    let tmp = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for i in 0..20u64 {
        let rec = serde_json::json!({
            "id": i, "content": {"body": text(100 + i, 30)},
            "metadata": {"dataset": if i % 2 == 0 { "math" } else { "code" }, "origin": {"name": "stack/v2"}}
        });
        lines.push_str(&(rec.to_string() + "\n"));
    }
    let file = tmp.path().join("00000.jsonl.zst");
    std::fs::write(
        &file,
        zstd::stream::encode_all(lines.as_bytes(), 3).unwrap(),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let mut opts = options(&file, &out);
    opts.inputs = vec![file];
    opts.fields.text = FieldPath("content.body".into());
    opts.fields.domain = FieldPath("metadata.dataset".into());
    opts.fields.source = FieldPath("metadata.origin.name".into());
    prepare(&opts, &|_| {}).unwrap();
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(
        documents(&ds),
        [
            ("code/stack/v2".to_string(), 10),
            ("math/stack/v2".to_string(), 10)
        ]
    );
    // The text came from the nested field: the tokenizer round-trips a training word.
    let tok = tokenizers::Tokenizer::from_file(ds.tokenizer_path()).unwrap();
    assert!(tok.get_vocab_size(true) > 256);

    // A bad field path is refused before any work.
    opts.fields.text = FieldPath("content..body".into());
    opts.out = tmp.path().join("out2");
    let err = prepare(&opts, &|_| {}).unwrap_err().to_string();
    assert!(
        err.contains("--text-field") && err.contains("content..body"),
        "{err}"
    );
}

/// A Parquet file with columns text, id, metadata.domain and source; `None` values are nulls.
fn write_parquet(path: &Path, rows: &[(Option<String>, Option<&str>, Option<&str>)]) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = parquet::schema::parser::parse_message_type(
        "message doc { optional binary text (UTF8); required int64 id; \
         optional group metadata { optional binary domain (UTF8); } optional binary source (UTF8); }",
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props)).unwrap();
    // Two row groups, to read across their boundary.
    for chunk in rows.chunks(rows.len().div_ceil(2)) {
        let mut group = writer.next_row_group().unwrap();
        let mut column = 0;
        while let Some(mut col) = group.next_column().unwrap() {
            let strings = |values: Vec<Option<&str>>, max_def: i16| {
                let defs: Vec<i16> = values
                    .iter()
                    .map(|v| if v.is_some() { max_def } else { max_def - 1 })
                    .collect();
                let present: Vec<ByteArray> = values
                    .iter()
                    .flatten()
                    .map(|s| ByteArray::from(*s))
                    .collect();
                (present, defs)
            };
            match column {
                0 => {
                    let (v, d) = strings(chunk.iter().map(|r| r.0.as_deref()).collect(), 1);
                    col.typed::<ByteArrayType>()
                        .write_batch(&v, Some(&d), None)
                        .unwrap();
                }
                1 => {
                    let ids: Vec<i64> = (0..chunk.len() as i64).collect();
                    col.typed::<Int64Type>()
                        .write_batch(&ids, None, None)
                        .unwrap();
                }
                2 => {
                    let (v, d) = strings(chunk.iter().map(|r| r.1).collect(), 2);
                    col.typed::<ByteArrayType>()
                        .write_batch(&v, Some(&d), None)
                        .unwrap();
                }
                _ => {
                    let (v, d) = strings(chunk.iter().map(|r| r.2).collect(), 1);
                    col.typed::<ByteArrayType>()
                        .write_batch(&v, Some(&d), None)
                        .unwrap();
                }
            }
            col.close().unwrap();
            column += 1;
        }
        group.close().unwrap();
    }
    writer.close().unwrap();
}

#[test]
fn parquet_text_and_metadata_columns_and_plain_text() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rows: Vec<(Option<String>, Option<&str>, Option<&str>)> = (0..30u64)
        .map(|i| {
            let domain = if i % 3 == 0 { "math" } else { "web" };
            let source = if i % 2 == 0 { Some("forum/2021") } else { None };
            (Some(text(200 + i, 35)), Some(domain), source)
        })
        .collect();
    rows.push((None, Some("web"), None));
    rows.push((Some(text(300, 20)), None, None));
    let table = tmp.path().join("table.parquet");
    write_parquet(&table, &rows);

    // A corpus folder: a Parquet file in a domain folder (only its text is read), a gzipped
    // text file, and the table above at the root (domains from its rows).
    let corpus = tmp.path().join("corpus");
    write_parquet(
        &corpus.join("books/shelf/part-0.parquet"),
        &(0..6u64)
            .map(|i| (Some(text(400 + i, 50)), Some("ignored"), Some("ignored")))
            .collect::<Vec<_>>(),
    );
    write(
        &corpus.join("books/shelf/novel.txt.gz"),
        gz(text(500, 80).as_bytes()),
    );
    std::fs::copy(&table, corpus.join("table.parquet")).unwrap();

    let out = tmp.path().join("out");
    let mut opts = options(&corpus, &out);
    opts.fields.domain = FieldPath("metadata.domain".into());
    let report = prepare(&opts, &|_| {}).unwrap();
    let by_name = |n: &str| {
        report
            .manifest
            .inputs
            .iter()
            .find(|i| i.path.ends_with(n))
            .unwrap()
            .clone()
    };
    let t = by_name("corpus/table.parquet");
    assert_eq!(
        (t.documents, t.skipped.no_text, t.skipped.no_domain),
        (30, 1, 1)
    );
    assert_eq!(by_name("part-0.parquet").documents, 6);
    assert_eq!(by_name("novel.txt.gz").documents, 1);
    let ds = Dataset::open(&out).unwrap();
    ds.verify().unwrap();
    assert_eq!(
        documents(&ds),
        [
            ("books/shelf".to_string(), 7),
            ("math/default".to_string(), 5),
            ("math/forum/2021".to_string(), 5),
            ("web/default".to_string(), 10),
            ("web/forum/2021".to_string(), 10),
        ]
    );

    // A table without the text column names the file and its columns.
    let mut opts = options(&table, &tmp.path().join("out2"));
    opts.inputs = vec![table];
    opts.fields.text = FieldPath("body".into());
    let err = prepare(&opts, &|_| {}).unwrap_err().to_string();
    assert!(
        err.contains("table.parquet")
            && err.contains("no column `body`")
            && err.contains("text, id, metadata, source"),
        "{err}"
    );
    assert!(!tmp.path().join("out2").exists());
}

#[test]
fn a_failed_prepare_leaves_nothing_that_looks_like_a_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = common::corpus(tmp.path(), 6);
    let out = tmp.path().join("sub/out");
    // A tokenizer that does not exist.
    let mut opts = options(&corpus, &out);
    opts.tokenizer = TokenizerChoice::File(tmp.path().join("missing.json"));
    assert!(prepare(&opts, &|_| {}).is_err());
    assert!(!out.exists());
    // A corrupt compressed file, found after other units were encoded (with a given tokenizer:
    // training would meet it first).
    let first = tmp.path().join("first");
    prepare(&options(&corpus, &first), &|_| {}).unwrap();
    let bad = corpus.join("zzz/broken.jsonl.gz");
    write(&bad, b"\x1f\x8b\x08\x00 not really gzip");
    opts.tokenizer = TokenizerChoice::File(first.join("tokenizer.json"));
    let err = prepare(&opts, &|_| {}).unwrap_err().to_string();
    assert!(err.contains("broken.jsonl.gz"), "{err}");
    assert!(!out.exists(), "no output folder after a failure");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("sub"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leftovers
            .iter()
            .all(|n| n.to_string_lossy().starts_with('.')),
        "only a hidden work folder may stay, to resume from: {leftovers:?}"
    );
    // Fixed, the next run completes into the output folder and reuses what was encoded.
    std::fs::remove_file(&bad).unwrap();
    let report = prepare(&opts, &|_| {}).unwrap();
    assert!(report.reused_units > 0, "the finished units were kept");
    Dataset::open(&out).unwrap().verify().unwrap();
    assert!(std::fs::read_dir(tmp.path().join("sub"))
        .unwrap()
        .flatten()
        .all(|e| e.file_name() == "out"));
}

#[test]
fn options_are_checked_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = common::corpus(tmp.path(), 2);
    let mut opts = PrepareOptions::new(
        vec![corpus.clone()],
        tmp.path().join("out"),
        TokenizerChoice::Train(300),
    );
    opts.part = Some("1/4".parse().unwrap());
    let err = prepare(&opts, &|_| {}).unwrap_err().to_string();
    assert!(err.contains("--part 1/4 needs --tokenizer FILE"), "{err}");
    assert!("4/4".parse::<moelab_data::Part>().is_err());
    assert!("x".parse::<moelab_data::Part>().is_err());
    // A text file cannot be given directly: it has no domain.
    let txt = tmp.path().join("loose.txt");
    write(&txt, "some text");
    let opts = PrepareOptions::new(
        vec![txt],
        tmp.path().join("out"),
        TokenizerChoice::Train(300),
    );
    let err = prepare(&opts, &|_| {}).unwrap_err().to_string();
    assert!(
        err.contains("loose.txt") && err.contains("JSONL or Parquet"),
        "{err}"
    );
    assert!(!tmp.path().join("out").exists());
}
