//! Hostile inputs on the data side: manifests, unit records and folders from other people.
//! Nothing outside what the user named is read or written, no file moelab did not write is
//! changed, links in corpora follow a stated policy, and a dataset has one writer at a time.

use std::path::{Path, PathBuf};

use crate::corpus::Corpus;
use crate::util::{arg, command, fails, moelab, ok, stderr, Scratch};

/// Prepares `Corpus::three_domains` from `dir/corpus` into `dir/<name>` with a 300-token BPE.
fn prepared(dir: &Scratch, name: &str) -> PathBuf {
    let corpus = dir.join("corpus");
    if !corpus.exists() {
        Corpus::three_domains().write(&corpus);
    }
    let out = dir.join(name);
    ok(&moelab(&[
        "prepare",
        arg(&corpus),
        "--out",
        arg(&out),
        "--train-tokenizer",
        "300",
    ]));
    out
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn write_json(path: &Path, value: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
}

/// Every file under `dir`, relative, sorted, with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.push((rel, std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn merge_refuses_a_part_that_names_files_outside_it_before_writing_anything() {
    let dir = Scratch::new("hostile-merge");
    let tok = prepared(&dir, "tok");
    let tokenizer = tok.join("tokenizer.json");
    let corpus = dir.join("corpus");
    let mut parts = Vec::new();
    for i in 0..2 {
        let part = dir.join(format!("parts/{i}"));
        ok(&moelab(&[
            "prepare",
            arg(&corpus),
            "--out",
            arg(&part),
            "--tokenizer",
            arg(&tokenizer),
            "--part",
            &format!("{i}/2"),
        ]));
        parts.push(part);
    }
    // The attacker's part 0: its first shard is "../../victim.txt" in the unit record and the
    // manifest, with the victim's real size and hash so every later check would pass.
    let victim = dir.join("victim.txt");
    let part = &parts[0];
    let manifest_path = part.join("manifest.json");
    let original_manifest = std::fs::read(&manifest_path).unwrap();
    let mut manifest = read_json(&manifest_path);
    let unit = manifest["part"]["units"][0].as_str().unwrap().to_string();
    let record_path = part.join(format!("units/{unit}.json"));
    let mut record = read_json(&record_path);
    let shard = record["shards"][0]["shard"].clone();
    let real = std::fs::read(part.join(shard["tokens_file"].as_str().unwrap())).unwrap();
    std::fs::write(&victim, &real).unwrap();
    let evil = "../../victim.txt";
    record["shards"][0]["shard"]["tokens_file"] = evil.into();
    write_json(&record_path, &record);
    for d in manifest["domains"].as_array_mut().unwrap() {
        for s in d["sources"].as_array_mut().unwrap() {
            for sh in s["shards"].as_array_mut().unwrap() {
                if sh["tokens_file"] == shard["tokens_file"] {
                    sh["tokens_file"] = evil.into();
                }
            }
        }
    }
    write_json(&manifest_path, &manifest);

    let out = dir.join("merged");
    let err = fails(&moelab(&[
        "prepare",
        "merge",
        arg(&out),
        arg(&parts[0]),
        arg(&parts[1]),
    ]));
    assert!(err.contains(evil) && err.contains("outside"), "{err}");
    assert!(!out.exists(), "nothing is written: {}", out.display());
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        real,
        "the victim is untouched"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("merged"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A unit record alone (manifest intact) naming a path outside is refused as well.
    std::fs::write(&manifest_path, &original_manifest).unwrap();
    let err = fails(&moelab(&[
        "prepare",
        "merge",
        arg(&out),
        arg(&parts[0]),
        arg(&parts[1]),
    ]));
    assert!(err.contains(evil), "{err}");
    assert!(!out.exists());
}

/// A prepared dataset whose manifest names its first shard's token file `../victim.tokens`, a
/// copy of the real one placed outside the dataset (so sizes and hashes all match).
fn dataset_naming_a_file_outside(dir: &Scratch) -> (PathBuf, PathBuf) {
    let out = prepared(dir, "prepared");
    let manifest_path = out.join("manifest.json");
    let mut manifest = read_json(&manifest_path);
    let shard = &mut manifest["domains"][0]["sources"][0]["shards"][0];
    let real = out.join(shard["tokens_file"].as_str().unwrap());
    let victim = dir.join("victim.tokens");
    std::fs::copy(&real, &victim).unwrap();
    shard["tokens_file"] = "../victim.tokens".into();
    write_json(&manifest_path, &manifest);
    (out, victim)
}

#[test]
fn verify_and_score_refuse_a_manifest_naming_files_outside_the_dataset() {
    let dir = Scratch::new("hostile-manifest");
    let (out, victim) = dataset_naming_a_file_outside(&dir);
    let err = fails(&moelab(&["data", "inspect", arg(&out), "--verify"]));
    assert!(
        err.contains("../victim.tokens") && err.contains("outside the dataset"),
        "{err}"
    );

    let model = dir.join("model.bin");
    let corpus = dir.join("corpus");
    ok(&moelab(&[
        "data",
        "classify",
        "train",
        "--positive",
        arg(&corpus.join("code")),
        "--negative",
        arg(&corpus.join("prose")),
        "--out",
        arg(&model),
    ]));
    let err = fails(&moelab(&[
        "data",
        "classify",
        "score",
        arg(&model),
        arg(&out),
        "--name",
        "code",
    ]));
    assert!(err.contains("../victim.tokens"), "{err}");
    let written: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".scores"))
        .collect();
    assert!(written.is_empty(), "scores written outside: {written:?}");
    assert!(victim.is_file());
}

#[test]
fn prepare_refuses_folders_it_did_not_create_and_changes_none_of_their_files() {
    let dir = Scratch::new("hostile-notours");
    let corpus = Corpus::three_domains().write(&dir.join("corpus"));
    let mine = dir.join("mine");
    for (rel, text) in [
        ("shards/mydata/file.bin", "user data"),
        ("units/mine.json", "{\"mine\": true}"),
        ("shards/web/default/mine.tokens", "user tokens"),
    ] {
        std::fs::create_dir_all(mine.join(rel).parent().unwrap()).unwrap();
        std::fs::write(mine.join(rel), text).unwrap();
    }
    let model = dir.join("hf-model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("tokenizer.json"), "{\"model\": \"theirs\"}").unwrap();
    std::fs::write(model.join("config.json"), "{\"model_type\": \"olmoe\"}").unwrap();
    let foreign = dir.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("manifest.json"), "{\"not\": \"ours\"}").unwrap();

    for folder in [&mine, &model, &foreign] {
        let before = snapshot(folder);
        let err = fails(&moelab(&[
            "prepare",
            arg(&corpus),
            "--out",
            arg(folder),
            "--train-tokenizer",
            "300",
        ]));
        assert!(
            err.contains(arg(folder)) && err.contains("did not create"),
            "{err}"
        );
        assert_eq!(snapshot(folder), before, "{} changed", folder.display());
    }
}

#[test]
fn a_dataset_keeps_files_moelab_did_not_write_and_older_datasets_are_adopted() {
    let dir = Scratch::new("hostile-keep");
    let out = prepared(&dir, "prepared");
    assert!(
        out.join(".moelab-dataset").is_file(),
        "a new dataset is marked"
    );
    // The user's files inside a moelab dataset survive a re-run that deletes stale shards.
    let theirs = out.join("shards/prose/default/mine.tokens");
    std::fs::write(&theirs, "user tokens").unwrap();
    let notes = out.join("units/notes.json");
    std::fs::write(&notes, "{\"mine\": true}").unwrap();
    // Leftovers of a killed prepare: hidden temporaries of moelab's own names.
    let shard_dir = out.join("shards/prose/default");
    let shard = std::fs::read_dir(&shard_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".tokens") && n != "mine.tokens")
        .unwrap();
    let stale = shard_dir.join(format!(".{}.999999.tmp", shard.replace(".0000.", ".0007.")));
    std::fs::write(&stale, vec![0u8; 4096]).unwrap();
    let stale_manifest = out.join(".manifest.json.999999.tmp");
    std::fs::write(&stale_manifest, "{").unwrap();
    let user_tmp = out.join(".mine.tmp");
    std::fs::write(&user_tmp, "user").unwrap();
    // An older moelab's dataset: a valid manifest and no marker.
    std::fs::remove_file(out.join(".moelab-dataset")).unwrap();
    std::fs::write(
        dir.join("corpus/prose/extra.jsonl"),
        "{\"text\": \"one more\"}\n",
    )
    .unwrap();
    ok(&moelab(&[
        "prepare",
        arg(&dir.join("corpus")),
        "--out",
        arg(&out),
        "--train-tokenizer",
        "300",
    ]));
    assert!(out.join(".moelab-dataset").is_file(), "adopted and marked");
    assert_eq!(std::fs::read(&theirs).unwrap(), b"user tokens");
    assert_eq!(std::fs::read(&notes).unwrap(), b"{\"mine\": true}");
    assert!(user_tmp.is_file());
    assert!(
        !stale.exists() && !stale_manifest.exists(),
        "leftovers removed"
    );
}

#[test]
fn a_second_prepare_into_a_locked_dataset_is_refused_naming_the_holder() {
    let dir = Scratch::new("hostile-lock");
    let out = prepared(&dir, "prepared");
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(out.join(".lock"))
        .unwrap();
    lock.try_lock().unwrap();
    std::fs::write(out.join(".lock"), "424242\n").unwrap();
    let err = fails(&moelab(&[
        "prepare",
        arg(&dir.join("corpus")),
        "--out",
        arg(&out),
        "--train-tokenizer",
        "300",
    ]));
    assert!(err.contains("process 424242"), "{err}");
    drop(lock);
    ok(&moelab(&[
        "prepare",
        arg(&dir.join("corpus")),
        "--out",
        arg(&out),
        "--train-tokenizer",
        "300",
    ]));
}

/// Documents kept per domain of the dataset at `out`.
fn documents(out: &Path) -> Vec<(String, u64)> {
    let info: serde_json::Value =
        serde_json::from_str(&ok(&moelab(&["data", "inspect", arg(out), "--json"]))).unwrap();
    info["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["domain"].as_str().unwrap().to_string(),
                s["documents"].as_u64().unwrap() + s["validation_documents"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
#[cfg(unix)]
fn links_outside_the_corpus_loops_and_second_paths_are_skipped_and_reported() {
    use std::os::unix::fs::symlink;
    let dir = Scratch::new("hostile-links");
    let corpus = dir.join("corpus");
    let web = corpus.join("web");
    std::fs::create_dir_all(&web).unwrap();
    for i in 0..5 {
        std::fs::write(
            web.join(format!("page{i}.txt")),
            format!("page {i} of the web with words"),
        )
        .unwrap();
    }
    let outside = dir.join("etc");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("passwd.txt"), "root:x:0:0:secret").unwrap();
    symlink(&outside, web.join("etc")).unwrap();
    symlink(".", web.join("loop")).unwrap();
    symlink("../..", web.join("up")).unwrap();
    symlink("page0.txt", web.join("again.txt")).unwrap();

    let out = dir.join("prepared");
    let run = moelab(&[
        "prepare",
        arg(&corpus),
        "--out",
        arg(&out),
        "--train-tokenizer",
        "300",
    ]);
    ok(&run);
    let err = stderr(&run);
    for (link, why) in [
        ("web/etc", "outside"),
        ("web/loop", "loop"),
        ("web/up", "outside"),
        ("web/again.txt", "read once"),
    ] {
        let line = err
            .lines()
            .find(|l| l.contains(&format!("{link} ->")))
            .unwrap_or_else(|| panic!("{link} not reported:\n{err}"));
        assert!(line.contains(why), "{line}");
    }
    assert!(err.contains(arg(&outside)), "the target is named: {err}");
    assert_eq!(documents(&out), vec![("web".to_string(), 5)]);

    // Allowed explicitly, the outside folder is read; the loop and the second path still not.
    let out2 = dir.join("prepared2");
    ok(&moelab(&[
        "prepare",
        arg(&corpus),
        "--out",
        arg(&out2),
        "--train-tokenizer",
        "300",
        "--follow-outside-links",
    ]));
    // `web/etc` is then a source folder of web.
    assert_eq!(
        documents(&out2),
        vec![("web".to_string(), 5), ("web".to_string(), 1)]
    );
}

#[test]
fn other_spellings_of_the_same_input_reuse_every_unit() {
    let dir = Scratch::new("hostile-spelling");
    Corpus::three_domains().write(&dir.join("data/sample"));
    let absolute = dir.join("data/sample");
    for spelling in [
        "data/sample",
        "./data/sample",
        "data/sample/",
        arg(&absolute),
    ] {
        let out = command(&[
            "prepare",
            spelling,
            "--out",
            "prepared",
            "--train-tokenizer",
            "300",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
        let text = ok(&out);
        if spelling != "data/sample" {
            assert!(
                text.contains("0 units written"),
                "{spelling} re-encoded:\n{text}"
            );
        }
    }
}

#[test]
fn thread_counts_are_bounded_and_long_names_are_skipped() {
    let dir = Scratch::new("hostile-threads");
    let corpus = Corpus::three_domains().write(&dir.join("corpus"));
    let err = fails(&moelab(&[
        "prepare",
        arg(&corpus),
        "--out",
        arg(&dir.join("x")),
        "--train-tokenizer",
        "300",
        "--threads",
        "100000",
    ]));
    assert!(
        err.contains("--threads 100000") && err.contains("1024"),
        "{err}"
    );
    assert!(!dir.join("x").exists());

    let file = dir.join("mixed.jsonl");
    let long_domain = "d".repeat(256);
    let deep_source = vec!["s"; 600].join("/");
    let mut text = String::new();
    for i in 0..30 {
        text += &format!("{{\"text\": \"doc {i} words\", \"domain\": \"web\"}}\n");
    }
    text += &format!("{{\"text\": \"x\", \"domain\": \"{long_domain}\"}}\n");
    text += &format!("{{\"text\": \"y\", \"domain\": \"web\", \"source\": \"{deep_source}\"}}\n");
    std::fs::write(&file, text).unwrap();
    let out = dir.join("named");
    let run = moelab(&[
        "prepare",
        arg(&file),
        "--out",
        arg(&out),
        "--train-tokenizer",
        "300",
    ]);
    ok(&run);
    assert!(
        stderr(&run).contains("2 unusable domain/source name"),
        "{}",
        stderr(&run)
    );
}

#[test]
fn a_too_long_document_is_counted_and_named_with_strict() {
    let dir = Scratch::new("hostile-toolong");
    let corpus = Corpus::three_domains().write(&dir.join("corpus"));
    let long = format!("{{\"text\": \"{}\"}}\n", "word ".repeat(1000));
    std::fs::write(corpus.join("prose/long.jsonl"), long).unwrap();
    let prepare = |out: &str, strict: bool| {
        let out = dir.join(out);
        let mut args = vec![
            "prepare".to_string(),
            arg(&corpus).to_string(),
            "--out".into(),
            arg(&out).to_string(),
            "--train-tokenizer".into(),
            "300".into(),
            "--max-document-bytes".into(),
            "2K".into(),
        ];
        if strict {
            args.push("--strict".into());
        }
        moelab(&args)
    };
    let run = prepare("kept", false);
    ok(&run);
    assert!(stderr(&run).contains("1 too long"), "{}", stderr(&run));
    let err = fails(&prepare("strict", true));
    assert!(
        err.contains("long.jsonl:1") && err.contains("--max-document-bytes"),
        "{err}"
    );
}
