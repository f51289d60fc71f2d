//! Router activation logs: per (MoE layer, domain, expert) assignment counts and gate sums over a
//! range of optimizer steps, written by the trainer as `RUN_DIR/router/chunk-{step_end:08}.safetensors`.
//!
//! File format `moelab-router-log-v1` (safetensors):
//! - `counts` I64 (n_moe_layers, n_domains, n_experts): top-k assignments of that domain's tokens
//!   to that expert (every chosen slot counts once, so a layer's counts for a domain sum to
//!   `top_k * tokens[domain]`; capacity drops are still counted, they are routing decisions);
//! - `gate_sums` F64 (same shape): summed gate weights of those assignments;
//! - `tokens` I64 (n_domains,): tokens of each domain seen;
//! - `__metadata__`: `format`, `step_start`, `step_end` (inclusive), `layers` (JSON list of block
//!   indices), `domains` (JSON list of names, index = domain id), `n_experts`, `top_k`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Result, TraceError};
use crate::safetensors_io::{self, Loaded, OwnedTensor};

/// The `format` metadata value of router-log chunks (and of a trace's `counts.safetensors`).
pub const FORMAT: &str = "moelab-router-log-v1";

/// Name of the router-log directory inside a run directory.
pub const ROUTER_LOG_DIR: &str = "router";

/// The router log (one chunk of it, or their sum): routing counts per (MoE layer, domain,
/// expert) over an inclusive range of optimizer steps. One name for one thing: the trainer's
/// [`RouterLog`] writer is `RouterLogger`, the run folder's `router/` holds its chunks, and an
/// evaluation's or a trace's counts are the same type.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterLog {
    /// Block indices of the MoE layers, in model order (`layer_idx` below indexes this list).
    pub layers: Vec<usize>,
    /// Domain names; the position is the domain id.
    pub domains: Vec<String>,
    /// Routed experts per MoE layer.
    pub n_experts: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// First optimizer step covered (inclusive).
    pub step_start: u64,
    /// Last optimizer step covered (inclusive).
    pub step_end: u64,
    /// Assignment counts, row-major `[layer_idx][domain][expert]`.
    pub counts: Vec<i64>,
    /// Summed gate weights, same layout as `counts`.
    pub gate_sums: Vec<f64>,
    /// Tokens seen per domain.
    pub tokens: Vec<i64>,
}

impl RouterLog {
    /// All-zero counts for this model and domain list, covering step 0 until set otherwise.
    pub fn new(layers: Vec<usize>, domains: Vec<String>, n_experts: usize, top_k: usize) -> Self {
        let cells = layers.len() * domains.len() * n_experts;
        let n_domains = domains.len();
        RouterLog {
            layers,
            domains,
            n_experts,
            top_k,
            step_start: 0,
            step_end: 0,
            counts: vec![0; cells],
            gate_sums: vec![0.0; cells],
            tokens: vec![0; n_domains],
        }
    }

    /// Number of MoE layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Number of domains.
    pub fn n_domains(&self) -> usize {
        self.domains.len()
    }

    /// Position of `[layer_idx][domain][expert]` in `counts`, if all three are in range.
    pub fn index(&self, layer_idx: usize, domain: usize, expert: usize) -> Option<usize> {
        (layer_idx < self.n_layers() && domain < self.n_domains() && expert < self.n_experts)
            .then(|| (layer_idx * self.n_domains() + domain) * self.n_experts + expert)
    }

    /// Assignments of `domain`'s tokens to `expert` in MoE layer `layer_idx` (0 when out of range).
    pub fn count(&self, layer_idx: usize, domain: usize, expert: usize) -> i64 {
        self.index(layer_idx, domain, expert)
            .and_then(|i| self.counts.get(i).copied())
            .unwrap_or(0)
    }

    /// Summed gate weight of those assignments (0 when out of range).
    pub fn gate_sum(&self, layer_idx: usize, domain: usize, expert: usize) -> f64 {
        self.index(layer_idx, domain, expert)
            .and_then(|i| self.gate_sums.get(i).copied())
            .unwrap_or(0.0)
    }

    /// Tokens seen of `domain` (0 when out of range).
    pub fn tokens_of(&self, domain: usize) -> i64 {
        self.tokens.get(domain).copied().unwrap_or(0)
    }

    /// The counts of one (layer, domain) row over experts (empty when out of range).
    pub fn row(&self, layer_idx: usize, domain: usize) -> &[i64] {
        match self.index(layer_idx, domain, 0) {
            Some(start) => self
                .counts
                .get(start..start + self.n_experts)
                .unwrap_or(&[]),
            None => &[],
        }
    }

    /// Id of the domain called `name`.
    pub fn domain_index(&self, name: &str) -> Option<usize> {
        self.domains.iter().position(|d| d == name)
    }

    /// Checks the vectors have the lengths the layer/domain/expert lists imply.
    pub fn validate(&self) -> Result<()> {
        let cells = self.n_layers() * self.n_domains() * self.n_experts;
        if self.counts.len() != cells
            || self.gate_sums.len() != cells
            || self.tokens.len() != self.n_domains()
        {
            return Err(TraceError::Invalid(format!(
                "router counts for {} layers x {} domains x {} experts need {cells} counts, {cells} \
                 gate sums and {} tokens; have {}, {} and {}",
                self.n_layers(),
                self.n_domains(),
                self.n_experts,
                self.n_domains(),
                self.counts.len(),
                self.gate_sums.len(),
                self.tokens.len()
            )));
        }
        if self.step_start > self.step_end {
            return Err(TraceError::Invalid(format!(
                "step_start {} is after step_end {}",
                self.step_start, self.step_end
            )));
        }
        Ok(())
    }

    /// Adds one token per entry of `domain_ids` (a flattened batch) to `tokens`.
    pub fn record_tokens(&mut self, domain_ids: &[u32]) -> Result<()> {
        for &d in domain_ids {
            let slot = self.tokens.get_mut(d as usize).ok_or_else(|| {
                TraceError::Invalid(format!(
                    "domain id {d} out of range ({} domains)",
                    self.domains.len()
                ))
            })?;
            *slot += 1;
        }
        Ok(())
    }

    /// Adds one MoE layer's routing of a flattened batch: `expert_ids` and `gate_weights` are
    /// (tokens, top_k) row-major, `domain_ids` is (tokens,). Tokens are counted by `record_tokens`.
    pub fn record_layer(
        &mut self,
        layer_idx: usize,
        domain_ids: &[u32],
        expert_ids: &[u32],
        gate_weights: &[f32],
    ) -> Result<()> {
        let k = self.top_k;
        if layer_idx >= self.n_layers() {
            return Err(TraceError::Invalid(format!(
                "layer index {layer_idx} out of range ({} MoE layers)",
                self.n_layers()
            )));
        }
        if expert_ids.len() != domain_ids.len() * k || gate_weights.len() != expert_ids.len() {
            return Err(TraceError::Invalid(format!(
                "layer {layer_idx}: {} tokens with top_k {k} need {} expert ids and gate weights, \
                 got {} and {}",
                domain_ids.len(),
                domain_ids.len() * k,
                expert_ids.len(),
                gate_weights.len()
            )));
        }
        for (t, &d) in domain_ids.iter().enumerate() {
            for slot in t * k..(t + 1) * k {
                let (e, g) = (expert_ids[slot], gate_weights[slot]);
                let i = self
                    .index(layer_idx, d as usize, e as usize)
                    .ok_or_else(|| {
                        TraceError::Invalid(format!(
                            "layer {layer_idx}: domain id {d} or expert id {e} out of range ({} \
                             domains, {} experts)",
                            self.n_domains(),
                            self.n_experts
                        ))
                    })?;
                self.counts[i] += 1;
                self.gate_sums[i] += f64::from(g);
            }
        }
        Ok(())
    }

    /// Zeroes all counts and starts a new range at `step_start` (the trainer's per-chunk reset).
    pub fn reset(&mut self, step_start: u64) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.gate_sums.iter_mut().for_each(|g| *g = 0.0);
        self.tokens.iter_mut().for_each(|t| *t = 0);
        self.step_start = step_start;
        self.step_end = step_start;
    }

    /// Errors unless `other` has the same layers, domains, experts and top-k.
    pub fn check_compatible(&self, other: &RouterLog) -> Result<()> {
        let mut problems = Vec::new();
        if self.layers != other.layers {
            problems.push(format!("layers {:?} vs {:?}", self.layers, other.layers));
        }
        if self.domains != other.domains {
            problems.push(format!("domains {:?} vs {:?}", self.domains, other.domains));
        }
        if self.n_experts != other.n_experts {
            problems.push(format!(
                "n_experts {} vs {}",
                self.n_experts, other.n_experts
            ));
        }
        if self.top_k != other.top_k {
            problems.push(format!("top_k {} vs {}", self.top_k, other.top_k));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TraceError::Mismatch(format!(
                "router counts differ: {}",
                problems.join("; ")
            )))
        }
    }

    /// Adds `other` into `self` and widens the step range to cover both; errors if the layers,
    /// domains, expert count or top-k differ.
    pub fn merge(&mut self, other: &RouterLog) -> Result<()> {
        self.check_compatible(other)?;
        self.validate()?;
        other.validate()?;
        self.counts
            .iter_mut()
            .zip(&other.counts)
            .for_each(|(a, b)| *a += b);
        self.gate_sums
            .iter_mut()
            .zip(&other.gate_sums)
            .for_each(|(a, b)| *a += b);
        self.tokens
            .iter_mut()
            .zip(&other.tokens)
            .for_each(|(a, b)| *a += b);
        self.step_start = self.step_start.min(other.step_start);
        self.step_end = self.step_end.max(other.step_end);
        Ok(())
    }

    /// Serialises to safetensors bytes' parts (shared by chunks and a trace's counts file).
    pub(crate) fn to_tensors(&self) -> (Vec<(&'static str, OwnedTensor)>, HashMap<String, String>) {
        let shape = [self.n_layers(), self.n_domains(), self.n_experts];
        let tensors = vec![
            ("counts", OwnedTensor::i64(&shape, &self.counts)),
            ("gate_sums", OwnedTensor::f64(&shape, &self.gate_sums)),
            (
                "tokens",
                OwnedTensor::i64(&[self.n_domains()], &self.tokens),
            ),
        ];
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("step_start".to_string(), self.step_start.to_string());
        meta.insert("step_end".to_string(), self.step_end.to_string());
        meta.insert("layers".to_string(), json_list(&self.layers));
        meta.insert("domains".to_string(), json_list(&self.domains));
        meta.insert("n_experts".to_string(), self.n_experts.to_string());
        meta.insert("top_k".to_string(), self.top_k.to_string());
        (tensors, meta)
    }

    /// Writes to exactly `path` (atomically).
    pub fn write_to(&self, path: &Path) -> Result<()> {
        self.validate()?;
        let (tensors, meta) = self.to_tensors();
        safetensors_io::write_safetensors(path, &tensors, meta)
    }
}

/// JSON of a list; serialising plain numbers/strings cannot fail, but stay total anyway.
fn json_list<T: serde::Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_string())
}

/// File name of the chunk whose range ends at `step_end`.
pub fn chunk_file_name(step_end: u64) -> String {
    format!("chunk-{step_end:08}.safetensors")
}

/// Writes `chunk` atomically (temp file, fsync, rename) as `dir/chunk-{step_end:08}.safetensors`,
/// creating `dir` if needed; returns the path written.
pub fn write_chunk(dir: &Path, chunk: &RouterLog) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| TraceError::io("creating directory", dir, e))?;
    let path = dir.join(chunk_file_name(chunk.step_end));
    chunk.write_to(&path)?;
    Ok(path)
}

/// Reads one router-log chunk (or a trace's `counts.safetensors`), checking format and shapes.
pub fn read_chunk(path: &Path) -> Result<RouterLog> {
    let bytes = safetensors_io::read_bytes(path)?;
    let file = Loaded::parse(path, &bytes)?;
    from_loaded(&file)
}

/// Decodes router counts from an already parsed file.
pub(crate) fn from_loaded(file: &Loaded<'_>) -> Result<RouterLog> {
    file.expect_format(FORMAT)?;
    let layers: Vec<usize> = file.meta_json("layers")?;
    let domains: Vec<String> = file.meta_json("domains")?;
    let n_experts: usize = file.meta_parse("n_experts")?;
    let top_k: usize = file.meta_parse("top_k")?;
    let step_start: u64 = file.meta_parse("step_start")?;
    let step_end: u64 = file.meta_parse("step_end")?;
    let shape = [layers.len(), domains.len(), n_experts];
    let counts = file.i64s("counts", &shape)?;
    let gate_sums = file.f64s("gate_sums", &shape)?;
    let tokens = file.i64s("tokens", &[domains.len()])?;
    let chunk = RouterLog {
        layers,
        domains,
        n_experts,
        top_k,
        step_start,
        step_end,
        counts,
        gate_sums,
        tokens,
    };
    check_values(file.path, &chunk)?;
    chunk.validate().map_err(|e| TraceError::BadMetadata {
        path: file.path.to_path_buf(),
        key: "step_start".to_string(),
        reason: e.to_string(),
    })?;
    Ok(chunk)
}

/// Refuses counts no routing can produce: negative counts or tokens, negative or non-finite
/// gate sums, and more assignments than top_k x tokens.
fn check_values(path: &Path, chunk: &RouterLog) -> Result<()> {
    let (layers, domains, counts, gate_sums, tokens) = (
        &chunk.layers,
        &chunk.domains,
        &chunk.counts,
        &chunk.gate_sums,
        &chunk.tokens,
    );
    let n_experts = chunk.n_experts;
    // Analyses divide by and take logs of these; a negative count or a NaN gate sum (a corrupt
    // or hand-edited file) would surface as a plausible-looking but wrong report, not an error.
    let bad = |name: &str, index: Vec<usize>, flat: usize, value: String, why: &str| {
        let cell = match index.as_slice() {
            [l, d, e] => format!(
                "MoE layer {l} (block {}), domain `{}`, expert {e}",
                layers.get(*l).copied().unwrap_or_default(),
                domains.get(*d).map_or("?", String::as_str)
            ),
            [d] => format!("domain `{}`", domains.get(*d).map_or("?", String::as_str)),
            _ => String::new(),
        };
        TraceError::BadTensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            reason: format!(
                "value {value} at index {index:?} (flat {flat}; {cell}) {why}; the file is \
                 corrupt or was edited by hand"
            ),
        }
    };
    let cell_index = |flat: usize| {
        let n_experts = n_experts.max(1);
        let n_domains = domains.len().max(1);
        vec![
            flat / (n_domains * n_experts),
            flat / n_experts % n_domains,
            flat % n_experts,
        ]
    };
    if let Some((i, v)) = counts.iter().enumerate().find(|(_, v)| **v < 0) {
        return Err(bad(
            "counts",
            cell_index(i),
            i,
            v.to_string(),
            "is negative",
        ));
    }
    if let Some((i, v)) = tokens.iter().enumerate().find(|(_, v)| **v < 0) {
        return Err(bad("tokens", vec![i], i, v.to_string(), "is negative"));
    }
    if let Some((i, v)) = gate_sums
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite() || **v < 0.0)
    {
        let why = if v.is_finite() {
            "is negative"
        } else {
            "is not finite"
        };
        return Err(bad("gate_sums", cell_index(i), i, v.to_string(), why));
    }
    check_assignment_bound(path, chunk)
}

/// Each token makes top_k assignments in every MoE layer: more than top_k x tokens assignments
/// of a domain in a layer cannot come from routing (shares above 1 would follow).
fn check_assignment_bound(path: &Path, chunk: &RouterLog) -> Result<()> {
    let (layers, domains, tokens) = (&chunk.layers, &chunk.domains, &chunk.tokens);
    let (n_experts, top_k) = (chunk.n_experts, chunk.top_k);
    for (row, assigned) in chunk.counts.chunks(n_experts.max(1)).enumerate() {
        let (layer, domain) = (row / domains.len().max(1), row % domains.len().max(1));
        let limit = tokens
            .get(domain)
            .and_then(|&t| t.checked_mul(i64::try_from(top_k).ok()?));
        let total = assigned.iter().try_fold(0i64, |a, &c| a.checked_add(c));
        if let (Some(limit), Some(total)) = (limit, total) {
            if total <= limit {
                continue;
            }
        }
        return Err(TraceError::BadTensor {
            path: path.to_path_buf(),
            name: "counts".to_string(),
            reason: format!(
                "MoE layer {layer} (block {}), domain `{}`: {} assignments, more than top_k {top_k} x {} tokens \
                 can make; the file is corrupt or was edited by hand",
                layers.get(layer).copied().unwrap_or_default(),
                domains.get(domain).map_or("?", String::as_str),
                total.map_or_else(|| "more than 2^63".to_string(), |t| t.to_string()),
                tokens.get(domain).copied().unwrap_or_default()
            ),
        });
    }
    Ok(())
}

/// Paths of the chunk files in `dir` (a run's `router/`, or a run dir that contains one).
fn chunk_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let router = dir.join(ROUTER_LOG_DIR);
    let dir = if router.is_dir() {
        router
    } else {
        dir.to_path_buf()
    };
    let entries = fs::read_dir(&dir).map_err(|e| TraceError::io("listing", &dir, e))?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| TraceError::io("listing", &dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Temp files start with a dot, so this pattern skips half-written chunks.
        if name.starts_with("chunk-") && name.ends_with(".safetensors") {
            paths.push(entry.path());
        }
    }
    Ok(paths)
}

/// All chunks in a run's `router/` directory (or `dir` itself when it has no `router/`), sorted by
/// step range; empty when there are none.
pub fn read_dir(dir: &Path) -> Result<Vec<RouterLog>> {
    let mut chunks = chunk_paths(dir)?
        .iter()
        .map(|p| read_chunk(p))
        .collect::<Result<Vec<_>>>()?;
    chunks.sort_by_key(|c| (c.step_start, c.step_end));
    Ok(chunks)
}

/// The chunks whose step range overlaps the inclusive range `[from, to]`.
pub fn in_steps(chunks: &[RouterLog], from: u64, to: u64) -> Vec<RouterLog> {
    chunks
        .iter()
        .filter(|c| c.step_start <= to && c.step_end >= from)
        .cloned()
        .collect()
}

/// Deletes chunks of `dir` whose range ends after `step` (a resumed run re-logs those steps, and
/// stale chunks would be counted twice); returns the deleted paths.
pub fn remove_after(dir: &Path, step: u64) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for path in chunk_paths(dir)? {
        let chunk = read_chunk(&path)?;
        if chunk.step_end > step {
            fs::remove_file(&path).map_err(|e| TraceError::io("removing", &path, e))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Sum of `chunks` (e.g. a whole run, or `in_steps(..)` of it); errors when empty, when the
/// chunks disagree on layers/domains/experts, or when step ranges overlap (double counting).
pub fn total(chunks: &[RouterLog]) -> Result<RouterLog> {
    let mut sorted: Vec<&RouterLog> = chunks.iter().collect();
    sorted.sort_by_key(|c| (c.step_start, c.step_end));
    let (first, rest) = sorted
        .split_first()
        .ok_or_else(|| TraceError::Invalid("no router-log chunks to sum".to_string()))?;
    let mut sum = (*first).clone();
    let mut last_end = first.step_end;
    for c in rest {
        if c.step_start <= last_end {
            return Err(TraceError::Mismatch(format!(
                "router-log chunks overlap: steps {}..={} start before step {last_end} ends \
                 (stale chunks from before a resume? see router_log::remove_after)",
                c.step_start, c.step_end
            )));
        }
        last_end = c.step_end;
        sum.merge(c)?;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::test_util::tmp_dir;

    fn sample(step_start: u64, step_end: u64) -> RouterLog {
        let mut c = RouterLog::new(vec![1, 3], vec!["web".into(), "code".into()], 3, 2);
        c.step_start = step_start;
        c.step_end = step_end;
        // Three tokens: web, code, web; top-2 per token in both layers.
        c.record_tokens(&[0, 1, 0]).unwrap();
        c.record_layer(
            0,
            &[0, 1, 0],
            &[0, 1, 2, 1, 0, 2],
            &[0.5, 0.25, 0.75, 0.25, 0.5, 0.5],
        )
        .unwrap();
        c.record_layer(
            1,
            &[0, 1, 0],
            &[2, 1, 2, 0, 2, 1],
            &[1.0, 0.5, 0.5, 0.5, 0.25, 0.25],
        )
        .unwrap();
        c
    }

    #[test]
    fn record_counts_every_slot() {
        let c = sample(0, 9);
        // Layer 0, web tokens chose {0,1} and {0,2}: expert 0 twice, 1 once, 2 once.
        assert_eq!(c.row(0, 0), &[2, 1, 1]);
        assert_eq!(c.row(0, 1), &[0, 1, 1]);
        assert_eq!(c.row(1, 0), &[0, 2, 2]);
        assert_eq!(c.row(1, 1), &[1, 0, 1]);
        assert_eq!(c.tokens, vec![2, 1]);
        assert_eq!(c.gate_sum(0, 0, 0), 1.0);
        assert_eq!(c.gate_sum(1, 0, 2), 1.25);
        assert_eq!(c.count(5, 0, 0), 0);
        assert!(c
            .clone()
            .record_layer(0, &[0], &[7, 0], &[0.5, 0.5])
            .is_err());
        assert!(c.clone().record_layer(0, &[0], &[1], &[0.5]).is_err());
        assert!(c.clone().record_tokens(&[2]).is_err());
    }

    #[test]
    fn chunk_roundtrip_and_dir_listing() {
        let dir = tmp_dir("chunks");
        let a = sample(0, 9);
        let b = sample(10, 19);
        let pb = write_chunk(&dir, &b).unwrap();
        let pa = write_chunk(&dir, &a).unwrap();
        assert!(pa.ends_with("chunk-00000009.safetensors"));
        assert_eq!(read_chunk(&pb).unwrap(), b);
        // A leftover temp file must be ignored.
        fs::write(dir.join(".chunk-00000029.safetensors.1.tmp"), b"junk").unwrap();
        let all = read_dir(&dir).unwrap();
        assert_eq!(all, vec![a.clone(), b.clone()]);
        let sum = total(&all).unwrap();
        assert_eq!((sum.step_start, sum.step_end), (0, 19));
        assert_eq!(sum.row(1, 0), &[0, 4, 4]);
        assert_eq!(sum.tokens, vec![4, 2]);
        assert_eq!(in_steps(&all, 12, 30), vec![b.clone()]);
        assert_eq!(remove_after(&dir, 9).unwrap(), vec![pb]);
        assert_eq!(read_dir(&dir).unwrap(), vec![a]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_same_chunk_gives_the_same_bytes() {
        // Metadata comes from a HashMap; without sorting, its order (and the file's bytes)
        // would change from one write to the next.
        let dir = tmp_dir("bytes");
        let chunk = sample(0, 9);
        let first = fs::read(write_chunk(&dir.join("a"), &chunk).unwrap()).unwrap();
        for i in 0..8 {
            let again = fs::read(write_chunk(&dir.join(format!("b{i}")), &chunk).unwrap()).unwrap();
            assert!(first == again, "write {i} differs");
        }
        assert_eq!(
            read_chunk(&dir.join("a").join("chunk-00000009.safetensors")).unwrap(),
            chunk
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn run_dir_with_router_subdir_is_accepted() {
        let dir = tmp_dir("rundir");
        write_chunk(&dir.join(ROUTER_LOG_DIR), &sample(0, 4)).unwrap();
        assert_eq!(read_dir(&dir).unwrap().len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn merge_and_total_refuse_mismatches() {
        let a = sample(0, 9);
        let mut other = a.clone();
        other.domains[1] = "math".into();
        let err = a.clone().merge(&other).unwrap_err().to_string();
        assert!(err.contains("domains"), "{err}");
        assert!(total(&[a.clone(), sample(5, 12)]).is_err());
        assert!(total(&[]).is_err());
    }

    #[test]
    fn read_errors_name_file_and_key() {
        let dir = tmp_dir("bad");
        let c = sample(0, 3);
        let (tensors, mut meta) = c.to_tensors();
        meta.remove("top_k");
        let path = dir.join("chunk-00000003.safetensors");
        safetensors_io::write_safetensors(&path, &tensors, meta.clone()).unwrap();
        let err = read_chunk(&path).unwrap_err().to_string();
        assert!(
            err.contains("top_k") && err.contains("chunk-00000003"),
            "{err}"
        );
        meta.insert("top_k".into(), "2".into());
        meta.insert("n_experts".into(), "4".into());
        safetensors_io::write_safetensors(&path, &tensors, meta).unwrap();
        let err = read_chunk(&path).unwrap_err().to_string();
        assert!(err.contains("counts") && err.contains("shape"), "{err}");
        fs::write(&path, b"not safetensors").unwrap();
        assert!(read_chunk(&path).is_err());
        assert!(read_chunk(&dir.join("missing.safetensors")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn negative_counts_and_non_finite_gate_sums_are_refused_naming_the_first() {
        let dir = tmp_dir("negative");
        // (tensor, flat index, value); each case also spoils a later cell, which must not be the
        // one named.
        let cases: [(&str, usize, f64, &str); 5] = [
            (
                "counts",
                4,
                -3.0,
                "index [0, 1, 1] (flat 4; MoE layer 0 (block 1), domain `code`",
            ),
            ("tokens", 1, -1.0, "index [1] (flat 1; domain `code`)"),
            (
                "gate_sums",
                7,
                f64::NAN,
                "index [1, 0, 1] (flat 7; MoE layer 1 (block 3)",
            ),
            ("gate_sums", 2, -0.5, "index [0, 0, 2] (flat 2;"),
            ("gate_sums", 0, f64::INFINITY, "index [0, 0, 0] (flat 0;"),
        ];
        for (name, index, value, place) in cases {
            let mut c = sample(0, 3);
            match name {
                "counts" => {
                    c.counts[index] = value as i64;
                    c.counts[index + 3] = -9;
                }
                "tokens" => c.tokens[index] = value as i64,
                _ => {
                    c.gate_sums[index] = value;
                    c.gate_sums[index + 3] = f64::NEG_INFINITY;
                }
            }
            let (tensors, meta) = c.to_tensors();
            let path = dir.join("chunk-00000003.safetensors");
            safetensors_io::write_safetensors(&path, &tensors, meta).unwrap();
            let err = read_chunk(&path).unwrap_err();
            assert!(
                matches!(&err, TraceError::BadTensor { name: n, .. } if n == name),
                "{err:?}"
            );
            let text = err.to_string();
            assert!(
                text.contains("chunk-00000003.safetensors")
                    && text.contains(&format!("tensor `{name}`"))
                    && text.contains(place),
                "{name}[{index}] = {value}: {text}"
            );
            let why = if value.is_finite() {
                "is negative"
            } else {
                "is not finite"
            };
            assert!(text.contains(why), "{text}");
            // The same file through a directory listing (what `moelab analyze` reads) fails too.
            assert!(read_dir(&dir).is_err());
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A layer cannot assign a domain's tokens more than top_k times each: such counts are
    /// refused naming the file, the layer and the domain.
    #[test]
    fn counts_beyond_tokens_times_top_k_are_refused_naming_the_file() {
        let dir = tmp_dir("too-many");
        let mut c = sample(0, 3);
        let (tensors, meta) = c.to_tensors();
        let path = dir.join("chunk-00000003.safetensors");
        safetensors_io::write_safetensors(&path, &tensors, meta).unwrap();
        read_chunk(&path).unwrap();
        let limit = c.tokens[1] * c.top_k as i64;
        let row: i64 = c.counts[c.n_experts..2 * c.n_experts].iter().sum();
        c.counts[c.n_experts] += limit - row + 1;
        let (tensors, meta) = c.to_tensors();
        safetensors_io::write_safetensors(&path, &tensors, meta).unwrap();
        let err = read_chunk(&path).unwrap_err().to_string();
        assert!(
            err.contains("chunk-00000003.safetensors")
                && err.contains("domain `code`")
                && err.contains(&format!("{} assignments", limit + 1)),
            "{err}"
        );
        assert!(read_dir(&dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
