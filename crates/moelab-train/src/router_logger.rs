//! The router log's writer ([`RouterLogger`]): top-k assignment counts and summed gate weights
//! per (layer, domain, expert), accumulated on the model's device and flushed as router-log
//! chunks into the run's `router/` folder.
//!
//! Accumulation is two `index_add`s per MoE layer per micro-batch on the device; nothing is
//! copied to the host until a flush. Counts are of the router's choices (before any capacity
//! drop). The format ([`RouterLog`]) lives in moelab-trace (`router_log`), next to its reader.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use moelab_model::LayerRouting;
use moelab_trace::router_log::{write_chunk, RouterLog};

use crate::dist::Collective;
use crate::TrainError;

/// Running sums since the last flush.
#[derive(Debug)]
pub struct RouterLogger {
    layers: Vec<usize>,
    domains: Vec<String>,
    n_experts: usize,
    top_k: usize,
    /// Per MoE layer, (domains x experts) f64 on the device.
    counts: Vec<Tensor>,
    gate_sums: Vec<Tensor>,
    /// Tokens per domain (known on the host from the batch).
    tokens: Vec<i64>,
    /// First step in the current window.
    step_start: Option<u64>,
}

impl RouterLogger {
    /// Empty sums for `layers` (block indices of the MoE layers).
    pub fn new(
        layers: Vec<usize>,
        domains: Vec<String>,
        n_experts: usize,
        top_k: usize,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let zeros = Tensor::zeros(domains.len() * n_experts, DType::F64, device)?;
        Ok(Self {
            counts: vec![zeros.clone(); layers.len()],
            gate_sums: vec![zeros; layers.len()],
            tokens: vec![0; domains.len()],
            layers,
            domains,
            n_experts,
            top_k,
            step_start: None,
        })
    }

    /// Domain names, by domain id.
    pub fn domains(&self) -> &[String] {
        &self.domains
    }

    /// Adds one micro-batch: `routing` from the model, `domain_ids` one per sequence of
    /// `seq_len` tokens.
    pub fn record(
        &mut self,
        step: u64,
        routing: &[LayerRouting],
        domain_ids: &[u32],
        seq_len: usize,
    ) -> Result<(), TrainError> {
        self.step_start.get_or_insert(step);
        let n_experts = self.n_experts as u32;
        let offsets: Vec<u32> = domain_ids
            .iter()
            .flat_map(|&d| std::iter::repeat_n(d * n_experts, seq_len))
            .collect();
        for &d in domain_ids {
            self.tokens[d as usize] += seq_len as i64;
        }
        let Some(first) = routing.first() else {
            return Ok(());
        };
        let device = first.expert_ids.device();
        let offsets = Tensor::from_vec(offsets, (domain_ids.len() * seq_len, 1), device)?;
        for (i, record) in routing.iter().enumerate() {
            let index = record.expert_ids.broadcast_add(&offsets)?.flatten_all()?;
            let ones = Tensor::ones(index.elem_count(), DType::F64, device)?;
            let gates = record.gate_weights.flatten_all()?.to_dtype(DType::F64)?;
            self.counts[i] = self.counts[i].index_add(&index, &ones, 0)?;
            self.gate_sums[i] = self.gate_sums[i].index_add(&index, &gates, 0)?;
        }
        Ok(())
    }

    /// The sums so far as a router-log chunk ending at `step_end`.
    pub fn snapshot(&self, step_end: u64) -> Result<RouterLog, TrainError> {
        let mut chunk = RouterLog::new(
            self.layers.clone(),
            self.domains.clone(),
            self.n_experts,
            self.top_k,
        );
        chunk.step_start = self.step_start.unwrap_or(step_end);
        chunk.step_end = step_end;
        chunk.counts = Vec::with_capacity(self.layers.len() * self.domains.len() * self.n_experts);
        chunk.gate_sums = Vec::with_capacity(chunk.counts.capacity());
        for (counts, gates) in self.counts.iter().zip(&self.gate_sums) {
            chunk.counts.extend(
                counts
                    .to_vec1::<f64>()?
                    .into_iter()
                    .map(|c| c.round() as i64),
            );
            chunk.gate_sums.extend(gates.to_vec1::<f64>()?);
        }
        chunk.tokens = self.tokens.clone();
        Ok(chunk)
    }

    /// Writes the window ending at `step_end`, summed over the ranks of `comm`, to `dir` (rank
    /// 0 writes) and starts a new one; nothing is written for an empty window. Every rank calls
    /// it at the same steps.
    pub fn flush(
        &mut self,
        dir: &Path,
        step_end: u64,
        comm: &dyn Collective,
    ) -> Result<Option<PathBuf>, TrainError> {
        if self.step_start.is_none() {
            return Ok(None);
        }
        let chunk = reduce(comm, self.snapshot(step_end)?);
        let path = if comm.rank() == 0 {
            Some(write_chunk(dir, &chunk)?)
        } else {
            None
        };
        for t in self.counts.iter_mut().chain(self.gate_sums.iter_mut()) {
            *t = t.zeros_like()?;
        }
        self.tokens.iter_mut().for_each(|t| *t = 0);
        self.step_start = None;
        Ok(path)
    }
}

/// `chunk` with its counts, gate sums and tokens summed over the ranks of `comm` (counts are
/// integers far below 2^53, exact in f64).
pub fn reduce(comm: &dyn Collective, mut chunk: RouterLog) -> RouterLog {
    if comm.world_size() == 1 {
        return chunk;
    }
    let (n_counts, n_gates) = (chunk.counts.len(), chunk.gate_sums.len());
    let mut packed: Vec<f64> = chunk.counts.iter().map(|&c| c as f64).collect();
    packed.extend(&chunk.gate_sums);
    packed.extend(chunk.tokens.iter().map(|&t| t as f64));
    comm.all_reduce_f64(&mut packed);
    chunk.counts = packed[..n_counts]
        .iter()
        .map(|c| c.round() as i64)
        .collect();
    chunk.gate_sums = packed[n_counts..n_counts + n_gates].to_vec();
    chunk.tokens = packed[n_counts + n_gates..]
        .iter()
        .map(|t| t.round() as i64)
        .collect();
    chunk
}
