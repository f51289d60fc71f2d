//! Mixture streams: exact shares, determinism, ranks, resume, stages, validation streams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use moelab_data::{DataConfig, DataError, Dataset, MixtureStream, Prefetcher, StageConfig};

fn cfg(ds: &Dataset, seq_len: usize, mixture: &[(&str, f64)]) -> DataConfig {
    let mut c = DataConfig::new(ds.dir(), seq_len);
    c.mixture = mixture.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    c
}

/// Tiny xorshift for random mixtures.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[test]
fn every_prefix_is_within_one_sequence_of_its_share() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let mut rng = Rng(0x1234_5678);
    for trial in 0..40 {
        let mut c = cfg(&ds, 8, &[]);
        for d in ["web", "code", "math"] {
            // Some domains drop out (weight 0) now and then.
            let w = if rng.next() < 0.15 {
                0.0
            } else {
                rng.next() * 10.0
            };
            c.mixture.insert(d.into(), w);
        }
        if c.mixture.values().all(|&w| w == 0.0) {
            c.mixture.insert("web".into(), 1.0);
        }
        let structured = rng.next();
        c.source_mixture.insert(
            "math".into(),
            BTreeMap::from([
                ("structured".into(), structured),
                ("plain".into(), 1.0 - structured + 0.01),
            ]),
        );
        let block = if trial % 2 == 0 {
            1
        } else {
            1 + (rng.next() * 32.0) as usize
        };
        c.shuffle_block = block;
        let stream = MixtureStream::new(ds.clone(), &c, trial).unwrap();
        let sum: f64 = c.mixture.values().sum();
        let n = 3000usize;
        let batch = stream.batch(0, n).unwrap();
        let mut counts = [0f64; 3];
        let mut math_counts = [0f64; 2];
        let mut math_total = 0f64;
        let share_structured = structured / (structured + 1.0 - structured + 0.01);
        for i in 0..n {
            let d = batch.domain_ids[i] as usize;
            counts[d] += 1.0;
            if d == 1 {
                math_counts[batch.source_ids[i] as usize] += 1.0;
                math_total += 1.0;
                // Sources follow the same rule inside the domain's own sequence of draws.
                let dev = (math_counts[1] - share_structured * math_total).abs();
                assert!(
                    dev <= 1.0 + 1e-9 + block as f64,
                    "trial {trial}: source deviation {dev}"
                );
            }
            for (d, name) in ds.domains().iter().enumerate() {
                let target = c.mixture[name] / sum * (i + 1) as f64;
                let dev = (counts[d] - target).abs();
                let bound = if block == 1 { 1.0 } else { block as f64 + 1.0 };
                assert!(
                    dev <= bound + 1e-9,
                    "trial {trial} block {block}: {name} deviates {dev} at {i}"
                );
            }
        }
        if block == 1 {
            // Sources without block shuffle: within one draw of their share.
            let dev = (math_counts[1] - share_structured * math_total).abs();
            assert!(dev <= 1.0 + 1e-9, "trial {trial}: {dev}");
        }
    }
}

#[test]
fn stages_switch_the_mixture_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let mut c = cfg(&ds, 8, &[("web", 1.0), ("code", 1.0)]);
    c.shuffle_block = 1;
    c.stages.push(StageConfig {
        start_token: 800,
        mixture: BTreeMap::from([("math".into(), 1.0)]),
    });
    let stream = MixtureStream::new(ds, &c, 3).unwrap();
    let b = stream.batch(0, 200).unwrap();
    assert!(b.domain_ids[..100].iter().all(|&d| d != 1));
    assert!(
        b.domain_ids[100..].iter().all(|&d| d == 1),
        "from token 800 = sequence 100 on: math only"
    );
}

#[test]
fn batches_are_deterministic_random_access_and_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let c = cfg(&ds, 16, &[("web", 0.5), ("code", 0.3), ("math", 0.2)]);
    let a = MixtureStream::new(ds.clone(), &c, 7).unwrap();
    let b = MixtureStream::new(ds.clone(), &c, 7).unwrap();
    let whole = a.batch(0, 500).unwrap();
    // Out-of-order random access on another instance gives the same sequences.
    for (first, n) in [(400u64, 100usize), (3, 5), (250, 64), (0, 1), (130, 7)] {
        let part = b.batch(first, n).unwrap();
        let lo = first as usize * 16;
        assert_eq!(part.tokens, whole.tokens[lo..lo + n * 16]);
        assert_eq!(
            part.domain_ids,
            whole.domain_ids[first as usize..first as usize + n]
        );
    }
    // Targets are the inputs shifted by one inside each chunk.
    for s in 0..whole.n_sequences {
        let row = &whole.tokens[s * 16..(s + 1) * 16];
        let next = &whole.targets[s * 16..(s + 1) * 16];
        assert_eq!(row[1..], next[..15]);
    }
    assert!(whole.tokens.iter().all(|&t| (t as usize) < ds.vocab_size()));
    // Another seed gives another order.
    let other = MixtureStream::new(ds, &c, 8)
        .unwrap()
        .batch(0, 500)
        .unwrap();
    assert_ne!(other.tokens, whole.tokens);
}

#[test]
fn an_epoch_visits_every_chunk_once() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let mut c = cfg(&ds, 16, &[("code", 1.0)]);
    // No block shuffle, so the first `chunks` sequences are exactly the first epoch.
    c.shuffle_block = 1;
    let stream = MixtureStream::new(ds.clone(), &c, 1).unwrap();
    let chunks = (ds.train_counts(0, 0).tokens / 17) as usize;
    let slots = stream.slots(0, 2 * chunks);
    let mut first: Vec<u64> = slots[..chunks].iter().map(|s| s.token_start).collect();
    let mut second: Vec<u64> = slots[chunks..].iter().map(|s| s.token_start).collect();
    assert_ne!(first, second, "each epoch has its own order");
    first.sort_unstable();
    second.sort_unstable();
    let all: Vec<u64> = (0..chunks as u64).map(|c| c * 17).collect();
    assert_eq!(first, all);
    assert_eq!(second, all);
}

#[test]
fn rank_slices_are_disjoint_and_cover_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let c = cfg(&ds, 8, &[("web", 0.6), ("math", 0.4)]);
    let stream = MixtureStream::new(ds, &c, 11).unwrap();
    for world in [1usize, 2, 3, 5] {
        for step in [0u64, 1, 9] {
            let global = stream.batch(step * 13, 13).unwrap();
            let mut tokens = Vec::new();
            let mut domains = Vec::new();
            for rank in 0..world {
                let b = stream.rank_batch(step, 13, rank, world).unwrap();
                assert!(b.n_sequences == 13 / world || b.n_sequences == 13 / world + 1);
                tokens.extend(b.tokens);
                domains.extend(b.domain_ids);
            }
            assert_eq!(tokens, global.tokens, "world {world} step {step}");
            assert_eq!(domains, global.domain_ids);
        }
    }
    assert!(stream.rank_batch(0, 13, 2, 2).is_err());
}

#[test]
fn resume_continues_exactly_with_another_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let mut c = cfg(&ds, 8, &[("web", 0.5), ("code", 0.2), ("math", 0.3)]);
    c.stages.push(StageConfig {
        start_token: 8 * 100,
        mixture: BTreeMap::from([("math".into(), 2.0), ("web".into(), 1.0)]),
    });
    let global = 12usize;
    let uninterrupted = MixtureStream::new(ds.clone(), &c, 5).unwrap();
    let steps: Vec<_> = (0..20)
        .map(|s| uninterrupted.rank_batch(s, global, 0, 1).unwrap())
        .collect();
    // Stop after step 6, save the state through JSON, resume on 3 ranks.
    let state = uninterrupted.state(7 * global as u64);
    let json = serde_json::to_string(&state).unwrap();
    let state: moelab_data::StreamState = serde_json::from_str(&json).unwrap();
    let resumed = Arc::new(MixtureStream::resume(ds, &c, 5, &state, false).unwrap());
    for (k, expected) in steps.iter().enumerate().skip(7) {
        let mut tokens = Vec::new();
        for rank in 0..3 {
            tokens.extend(
                resumed
                    .rank_batch(k as u64, global, rank, 3)
                    .unwrap()
                    .tokens,
            );
        }
        assert_eq!(&tokens, &expected.tokens, "step {k}");
    }
    // The prefetcher yields the same batches in order.
    let fetched: Vec<_> = Prefetcher::new(resumed, 7, global, 0, 1, 2)
        .take(5)
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(fetched, steps[7..12]);
}

#[test]
fn resume_refuses_another_seed_or_seq_len() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let c = cfg(&ds, 8, &[("web", 1.0)]);
    let state = MixtureStream::new(ds.clone(), &c, 5).unwrap().state(100);
    let err = MixtureStream::resume(ds.clone(), &c, 6, &state, true).unwrap_err();
    assert!(
        matches!(err, DataError::Resume(_)) && err.to_string().contains("fingerprint"),
        "{err}"
    );
    let c16 = cfg(&ds, 16, &[("web", 1.0)]);
    assert!(MixtureStream::resume(ds, &c16, 5, &state, true).is_err());
}

#[test]
fn mixture_change_on_resume_needs_permission_and_appends_a_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let mut c = cfg(&ds, 8, &[("web", 0.5), ("code", 0.5)]);
    c.shuffle_block = 4;
    let before = MixtureStream::new(ds.clone(), &c, 9).unwrap();
    let history = before.batch(0, 101).unwrap();
    let state = before.state(101);
    let changed = cfg(&ds, 8, &[("math", 1.0)]);
    let mut changed = changed;
    changed.shuffle_block = 4;
    let err = MixtureStream::resume(ds.clone(), &changed, 9, &state, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("mixture") && err.contains("math = 1"), "{err}");
    let after = MixtureStream::resume(ds, &changed, 9, &state, true).unwrap();
    let stages = after.stages();
    assert_eq!(stages.len(), 2);
    assert_eq!(
        stages[1].start_sequence, 104,
        "next block boundary after 101"
    );
    // History is unchanged, and the new mixture rules after the switch.
    assert_eq!(after.batch(0, 101).unwrap(), history);
    let next = after.batch(104, 50).unwrap();
    assert!(next.domain_ids.iter().all(|&d| d == 1));
    // The appended stage travels in the state: resuming from it needs no permission.
    let state2 = after.state(154);
    assert_eq!(state2.stages.len(), 2);
}

#[test]
fn a_mixture_change_recorded_as_a_stage_resumes_again_without_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let mut c = cfg(&ds, 8, &[("web", 0.5), ("code", 0.5)]);
    c.shuffle_block = 4;
    let state = MixtureStream::new(ds.clone(), &c, 9).unwrap().state(101);
    let mut changed = cfg(&ds, 8, &[("math", 1.0)]);
    changed.shuffle_block = 4;
    let after = MixtureStream::resume(ds.clone(), &changed, 9, &state, true).unwrap();
    // Later checkpoints of the changed run (after the switch, and inside the block before it)
    // record the stage: the same config resumes from them without --allow-mixture-change.
    for consumed in [154, 102] {
        let later = after.state(consumed);
        let again = MixtureStream::resume(ds.clone(), &changed, 9, &later, false)
            .unwrap_or_else(|e| panic!("at {consumed}: {e}"));
        assert_eq!(again.stages(), after.stages(), "at {consumed}");
        assert_eq!(
            again.batch(consumed, 20).unwrap(),
            after.batch(consumed, 20).unwrap()
        );
    }
    // Going back to the first mixture is a change again; the refusal shows two different
    // mixtures, never the same one twice.
    let err = MixtureStream::resume(ds, &c, 9, &after.state(154), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config { code = 0.5000, web = 0.5000 }")
            && err.contains("checkpoint { math = 1.0000 }"),
        "{err}"
    );
}

#[test]
fn unknown_domain_and_source_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let c = cfg(&ds, 8, &[("web", 0.5), ("cod", 0.5)]);
    let err = MixtureStream::new(ds.clone(), &c, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data.mixture.cod") && err.contains("code, math, web"),
        "{err}"
    );
    let mut c = cfg(&ds, 8, &[("math", 1.0)]);
    c.source_mixture
        .insert("math".into(), BTreeMap::from([("structred".into(), 1.0)]));
    let err = MixtureStream::new(ds.clone(), &c, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("data.source_mixture.math.structred"), "{err}");
    let mut c = cfg(&ds, 8, &[("math", 1.0)]);
    c.stages.push(StageConfig {
        start_token: 10,
        mixture: BTreeMap::from([("maths".into(), 1.0)]),
    });
    let err = MixtureStream::new(ds, &c, 0).unwrap_err().to_string();
    assert!(err.contains("data.stages[0].mixture.maths"), "{err}");
}

#[test]
fn max_repetition_errors_before_training_with_the_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let mut c = cfg(&ds, 8, &[("web", 0.5), ("code", 0.5)]);
    let code_tokens = ds.train_counts(0, 0).tokens;
    // A budget that reads code about 10 times.
    c.total_tokens = Some(code_tokens * 20);
    c.max_repetition = Some(4.0);
    let err = MixtureStream::new(ds.clone(), &c, 0).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Repetition { .. }), "{msg}");
    assert!(
        msg.contains("code/default") && msg.contains("data.max_repetition = 4"),
        "{msg}"
    );
    c.max_repetition = Some(50.0);
    let stream = MixtureStream::new(ds, &c, 0).unwrap();
    let usage = stream.usage(c.total_tokens.unwrap() / 8);
    let code = usage.iter().find(|u| u.domain == "code").unwrap();
    assert!(code.epochs > 9.0 && code.epochs < 12.0, "{code:?}");
}

#[test]
fn validation_streams_do_not_depend_on_the_mixture() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let a = MixtureStream::new(ds.clone(), &cfg(&ds, 8, &[("web", 1.0)]), 1).unwrap();
    let b =
        MixtureStream::new(ds.clone(), &cfg(&ds, 8, &[("math", 0.9), ("code", 0.1)]), 2).unwrap();
    for d in 0..ds.domains().len() {
        let va = a.dataset().validation_batches(d, 8, 200, 4).unwrap();
        let vb = b.dataset().validation_batches(d, 8, 200, 4).unwrap();
        assert_eq!(va, vb);
        let n: usize = va.iter().map(|b| b.n_sequences).sum();
        assert!((1..=25).contains(&n), "capped at 200 tokens = 25 sequences");
        assert!(va
            .iter()
            .all(|b| b.domain_ids.iter().all(|&x| x as usize == d)));
    }
    // The validation documents never appear in training: no training chunk equals a validation one.
    // (32-token rows: long enough that random text does not repeat by chance.)
    let long = MixtureStream::new(ds.clone(), &cfg(&ds, 32, &[("web", 1.0)]), 1).unwrap();
    let train = long.batch(0, 300).unwrap();
    let valid = ds.validation_batches(2, 32, 1 << 20, 64).unwrap();
    for v in &valid {
        for s in 0..v.n_sequences {
            let row = &v.tokens[s * 32..(s + 1) * 32];
            assert!(!train.tokens.chunks(32).any(|t| t == row));
        }
    }
}

#[test]
fn natural_mixture_when_none_is_given() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let stream = MixtureStream::new(ds.clone(), &cfg(&ds, 8, &[]), 0).unwrap();
    let mix = &stream.stages()[0].mixture;
    assert_eq!(mix.len(), 3);
    assert!((mix.values().sum::<f64>() - 1.0).abs() < 1e-12);
    let report = stream.report(2000);
    assert!(
        report.max_prefix_deviation <= 65.0,
        "{}",
        report.max_prefix_deviation
    );
}

#[test]
fn validation_shortfalls_are_planned_up_front_naming_the_domain_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = common::corpus(tmp.path(), 12);
    // A domain of one document gets no validation split.
    common::write(&corpus.join("books/only.txt"), common::text(9, 400));
    let out = tmp.path().join("out");
    moelab_data::prepare(&common::options(&corpus, &out), &|_| {}).unwrap();
    let ds = Dataset::open(&out).unwrap();
    let books = ds.domain_id("books").unwrap();
    assert_eq!(ds.validation_counts(books).documents, 0);

    // The user set no key for it: not an error up front, but the plan says why and the fix.
    ds.check_validation(16, 4096, 4).unwrap();
    let plan = ds.validation_plan(16, 4096);
    let short: Vec<_> = plan.iter().filter(|p| p.shortfall.is_some()).collect();
    assert_eq!(short.len(), 1, "only the failing domain: {plan:?}");
    assert_eq!((short[0].domain.as_str(), short[0].scored), ("books", 0));
    let why = short[0].shortfall.clone().unwrap();
    for part in [
        "`books` has no validation documents",
        "--validation-fraction (it was 0.1)",
    ] {
        assert!(why.contains(part), "{part}: {why}");
    }
    // The others score whole sequences of 16 up to the cap, as validation_batches cuts them.
    for p in plan.iter().filter(|p| p.shortfall.is_none()) {
        let d = ds.domain_id(&p.domain).unwrap();
        let batches = ds.validation_batches(d, 16, 4096, 4).unwrap();
        let scored: usize = batches.iter().map(|b| b.n_sequences * b.seq_len).sum();
        assert_eq!(p.scored, scored as u64, "{p:?}");
        assert_eq!(p.scored, (p.available / 17).min(4096 / 16) * 16, "{p:?}");
    }
    // The late failure says the same.
    let late = ds
        .validation_batches(books, 16, 4096, 4)
        .unwrap_err()
        .to_string();
    assert!(
        late.contains("data.validation_tokens") && late.contains("no validation documents"),
        "{late}"
    );

    // A cap below one sequence: every domain, with the number to raise it to.
    let web = ds.domain_id("web").unwrap();
    let err = ds.check_validation(64, 32, 4).unwrap_err().to_string();
    assert!(
        err.contains("data.validation_tokens")
            && err.contains("32 is below data.seq_len = 64")
            && err.contains("at least 64"),
        "{err}"
    );
    let late = ds
        .validation_batches(web, 64, 32, 4)
        .unwrap_err()
        .to_string();
    assert!(
        late.contains("at least 64") && late.contains("web"),
        "{late}"
    );

    assert!(ds.check_validation(16, 4096, 0).is_err());
    // Without the one-document domain everything passes, and batches follow.
    let ds = common::prepared(&tmp.path().join("fine"));
    ds.check_validation(16, 4096, 4).unwrap();
    for d in 0..ds.domains().len() {
        assert!(!ds.validation_batches(d, 16, 4096, 4).unwrap().is_empty());
    }
}

#[test]
fn every_source_of_a_domain_is_scored_in_proportion_to_the_sequences_it_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = common::prepared(tmp.path());
    let math = ds.domain_id("math").unwrap();
    let sources = &ds.manifest().domains[math].sources;
    assert_eq!(sources.len(), 2, "math/plain and math/structured");
    let seq = 16u64;
    let held: Vec<u64> = sources
        .iter()
        .map(|s| s.validation.tokens / (seq + 1))
        .collect();
    let total: u64 = held.iter().sum();
    assert!(held.iter().all(|&h| h >= 4), "{held:?}");
    // A cap of half the sequences the domain holds: each source gives half of its own (within
    // one), not the first source all of them.
    let wanted = total / 2;
    let batches = ds.validation_batches(math, 16, wanted * seq, 4).unwrap();
    let mut per_source = vec![0u64; held.len()];
    for b in &batches {
        for &s in &b.source_ids {
            per_source[s as usize] += 1;
        }
    }
    assert_eq!(per_source.iter().sum::<u64>(), wanted);
    for (got, h) in per_source.iter().zip(&held) {
        let exact = (wanted * h) as f64 / total as f64;
        assert!(
            (*got as f64 - exact).abs() <= 1.0,
            "{per_source:?} of {held:?}"
        );
    }
    // The plan counts the same.
    let plan = &ds.validation_plan(16, wanted * seq)[math];
    assert_eq!(plan.scored, wanted * seq);
}
