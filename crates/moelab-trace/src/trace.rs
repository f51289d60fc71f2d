//! Per-token routing traces of one checkpoint over fixed per-domain validation streams.
//!
//! A trace directory holds:
//! - `trace.safetensors` (format `moelab-trace-v1`): per-token `token_ids`, `target_ids`,
//!   `predicted_ids`, `domain_ids`, `source_ids`, `positions` (U32, (N,)), `expert_ids` U32
//!   (L, N, k), `gate_weights` F32 (L, N, k), optional `router_probs` F32 (L, N, E); metadata
//!   `format`, `layers`, `domains`, `n_experts`, `top_k`, `checkpoint`, `step`;
//! - `index.json`: every tensor's name, dtype, shape and meaning plus the metadata, so Python needs
//!   only the `safetensors` package (see `scripts/read_trace.py`);
//! - `counts.safetensors`: the trace aggregated as router counts (router-log chunk format).

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use crate::error::{Result, TraceError};
use crate::router_log::{self, RouterLog};
use crate::safetensors_io::{self, Loaded, OwnedTensor};

/// The `format` metadata value of `trace.safetensors`.
pub const FORMAT: &str = "moelab-trace-v1";
/// File name of the tensors inside a trace directory.
pub const TRACE_FILE: &str = "trace.safetensors";
/// File name of the JSON description inside a trace directory.
pub const INDEX_FILE: &str = "index.json";
/// File name of the aggregated counts inside a trace directory.
pub const COUNTS_FILE: &str = "counts.safetensors";

/// Per-token routing of one checkpoint; tensors are flat row-major vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// Block indices of the MoE layers (`layer_idx` indexes this list).
    pub layers: Vec<usize>,
    /// Domain names; the position is the domain id.
    pub domains: Vec<String>,
    /// Routed experts per MoE layer.
    pub n_experts: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// Path of the checkpoint that was traced.
    pub checkpoint: String,
    /// Optimizer step of that checkpoint.
    pub step: u64,
    /// (N,) input token at each position.
    pub token_ids: Vec<u32>,
    /// (N,) the next token, which the model is asked to predict.
    pub target_ids: Vec<u32>,
    /// (N,) argmax of the logits.
    pub predicted_ids: Vec<u32>,
    /// (N,) domain id of each token.
    pub domain_ids: Vec<u32>,
    /// (N,) id of the source (document/stream) within the validation set.
    pub source_ids: Vec<u32>,
    /// (N,) position of the token in its sequence.
    pub positions: Vec<u32>,
    /// (L, N, k) chosen experts, best first.
    pub expert_ids: Vec<u32>,
    /// (L, N, k) gate weight of each chosen expert.
    pub gate_weights: Vec<f32>,
    /// Optional (L, N, E) router probabilities.
    pub router_probs: Option<Vec<f32>>,
}

/// One batch of per-token records for [`TraceBuilder::push`]; per-layer vectors are (tokens, k)
/// or (tokens, E) row-major, one per MoE layer.
#[derive(Debug, Clone, Copy)]
pub struct TraceBatch<'a> {
    /// Input token ids.
    pub token_ids: &'a [u32],
    /// Next-token targets.
    pub target_ids: &'a [u32],
    /// Argmax predictions.
    pub predicted_ids: &'a [u32],
    /// Domain ids.
    pub domain_ids: &'a [u32],
    /// Source ids.
    pub source_ids: &'a [u32],
    /// Positions in sequence.
    pub positions: &'a [u32],
    /// Per layer: chosen experts (tokens * k).
    pub expert_ids: &'a [Vec<u32>],
    /// Per layer: gate weights (tokens * k).
    pub gate_weights: &'a [Vec<f32>],
    /// Per layer: router probabilities (tokens * E), if recorded.
    pub router_probs: Option<&'a [Vec<f32>]>,
}

/// Accumulates batches into a [`Trace`], validating each batch as it arrives.
#[derive(Debug, Clone)]
pub struct TraceBuilder {
    trace: Trace,
    // Per layer, because batches arrive token-major but the file is layer-major.
    experts: Vec<Vec<u32>>,
    gates: Vec<Vec<f32>>,
    probs: Option<Vec<Vec<f32>>>,
    batches: usize,
}

impl TraceBuilder {
    /// Starts an empty trace of a model with these MoE layers, domains, experts and top-k.
    pub fn new(layers: Vec<usize>, domains: Vec<String>, n_experts: usize, top_k: usize) -> Self {
        let n_layers = layers.len();
        TraceBuilder {
            trace: Trace {
                layers,
                domains,
                n_experts,
                top_k,
                checkpoint: String::new(),
                step: 0,
                token_ids: Vec::new(),
                target_ids: Vec::new(),
                predicted_ids: Vec::new(),
                domain_ids: Vec::new(),
                source_ids: Vec::new(),
                positions: Vec::new(),
                expert_ids: Vec::new(),
                gate_weights: Vec::new(),
                router_probs: None,
            },
            experts: vec![Vec::new(); n_layers],
            gates: vec![Vec::new(); n_layers],
            probs: None,
            batches: 0,
        }
    }

    /// Records which checkpoint (path, step) is being traced.
    pub fn checkpoint(mut self, path: impl Into<String>, step: u64) -> Self {
        self.trace.checkpoint = path.into();
        self.trace.step = step;
        self
    }

    /// Appends one batch; errors (appending nothing) on wrong lengths or out-of-range ids.
    pub fn push(&mut self, batch: TraceBatch<'_>) -> Result<()> {
        let t = &self.trace;
        let n = batch.token_ids.len();
        let (k, e, n_layers) = (t.top_k, t.n_experts, t.layers.len());
        let per_token = [
            ("target_ids", batch.target_ids.len()),
            ("predicted_ids", batch.predicted_ids.len()),
            ("domain_ids", batch.domain_ids.len()),
            ("source_ids", batch.source_ids.len()),
            ("positions", batch.positions.len()),
        ];
        for (name, len) in per_token {
            if len != n {
                return Err(TraceError::Invalid(format!(
                    "trace batch: {name} has {len} entries, token_ids has {n}"
                )));
            }
        }
        if let Some(&d) = batch
            .domain_ids
            .iter()
            .find(|&&d| d as usize >= t.domains.len())
        {
            return Err(TraceError::Invalid(format!(
                "trace batch: domain id {d} out of range ({} domains)",
                t.domains.len()
            )));
        }
        check_layers("expert_ids", batch.expert_ids, n_layers, n * k)?;
        check_layers("gate_weights", batch.gate_weights, n_layers, n * k)?;
        if let Some(&x) = batch
            .expert_ids
            .iter()
            .flatten()
            .find(|&&x| x as usize >= e)
        {
            return Err(TraceError::Invalid(format!(
                "trace batch: expert id {x} out of range ({e} experts)"
            )));
        }
        match (
            batch.router_probs,
            self.batches == 0 || self.probs.is_some(),
        ) {
            (Some(p), true) => check_layers("router_probs", p, n_layers, n * e)?,
            (None, _) if self.probs.is_none() => {}
            _ => {
                return Err(TraceError::Invalid(
                    "trace batch: router_probs must be given for every batch or for none"
                        .to_string(),
                ))
            }
        }
        let t = &mut self.trace;
        t.token_ids.extend_from_slice(batch.token_ids);
        t.target_ids.extend_from_slice(batch.target_ids);
        t.predicted_ids.extend_from_slice(batch.predicted_ids);
        t.domain_ids.extend_from_slice(batch.domain_ids);
        t.source_ids.extend_from_slice(batch.source_ids);
        t.positions.extend_from_slice(batch.positions);
        for (acc, layer) in self.experts.iter_mut().zip(batch.expert_ids) {
            acc.extend_from_slice(layer);
        }
        for (acc, layer) in self.gates.iter_mut().zip(batch.gate_weights) {
            acc.extend_from_slice(layer);
        }
        if let Some(p) = batch.router_probs {
            let acc = self.probs.get_or_insert_with(|| vec![Vec::new(); n_layers]);
            for (acc, layer) in acc.iter_mut().zip(p) {
                acc.extend_from_slice(layer);
            }
        }
        self.batches += 1;
        Ok(())
    }

    /// Tokens pushed so far.
    pub fn n_tokens(&self) -> usize {
        self.trace.token_ids.len()
    }

    /// The finished trace (layer-major tensors).
    pub fn finish(self) -> Trace {
        let mut trace = self.trace;
        trace.expert_ids = self.experts.concat();
        trace.gate_weights = self.gates.concat();
        trace.router_probs = self.probs.map(|p| p.concat());
        trace
    }
}

/// Errors unless there is one vector per layer, each `len` long.
fn check_layers<T>(name: &str, per_layer: &[Vec<T>], n_layers: usize, len: usize) -> Result<()> {
    if per_layer.len() != n_layers {
        return Err(TraceError::Invalid(format!(
            "trace batch: {name} has {} layers, the model has {n_layers} MoE layers",
            per_layer.len()
        )));
    }
    if let Some((l, v)) = per_layer.iter().enumerate().find(|(_, v)| v.len() != len) {
        return Err(TraceError::Invalid(format!(
            "trace batch: {name} layer {l} has {} entries, expected {len}",
            v.len()
        )));
    }
    Ok(())
}

/// One row of index.json's tensor table: (name, dtype, shape, meaning).
type TensorDoc = (&'static str, &'static str, Vec<usize>, &'static str);

impl Trace {
    /// Number of traced tokens N.
    pub fn n_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Number of MoE layers L.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// The k experts token `token` chose in MoE layer `layer_idx` (empty when out of range).
    pub fn experts(&self, layer_idx: usize, token: usize) -> &[u32] {
        let k = self.top_k;
        let start = (layer_idx * self.n_tokens() + token) * k;
        if layer_idx >= self.n_layers() || token >= self.n_tokens() {
            return &[];
        }
        self.expert_ids.get(start..start + k).unwrap_or(&[])
    }

    /// The gate weights matching [`Trace::experts`].
    pub fn gates(&self, layer_idx: usize, token: usize) -> &[f32] {
        let k = self.top_k;
        let start = (layer_idx * self.n_tokens() + token) * k;
        if layer_idx >= self.n_layers() || token >= self.n_tokens() {
            return &[];
        }
        self.gate_weights.get(start..start + k).unwrap_or(&[])
    }

    /// Checks every tensor's length and that ids are in range.
    pub fn validate(&self) -> Result<()> {
        let (n, l, k, e) = (self.n_tokens(), self.n_layers(), self.top_k, self.n_experts);
        let lens = [
            ("target_ids", self.target_ids.len(), n),
            ("predicted_ids", self.predicted_ids.len(), n),
            ("domain_ids", self.domain_ids.len(), n),
            ("source_ids", self.source_ids.len(), n),
            ("positions", self.positions.len(), n),
            ("expert_ids", self.expert_ids.len(), l * n * k),
            ("gate_weights", self.gate_weights.len(), l * n * k),
            (
                "router_probs",
                self.router_probs.as_ref().map_or(l * n * e, Vec::len),
                l * n * e,
            ),
        ];
        for (name, len, want) in lens {
            if len != want {
                return Err(TraceError::Invalid(format!(
                    "trace: {name} has {len} entries, expected {want} (N={n}, L={l}, k={k}, E={e})"
                )));
            }
        }
        if let Some(&d) = self
            .domain_ids
            .iter()
            .find(|&&d| d as usize >= self.domains.len())
        {
            return Err(TraceError::Invalid(format!(
                "trace: domain id {d} out of range ({} domains)",
                self.domains.len()
            )));
        }
        if let Some(&x) = self.expert_ids.iter().find(|&&x| x as usize >= e) {
            return Err(TraceError::Invalid(format!(
                "trace: expert id {x} out of range ({e} experts)"
            )));
        }
        Ok(())
    }

    /// The trace aggregated into router counts covering the single step `self.step`.
    pub fn counts(&self) -> RouterLog {
        let mut counts = RouterLog::new(
            self.layers.clone(),
            self.domains.clone(),
            self.n_experts,
            self.top_k,
        );
        counts.step_start = self.step;
        counts.step_end = self.step;
        for (t, &d) in self.domain_ids.iter().enumerate() {
            if let Some(slot) = counts.tokens.get_mut(d as usize) {
                *slot += 1;
            }
            for l in 0..self.n_layers() {
                for (&x, &g) in self.experts(l, t).iter().zip(self.gates(l, t)) {
                    if let Some(i) = counts.index(l, d as usize, x as usize) {
                        counts.counts[i] += 1;
                        counts.gate_sums[i] += f64::from(g);
                    }
                }
            }
        }
        counts
    }

    fn metadata(&self) -> HashMap<String, String> {
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert(
            "layers".to_string(),
            serde_json::to_string(&self.layers).unwrap_or_default(),
        );
        meta.insert(
            "domains".to_string(),
            serde_json::to_string(&self.domains).unwrap_or_default(),
        );
        meta.insert("n_experts".to_string(), self.n_experts.to_string());
        meta.insert("top_k".to_string(), self.top_k.to_string());
        meta.insert("checkpoint".to_string(), self.checkpoint.clone());
        meta.insert("step".to_string(), self.step.to_string());
        meta
    }

    fn tensor_docs(&self) -> Vec<TensorDoc> {
        let (n, l, k, e) = (self.n_tokens(), self.n_layers(), self.top_k, self.n_experts);
        let mut docs =
            vec![
            ("token_ids", "U32", vec![n], "input token id at each traced position"),
            ("target_ids", "U32", vec![n], "next token id: what the model is asked to predict"),
            ("predicted_ids", "U32", vec![n], "argmax of the logits at that position"),
            ("domain_ids", "U32", vec![n], "domain of the token; index into metadata.domains"),
            ("source_ids", "U32", vec![n], "validation stream/document the token came from"),
            ("positions", "U32", vec![n], "position of the token in its sequence"),
            (
                "expert_ids",
                "U32",
                vec![l, n, k],
                "chosen experts per MoE layer (index into metadata.layers) and token, best first",
            ),
            ("gate_weights", "F32", vec![l, n, k], "gate weight of each chosen expert"),
        ];
        if self.router_probs.is_some() {
            docs.push((
                "router_probs",
                "F32",
                vec![l, n, e],
                "router probability of every expert per MoE layer and token",
            ));
        }
        docs
    }

    /// Writes `trace.safetensors`, `index.json` and `counts.safetensors` into `dir` (created if
    /// needed); each file is written atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        self.validate()?;
        fs::create_dir_all(dir).map_err(|e| TraceError::io("creating directory", dir, e))?;
        let (n, l, k, e) = (self.n_tokens(), self.n_layers(), self.top_k, self.n_experts);
        let mut tensors = vec![
            ("token_ids", OwnedTensor::u32(&[n], &self.token_ids)),
            ("target_ids", OwnedTensor::u32(&[n], &self.target_ids)),
            ("predicted_ids", OwnedTensor::u32(&[n], &self.predicted_ids)),
            ("domain_ids", OwnedTensor::u32(&[n], &self.domain_ids)),
            ("source_ids", OwnedTensor::u32(&[n], &self.source_ids)),
            ("positions", OwnedTensor::u32(&[n], &self.positions)),
            ("expert_ids", OwnedTensor::u32(&[l, n, k], &self.expert_ids)),
            (
                "gate_weights",
                OwnedTensor::f32(&[l, n, k], &self.gate_weights),
            ),
        ];
        if let Some(p) = &self.router_probs {
            tensors.push(("router_probs", OwnedTensor::f32(&[l, n, e], p)));
        }
        let metadata = self.metadata();
        safetensors_io::write_safetensors(&dir.join(TRACE_FILE), &tensors, metadata.clone())?;
        self.counts().write_to(&dir.join(COUNTS_FILE))?;

        let index = serde_json::json!({
            "format": FORMAT,
            "files": {
                TRACE_FILE: "per-token tensors below (safetensors; load with safetensors.numpy.load_file)",
                COUNTS_FILE: format!("the trace aggregated as router counts ({}): counts I64 (L, D, E) \
                    top-k assignments per layer/domain/expert, gate_sums F64 (L, D, E), tokens I64 (D,)",
                    router_log::FORMAT),
            },
            "metadata": metadata,
            "metadata_meaning": {
                "layers": "JSON list: block index of each MoE layer (axis L)",
                "domains": "JSON list: domain name per domain id",
                "n_experts": "experts per MoE layer (E)",
                "top_k": "experts chosen per token (k)",
                "checkpoint": "path of the traced checkpoint",
                "step": "optimizer step of that checkpoint",
            },
            "tensors": self.tensor_docs().into_iter().map(|(name, dtype, shape, meaning)| {
                serde_json::json!({"name": name, "dtype": dtype, "shape": shape, "meaning": meaning})
            }).collect::<Vec<_>>(),
        });
        let path = dir.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index).map_err(|source| TraceError::Json {
            path: path.clone(),
            source,
        })?;
        safetensors_io::write_atomic(&path, text.as_bytes())
    }

    /// Reads a trace directory's `trace.safetensors` (the other two files are derived).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(TRACE_FILE);
        let bytes = safetensors_io::read_bytes(&path)?;
        let file = Loaded::parse(&path, &bytes)?;
        file.expect_format(FORMAT)?;
        let layers: Vec<usize> = file.meta_json("layers")?;
        let domains: Vec<String> = file.meta_json("domains")?;
        let n_experts: usize = file.meta_parse("n_experts")?;
        let top_k: usize = file.meta_parse("top_k")?;
        let step: u64 = file.meta_parse("step")?;
        let checkpoint = file.meta("checkpoint")?.to_string();
        // N is whatever token_ids holds; every other tensor is checked against it.
        let n = match file.shape("token_ids")?.as_slice() {
            [n] => *n,
            other => {
                return Err(TraceError::BadTensor {
                    path: path.clone(),
                    name: "token_ids".to_string(),
                    reason: format!("shape is {other:?}, expected (N,)"),
                })
            }
        };
        let l = layers.len();
        let trace = Trace {
            token_ids: file.u32s("token_ids", &[n])?,
            target_ids: file.u32s("target_ids", &[n])?,
            predicted_ids: file.u32s("predicted_ids", &[n])?,
            domain_ids: file.u32s("domain_ids", &[n])?,
            source_ids: file.u32s("source_ids", &[n])?,
            positions: file.u32s("positions", &[n])?,
            expert_ids: file.u32s("expert_ids", &[l, n, top_k])?,
            gate_weights: file.f32s("gate_weights", &[l, n, top_k])?,
            router_probs: if file.has("router_probs") {
                Some(file.f32s("router_probs", &[l, n, n_experts])?)
            } else {
                None
            },
            layers,
            domains,
            n_experts,
            top_k,
            checkpoint,
            step,
        };
        trace.validate().map_err(|e| TraceError::BadTensor {
            path: path.clone(),
            name: "expert_ids/domain_ids".to_string(),
            reason: e.to_string(),
        })?;
        Ok(trace)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A 5-token, 2-layer, 4-expert, top-2 trace used by trace and analysis tests.
    pub(crate) fn small_trace() -> Trace {
        let mut b = TraceBuilder::new(vec![0, 1], vec!["web".into(), "math".into()], 4, 2)
            .checkpoint("runs/x/checkpoints/step-00000010", 10);
        // Batch 1: tokens 7, 8, 7 (web, web, math).
        b.push(TraceBatch {
            token_ids: &[7, 8, 7],
            target_ids: &[8, 7, 9],
            predicted_ids: &[8, 8, 9],
            domain_ids: &[0, 0, 1],
            source_ids: &[0, 0, 1],
            positions: &[0, 1, 0],
            expert_ids: &[vec![0, 1, 0, 2, 3, 0], vec![1, 2, 1, 2, 1, 3]],
            gate_weights: &[vec![0.5; 6], vec![0.75, 0.25, 0.5, 0.5, 0.5, 0.5]],
            router_probs: None,
        })
        .unwrap();
        // Batch 2: tokens 9, 7 (math, math).
        b.push(TraceBatch {
            token_ids: &[9, 7],
            target_ids: &[7, 0],
            predicted_ids: &[7, 9],
            domain_ids: &[1, 1],
            source_ids: &[1, 1],
            positions: &[1, 2],
            expert_ids: &[vec![3, 2, 0, 1], vec![0, 3, 1, 0]],
            gate_weights: &[vec![0.5; 4], vec![0.5; 4]],
            router_probs: None,
        })
        .unwrap();
        b.finish()
    }

    #[test]
    fn builder_lays_out_layer_major() {
        let t = small_trace();
        assert_eq!(t.n_tokens(), 5);
        assert_eq!(t.experts(0, 3), &[3, 2]);
        assert_eq!(t.experts(1, 4), &[1, 0]);
        assert_eq!(t.experts(2, 0), &[] as &[u32]);
        let c = t.counts();
        assert_eq!(c.tokens, vec![2, 3]);
        // Layer 0 web: {0,1},{0,2} -> [2,1,1,0]; math: {3,0},{3,2},{0,1} -> [2,1,1,2].
        assert_eq!(c.row(0, 0), &[2, 1, 1, 0]);
        assert_eq!(c.row(0, 1), &[2, 1, 1, 2]);
        assert_eq!(c.gate_sum(1, 0, 1), 1.25);
        assert_eq!((c.step_start, c.step_end), (10, 10));
    }

    #[test]
    fn builder_rejects_bad_batches() {
        let mut b = TraceBuilder::new(vec![0], vec!["web".into()], 4, 2);
        let ok = TraceBatch {
            token_ids: &[1],
            target_ids: &[2],
            predicted_ids: &[2],
            domain_ids: &[0],
            source_ids: &[0],
            positions: &[0],
            expert_ids: &[vec![0, 1]],
            gate_weights: &[vec![0.5, 0.5]],
            router_probs: None,
        };
        assert!(b
            .push(TraceBatch {
                target_ids: &[],
                ..ok
            })
            .is_err());
        assert!(b
            .push(TraceBatch {
                domain_ids: &[1],
                ..ok
            })
            .is_err());
        assert!(b
            .push(TraceBatch {
                expert_ids: &[vec![0, 4]],
                ..ok
            })
            .is_err());
        assert!(b
            .push(TraceBatch {
                expert_ids: &[vec![0]],
                ..ok
            })
            .is_err());
        assert_eq!(b.n_tokens(), 0);
        b.push(ok).unwrap();
        let probs = [vec![0.25f32; 4]];
        assert!(b
            .push(TraceBatch {
                router_probs: Some(&probs),
                ..ok
            })
            .is_err());
        assert_eq!(b.n_tokens(), 1);
    }

    #[test]
    fn write_read_roundtrip_with_index_and_counts() {
        let dir = crate::test_util::tmp_dir("trace");
        let mut t = small_trace();
        t.router_probs = Some((0..2 * 5 * 4).map(|i| i as f32 / 40.0).collect());
        t.write(&dir).unwrap();
        assert_eq!(Trace::read(&dir).unwrap(), t);
        assert_eq!(
            router_log::read_chunk(&dir.join(COUNTS_FILE)).unwrap(),
            t.counts()
        );
        let index: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join(INDEX_FILE)).unwrap()).unwrap();
        assert_eq!(index["metadata"]["step"], "10");
        let names: Vec<&str> = index["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"router_probs") && names.contains(&"expert_ids"));
        assert_eq!(index["tensors"][6]["shape"], serde_json::json!([2, 5, 2]));
        fs::remove_dir_all(&dir).unwrap();
    }
}
