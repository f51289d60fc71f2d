//! Routing metrics: pure functions over [`RouterLog`] and [`Trace`]s.
//!
//! Conventions: `layer_idx` indexes `layers` (the MoE layers), not block numbers; results carry
//! block numbers for display. Undefined values (a domain with no tokens) are `None`, never NaN,
//! so JSON shows `null` and CSV an empty cell.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{Result, TraceError};
use crate::router_log::RouterLog;
use crate::trace::Trace;

/// Share of domain `domain`'s tokens routed to each expert of MoE layer `layer_idx` (OLMoE's
/// domain specialisation): `share[e] = counts[l][d][e] / tokens[d]`. Sums to `top_k`; a router
/// that ignores domains gives `top_k / n_experts` everywhere. `None` when the domain has no tokens.
pub fn domain_share(counts: &RouterLog, layer_idx: usize, domain: usize) -> Option<Vec<f64>> {
    let tokens = counts.tokens_of(domain);
    let row = counts.row(layer_idx, domain);
    (tokens > 0 && !row.is_empty()).then(|| row.iter().map(|&c| c as f64 / tokens as f64).collect())
}

/// The share every expert would get under domain-blind uniform routing: `top_k / n_experts`.
pub fn uniform_share(counts: &RouterLog) -> f64 {
    if counts.n_experts == 0 {
        return 0.0;
    }
    counts.top_k as f64 / counts.n_experts as f64
}

/// The `n` experts with the largest [`domain_share`] as `(expert, share)`, largest first, ties
/// broken by lower expert id; empty when the domain has no tokens.
pub fn top_experts(
    counts: &RouterLog,
    layer_idx: usize,
    domain: usize,
    n: usize,
) -> Vec<(usize, f64)> {
    let Some(share) = domain_share(counts, layer_idx, domain) else {
        return Vec::new();
    };
    let mut ranked: Vec<(usize, f64)> = share.into_iter().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(n);
    ranked
}

/// Peak share `max_e counts[l][d][e] / tokens[d]`: how much of a domain its favourite expert
/// takes (>= `top_k / n_experts`, <= 1); `None` when the domain has no tokens.
pub fn peak_share(counts: &RouterLog, layer_idx: usize, domain: usize) -> Option<f64> {
    domain_share(counts, layer_idx, domain)?
        .into_iter()
        .max_by(f64::total_cmp)
}

/// Expert distribution of (layer, domain): `p[e] = counts[l][d][e] / sum_e' counts[l][d][e']`
/// (sums to 1); `None` when the domain has no assignments in that layer.
pub fn expert_distribution(
    counts: &RouterLog,
    layer_idx: usize,
    domain: usize,
) -> Option<Vec<f64>> {
    let row = counts.row(layer_idx, domain);
    let total: i64 = row.iter().sum();
    (total > 0).then(|| row.iter().map(|&c| c as f64 / total as f64).collect())
}

/// Jensen-Shannon divergence with base-2 logs, in [0, 1]:
/// `JSD(p, q) = KL(p || m) / 2 + KL(q || m) / 2` with `m = (p + q) / 2` and
/// `KL(p || m) = sum_i p_i log2(p_i / m_i)`, where terms with `p_i = 0` are 0 (their limit).
/// Errors when the lengths differ.
pub fn jensen_shannon(p: &[f64], q: &[f64]) -> Result<f64> {
    if p.len() != q.len() {
        return Err(TraceError::Mismatch(format!(
            "Jensen-Shannon divergence of distributions over {} and {} experts",
            p.len(),
            q.len()
        )));
    }
    let half_kl = |a: f64, m: f64| {
        if a > 0.0 {
            0.5 * a * (a / m).log2()
        } else {
            0.0
        }
    };
    let jsd: f64 = p
        .iter()
        .zip(q)
        .map(|(&a, &b)| {
            let m = 0.5 * (a + b);
            half_kl(a, m) + half_kl(b, m)
        })
        .sum();
    // Rounding can step a hair outside the mathematical range.
    Ok(jsd.clamp(0.0, 1.0))
}

/// Mean of the defined values; `None` when there are none.
fn mean_defined(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .flatten()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// JSD between the expert distributions of every pair of domains of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DomainJsd {
    /// Block indices of the MoE layers.
    pub layers: Vec<usize>,
    /// Domain names (matrix rows and columns).
    pub domains: Vec<String>,
    /// `[layer_idx][a][b]` = JSD(p_{l,a}, p_{l,b}); `None` when a domain has no tokens.
    pub per_layer: Vec<Vec<Vec<Option<f64>>>>,
    /// `[a][b]` = mean over layers of `per_layer` (over the layers where it is defined).
    pub mean: Vec<Vec<Option<f64>>>,
    /// Domains left out (no tokens), with the reason.
    pub notes: Vec<String>,
}

/// Pairwise domain JSD per layer and averaged over layers (see [`DomainJsd`]).
pub fn domain_jsd(counts: &RouterLog) -> DomainJsd {
    let n_domains = counts.n_domains();
    let per_layer: Vec<Vec<Vec<Option<f64>>>> = (0..counts.n_layers())
        .map(|l| {
            let dists: Vec<Option<Vec<f64>>> = (0..n_domains)
                .map(|d| expert_distribution(counts, l, d))
                .collect();
            (0..n_domains)
                .map(|a| {
                    (0..n_domains)
                        .map(|b| match (&dists[a], &dists[b]) {
                            (Some(p), Some(q)) => jensen_shannon(p, q).ok(),
                            _ => None,
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let mean = (0..n_domains)
        .map(|a| {
            (0..n_domains)
                .map(|b| mean_defined(per_layer.iter().map(|m| m[a][b])))
                .collect()
        })
        .collect();
    let notes = (0..n_domains)
        .filter(|&d| counts.tokens_of(d) == 0)
        .map(|d| {
            format!(
                "domain {} has no tokens; its JSD entries are empty",
                counts.domains[d]
            )
        })
        .collect();
    DomainJsd {
        layers: counts.layers.clone(),
        domains: counts.domains.clone(),
        per_layer,
        mean,
        notes,
    }
}

/// JSD of each domain's expert distribution between two runs of the same model (same layers
/// and experts): how a data-mixture change moves routing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunJsd {
    /// Block indices of the MoE layers.
    pub layers: Vec<usize>,
    /// Domains of run `a` in order, then those only in run `b`.
    pub domains: Vec<String>,
    /// `[layer_idx][domain]` = JSD(p^a_{l,d}, p^b_{l,d}); `None` when either run has no tokens of
    /// the domain (e.g. it was removed from the variant's mixture).
    pub per_layer: Vec<Vec<Option<f64>>>,
    /// `[domain]` = mean over layers of `per_layer`.
    pub mean: Vec<Option<f64>>,
    /// Why entries are empty.
    pub notes: Vec<String>,
}

/// Same-domain JSD between runs `a` and `b`, matching domains by name (see [`RunJsd`]); errors
/// when the MoE layers or expert counts differ.
pub fn run_jsd(a: &RouterLog, b: &RouterLog) -> Result<RunJsd> {
    if a.layers != b.layers || a.n_experts != b.n_experts {
        return Err(TraceError::Mismatch(format!(
            "cannot compare routing of different models: MoE layers {:?} vs {:?}, experts {} vs {}",
            a.layers, b.layers, a.n_experts, b.n_experts
        )));
    }
    let mut domains = a.domains.clone();
    domains.extend(b.domains.iter().filter(|d| !a.domains.contains(d)).cloned());
    let mut notes = Vec::new();
    for name in &domains {
        for (run, counts) in [("first", a), ("second", b)] {
            let tokens = counts.domain_index(name).map_or(0, |d| counts.tokens_of(d));
            if tokens == 0 {
                notes.push(format!(
                    "domain {name} has no tokens in the {run} run; no raw or aligned JSD for it"
                ));
            }
        }
    }
    let per_layer: Vec<Vec<Option<f64>>> = (0..a.n_layers())
        .map(|l| {
            domains
                .iter()
                .map(|name| {
                    let p = expert_distribution(a, l, a.domain_index(name)?)?;
                    let q = expert_distribution(b, l, b.domain_index(name)?)?;
                    jensen_shannon(&p, &q).ok()
                })
                .collect()
        })
        .collect();
    let mean = (0..domains.len())
        .map(|d| mean_defined(per_layer.iter().map(|row| row[d])))
        .collect();
    Ok(RunJsd {
        layers: a.layers.clone(),
        domains,
        per_layer,
        mean,
        notes,
    })
}

/// Assignments per expert in one layer, summed over domains.
pub fn expert_load(counts: &RouterLog, layer_idx: usize) -> Vec<i64> {
    let mut load = vec![0i64; counts.n_experts];
    for d in 0..counts.n_domains() {
        for (acc, &c) in load.iter_mut().zip(counts.row(layer_idx, d)) {
            *acc += c;
        }
    }
    load
}

/// Load imbalance per layer: `max_e load[e] / mean_e load[e]` with `load` from [`expert_load`]
/// (1 = perfectly balanced, `n_experts` = one expert takes everything); `None` for an empty layer.
pub fn load_imbalance(counts: &RouterLog) -> Vec<Option<f64>> {
    (0..counts.n_layers())
        .map(|l| {
            let load = expert_load(counts, l);
            let total: i64 = load.iter().sum();
            let max = load.iter().copied().max().unwrap_or(0);
            (total > 0).then(|| max as f64 / (total as f64 / load.len() as f64))
        })
        .collect()
}

/// Which token of a trace position a vocabulary analysis keys on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// The input token at that position (`token_ids`).
    Input,
    /// The model's argmax prediction there (`predicted_ids`).
    Predicted,
}

impl TokenKind {
    /// Lower-case name for files and tables.
    pub fn name(self) -> &'static str {
        match self {
            TokenKind::Input => "input",
            TokenKind::Predicted => "predicted",
        }
    }
}

/// A token's share of an expert's assignments.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenShare {
    /// Token id.
    pub token: u32,
    /// Assignments of this token to the expert.
    pub count: u64,
    /// `count / assignments of the expert`.
    pub share: f64,
}

/// One expert's most frequent tokens.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpertTokens {
    /// Expert id.
    pub expert: usize,
    /// All assignments to this expert in the layer.
    pub assignments: u64,
    /// The most frequent tokens, largest share first (ties: lower token id).
    pub top: Vec<TokenShare>,
}

/// How concentrated one token's routing is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenSpecialization {
    /// Token id.
    pub token: u32,
    /// Routings of the token: occurrences x top_k.
    pub routings: u64,
    /// The expert it is routed to most often (ties: lower id).
    pub top_expert: usize,
    /// `routings to top_expert / routings`; in [1/E, 1/k] with distinct top-k experts.
    pub specialization: f64,
}

/// Vocabulary specialisation of one layer (see [`vocab_specialization`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VocabSpecialization {
    /// Block index of the layer.
    pub layer: usize,
    /// Input or predicted tokens.
    pub kind: TokenKind,
    /// Per expert: assignments and top tokens.
    pub experts: Vec<ExpertTokens>,
    /// Per distinct token, most routed first (ties: lower token id).
    pub tokens: Vec<TokenSpecialization>,
}

/// Vocabulary specialisation (OLMoE) of MoE layer `layer_idx`, keyed on input or predicted tokens.
/// Per expert e: `share(e, t) = #assignments of e whose token is t / #assignments of e`, top
/// `top_n` tokens reported. Per token t: `specialization(t) = max_e #(t routed to e) / (#t * k)`,
/// the fraction of its routings (k per occurrence) going to its most frequent expert; with k
/// distinct experts per token it lies in [1/E, 1/k] (1/k = always the same expert set).
pub fn vocab_specialization(
    trace: &Trace,
    layer_idx: usize,
    kind: TokenKind,
    top_n: usize,
) -> Result<VocabSpecialization> {
    let layer = layer_of(trace, layer_idx)?;
    let ids = match kind {
        TokenKind::Input => &trace.token_ids,
        TokenKind::Predicted => &trace.predicted_ids,
    };
    // (token, expert) -> count; BTreeMap keeps output order deterministic.
    let mut pair_counts: BTreeMap<(u32, usize), u64> = BTreeMap::new();
    for (t, &token) in ids.iter().enumerate() {
        for &e in trace.experts(layer_idx, t) {
            *pair_counts.entry((token, e as usize)).or_default() += 1;
        }
    }
    let mut per_expert: Vec<Vec<(u32, u64)>> = vec![Vec::new(); trace.n_experts];
    let mut per_token: BTreeMap<u32, (u64, usize, u64)> = BTreeMap::new();
    for (&(token, e), &c) in &pair_counts {
        if let Some(v) = per_expert.get_mut(e) {
            v.push((token, c));
        }
        let entry = per_token.entry(token).or_insert((0, e, 0));
        entry.0 += c;
        // Strictly greater keeps the lowest expert id on ties (experts arrive in ascending order).
        if c > entry.2 {
            entry.1 = e;
            entry.2 = c;
        }
    }
    let experts = per_expert
        .into_iter()
        .enumerate()
        .map(|(expert, mut tokens)| {
            let assignments: u64 = tokens.iter().map(|(_, c)| c).sum();
            tokens.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let top = tokens
                .into_iter()
                .take(top_n)
                .map(|(token, count)| TokenShare {
                    token,
                    count,
                    share: count as f64 / assignments as f64,
                })
                .collect();
            ExpertTokens {
                expert,
                assignments,
                top,
            }
        })
        .collect();
    let mut tokens: Vec<TokenSpecialization> = per_token
        .into_iter()
        .map(
            |(token, (routings, top_expert, top_count))| TokenSpecialization {
                token,
                routings,
                top_expert,
                specialization: top_count as f64 / routings as f64,
            },
        )
        .collect();
    tokens.sort_by(|a, b| b.routings.cmp(&a.routings).then(a.token.cmp(&b.token)));
    Ok(VocabSpecialization {
        layer,
        kind,
        experts,
        tokens,
    })
}

/// Block index of MoE layer `layer_idx`, or an error naming the valid range.
fn layer_of(trace: &Trace, layer_idx: usize) -> Result<usize> {
    trace.layers.get(layer_idx).copied().ok_or_else(|| {
        TraceError::Invalid(format!(
            "MoE layer index {layer_idx} out of range (trace has {} MoE layers)",
            trace.n_layers()
        ))
    })
}

/// Expert co-activation of one layer (see [`coactivation`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Coactivation {
    /// Block index of the layer.
    pub layer: usize,
    /// Matrix side E.
    pub n_experts: usize,
    /// `[i * E + j]`, i != j: tokens whose top-k set contains both i and j; diagonal 0.
    pub together: Vec<u64>,
    /// `[i]`: tokens routed to i.
    pub routed: Vec<u64>,
    /// `[i * E + j]` = `together[i][j] / routed[i]`: of the tokens that chose i, the fraction that
    /// also chose j (OLMoE); 0 where `routed[i]` is 0; diagonal 0.
    pub normalized: Vec<f64>,
}

/// Expert co-activation over all pairs of each token's k chosen experts (not only adjacent
/// slots): `C[i][j] = #tokens with {i, j} ⊆ topk(token)`, normalised per row by `#tokens routed
/// to i` (so rows need not sum to anything; the matrix is asymmetric).
pub fn coactivation(trace: &Trace, layer_idx: usize) -> Result<Coactivation> {
    let layer = layer_of(trace, layer_idx)?;
    let e = trace.n_experts;
    let mut together = vec![0u64; e * e];
    let mut routed = vec![0u64; e];
    for t in 0..trace.n_tokens() {
        let mut chosen: Vec<usize> = trace
            .experts(layer_idx, t)
            .iter()
            .map(|&x| x as usize)
            .collect();
        // A token counts once per expert even if a buggy router repeated one in its top-k.
        chosen.sort_unstable();
        chosen.dedup();
        for &i in &chosen {
            if let Some(r) = routed.get_mut(i) {
                *r += 1;
            }
            for &j in &chosen {
                if i != j {
                    if let Some(c) = together.get_mut(i * e + j) {
                        *c += 1;
                    }
                }
            }
        }
    }
    let normalized = together
        .iter()
        .enumerate()
        .map(|(idx, &c)| match routed[idx / e.max(1)] {
            0 => 0.0,
            r => c as f64 / r as f64,
        })
        .collect();
    Ok(Coactivation {
        layer,
        n_experts: e,
        together,
        routed,
        normalized,
    })
}

/// Router saturation per layer between two traces of the same tokens (e.g. an intermediate and
/// the final checkpoint of one run): `mean_t |topk_a(t) ∩ topk_b(t)| / k` (1 = identical routing).
/// Errors unless both traces have the same MoE layers, k, experts and token/domain sequence.
pub fn router_saturation(a: &Trace, b: &Trace) -> Result<Vec<f64>> {
    if a.layers != b.layers || a.top_k != b.top_k || a.n_experts != b.n_experts {
        return Err(TraceError::Mismatch(format!(
            "router saturation needs traces of the same model: layers {:?} vs {:?}, top_k {} vs \
             {}, experts {} vs {}",
            a.layers, b.layers, a.top_k, b.top_k, a.n_experts, b.n_experts
        )));
    }
    if a.token_ids != b.token_ids || a.domain_ids != b.domain_ids {
        return Err(TraceError::Mismatch(format!(
            "router saturation needs traces of the same tokens ({} vs {} tokens, or different ids); \
             trace both checkpoints with the same validation streams",
            a.n_tokens(),
            b.n_tokens()
        )));
    }
    if a.n_tokens() == 0 || a.top_k == 0 {
        return Err(TraceError::Invalid(
            "router saturation of empty traces".to_string(),
        ));
    }
    Ok((0..a.n_layers())
        .map(|l| {
            let overlap: usize = (0..a.n_tokens())
                .map(|t| {
                    let eb = b.experts(l, t);
                    a.experts(l, t).iter().filter(|x| eb.contains(x)).count()
                })
                .sum();
            overlap as f64 / (a.n_tokens() * a.top_k) as f64
        })
        .collect())
}

/// A domain-by-step series: per chunk, per domain, the mean over layers of [`peak_share`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpecializationOverSteps {
    /// Domain names (series).
    pub domains: Vec<String>,
    /// Last step of each chunk (x axis).
    pub steps: Vec<u64>,
    /// `[chunk][domain]` mean over layers of the peak share; `None` when the chunk had no tokens
    /// of the domain.
    pub peak_share: Vec<Vec<Option<f64>>>,
    /// `top_k / n_experts`: the value of domain-blind routing.
    pub uniform: f64,
}

/// Specialisation over training: [`peak_share`] averaged over layers, per chunk and domain.
pub fn specialization_over_steps(chunks: &[RouterLog]) -> Result<SpecializationOverSteps> {
    let first = chunks
        .first()
        .ok_or_else(|| TraceError::Invalid("no router-log chunks".to_string()))?;
    for c in chunks {
        first.check_compatible(c)?;
    }
    Ok(SpecializationOverSteps {
        domains: first.domains.clone(),
        steps: chunks.iter().map(|c| c.step_end).collect(),
        peak_share: chunks
            .iter()
            .map(|c| {
                (0..c.n_domains())
                    .map(|d| mean_defined((0..c.n_layers()).map(|l| peak_share(c, l, d))))
                    .collect()
            })
            .collect(),
        uniform: uniform_share(first),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::trace::tests::small_trace;

    const EPS: f64 = 1e-12;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < EPS
    }

    /// One layer, 4 experts, top-2; web: 4 tokens, code: 2 tokens, math: none.
    fn counts() -> RouterLog {
        let mut c = RouterLog::new(
            vec![3, 5],
            vec!["web".into(), "code".into(), "math".into()],
            4,
            2,
        );
        c.tokens = vec![4, 2, 0];
        c.counts = vec![
            // layer 0: web, code, math
            4, 2, 2, 0, //
            0, 0, 2, 2, //
            0, 0, 0, 0, //
            // layer 1
            2, 2, 2, 2, //
            2, 2, 0, 0, //
            0, 0, 0, 0,
        ];
        c
    }

    #[test]
    fn shares_and_top_experts() {
        let c = counts();
        assert_eq!(domain_share(&c, 0, 0).unwrap(), vec![1.0, 0.5, 0.5, 0.0]);
        assert_eq!(domain_share(&c, 0, 2), None);
        assert_eq!(uniform_share(&c), 0.5);
        // Ties (experts 1 and 2 at 0.5) go to the lower id.
        assert_eq!(top_experts(&c, 0, 0, 2), vec![(0, 1.0), (1, 0.5)]);
        assert_eq!(top_experts(&c, 0, 2, 2), vec![]);
        assert_eq!(peak_share(&c, 1, 0), Some(0.5));
        assert_eq!(
            expert_distribution(&c, 0, 0).unwrap(),
            vec![0.5, 0.25, 0.25, 0.0]
        );
    }

    #[test]
    fn jensen_shannon_hand_values() {
        assert_eq!(jensen_shannon(&[1.0, 0.0], &[0.0, 1.0]).unwrap(), 1.0);
        assert_eq!(jensen_shannon(&[0.3, 0.7], &[0.3, 0.7]).unwrap(), 0.0);
        // m = (0.75, 0.25): 0.5*(0.5*log2(2/3) + 0.5*log2(2)) + 0.5*log2(4/3) = 0.311278...
        let v = jensen_shannon(&[0.5, 0.5], &[1.0, 0.0]).unwrap();
        assert!(close(v, 0.311_278_124_459_132_83), "{v}");
        assert!(jensen_shannon(&[1.0], &[0.5, 0.5]).is_err());
    }

    #[test]
    fn domain_jsd_matrix_and_mean() {
        let j = domain_jsd(&counts());
        // Layer 0: web (0.5,0.25,0.25,0) vs code (0,0,0.5,0.5): m = (.25,.125,.375,.25);
        // KL(web||m) = .5*1 + .25*1 + .25*log2(2/3); KL(code||m) = .5*log2(4/3) + .5*1.
        let l0 =
            0.5 * (0.75 + 0.25 * (2.0f64 / 3.0).log2()) + 0.5 * (0.5 * (4.0f64 / 3.0).log2() + 0.5);
        assert!(close(j.per_layer[0][0][1].unwrap(), l0));
        assert_eq!(j.per_layer[0][1][0], j.per_layer[0][0][1]);
        assert_eq!(j.per_layer[0][0][0], Some(0.0));
        // Layer 1: uniform vs (.5,.5,0,0): m=(.375,.375,.125,.125);
        let l1 = 0.5 * (0.5 * (0.25f64 / 0.375).log2() + 0.5 * 1.0) + 0.5 * (0.5f64 / 0.375).log2();
        assert!(close(j.per_layer[1][0][1].unwrap(), l1));
        assert!(close(j.mean[0][1].unwrap(), (l0 + l1) / 2.0));
        assert_eq!(j.per_layer[0][2][0], None);
        assert_eq!(j.mean[2][2], None);
        assert_eq!(j.notes.len(), 1);
        assert!(j.notes[0].contains("math"));
    }

    #[test]
    fn run_jsd_matches_domains_by_name() {
        let a = counts();
        let mut b = RouterLog::new(
            a.layers.clone(),
            vec!["code".into(), "web".into(), "books".into()],
            4,
            2,
        );
        b.tokens = vec![1, 2, 3];
        b.counts = vec![
            0, 0, 1, 1, /* code */ 1, 1, 1, 1, /* web */ 3, 3, 0, 0, /* books */
            0, 0, 1, 1, 2, 2, 0, 0, 3, 3, 0, 0,
        ];
        let r = run_jsd(&a, &b).unwrap();
        assert_eq!(r.domains, vec!["web", "code", "math", "books"]);
        // web layer 0: (.5,.25,.25,0) vs uniform: m = (.375,.25,.25,.125)
        let web0 = 0.5 * (0.5 * (0.5f64 / 0.375).log2())
            + 0.5 * (0.25 * (0.25f64 / 0.375).log2() + 0.25 * 1.0);
        assert!(close(r.per_layer[0][0].unwrap(), web0));
        // web layer 1: uniform vs (.5,.5,0,0) is layer-1's l1 from the previous test.
        let l1 = 0.5 * (0.5 * (0.25f64 / 0.375).log2() + 0.5 * 1.0) + 0.5 * (0.5f64 / 0.375).log2();
        assert!(close(r.per_layer[1][0].unwrap(), l1));
        assert!(close(r.mean[0].unwrap(), (web0 + l1) / 2.0));
        // code: identical distributions in layer 0, (.5,.5,0,0) vs (0,0,.5,.5) in layer 1.
        assert_eq!(r.per_layer[0][1], Some(0.0));
        assert_eq!(r.per_layer[1][1], Some(1.0));
        assert_eq!(r.mean[1], Some(0.5));
        assert_eq!(r.per_layer[0][2], None);
        assert_eq!(r.mean[3], None);
        assert_eq!(r.notes.len(), 3, "{:?}", r.notes);
        let other_model = RouterLog::new(vec![3], a.domains.clone(), 4, 2);
        assert!(run_jsd(&a, &other_model).is_err());
    }

    #[test]
    fn load_imbalance_is_max_over_mean() {
        let c = counts();
        assert_eq!(expert_load(&c, 0), vec![4, 2, 4, 2]);
        // mean 3, max 4; layer 1: (4,4,2,2) also mean 3, max 4.
        assert_eq!(load_imbalance(&c), vec![Some(4.0 / 3.0), Some(4.0 / 3.0)]);
        let empty = RouterLog::new(vec![0], vec!["web".into()], 2, 1);
        assert_eq!(load_imbalance(&empty), vec![None]);
    }

    #[test]
    fn vocab_specialization_hand_counts() {
        let t = small_trace();
        // Layer 0 tokens/experts: 7:{0,1}, 8:{0,2}, 7:{3,0}, 9:{3,2}, 7:{0,1}.
        let v = vocab_specialization(&t, 0, TokenKind::Input, 2).unwrap();
        assert_eq!(v.layer, 0);
        assert_eq!(v.experts[0].assignments, 4);
        assert_eq!(
            v.experts[0].top,
            vec![
                TokenShare {
                    token: 7,
                    count: 3,
                    share: 0.75
                },
                TokenShare {
                    token: 8,
                    count: 1,
                    share: 0.25
                }
            ]
        );
        assert_eq!(
            v.experts[3].top[0],
            TokenShare {
                token: 7,
                count: 1,
                share: 0.5
            }
        );
        // Token 7: 6 routings, expert 0 takes 3 -> 0.5.
        assert_eq!(
            v.tokens[0],
            TokenSpecialization {
                token: 7,
                routings: 6,
                top_expert: 0,
                specialization: 0.5
            }
        );
        // Token 9 ties experts 2 and 3: the lower id wins.
        assert_eq!(v.tokens[2].token, 9);
        assert_eq!(v.tokens[2].top_expert, 2);
        // Predicted ids 8,8,9,7,9 in layer 1 ({1,2},{1,2},{1,3},{0,3},{1,0}): 8 -> expert 1 and
        // 2 twice each -> 0.5; 9 -> {1,3},{1,0}: expert 1 twice of 4 -> 0.5; 7 -> 0.5.
        let p = vocab_specialization(&t, 1, TokenKind::Predicted, 1).unwrap();
        assert_eq!(p.experts[1].assignments, 4);
        assert_eq!(
            p.experts[1].top,
            vec![TokenShare {
                token: 8,
                count: 2,
                share: 0.5
            }]
        );
        assert_eq!(
            p.tokens
                .iter()
                .map(|s| (s.token, s.top_expert))
                .collect::<Vec<_>>(),
            vec![(8, 1), (9, 1), (7, 0)]
        );
        assert!(vocab_specialization(&t, 2, TokenKind::Input, 1).is_err());
    }

    #[test]
    fn coactivation_counts_all_pairs() {
        let mut t = small_trace();
        // Make layer 0 top-3 so non-adjacent pairs matter: rebuild with k = 3 by hand.
        t.top_k = 3;
        t.layers = vec![0];
        t.expert_ids = vec![0, 1, 2, 0, 2, 3, 1, 2, 3, 0, 1, 3, 0, 2, 1];
        t.gate_weights = vec![0.3; 15];
        let c = coactivation(&t, 0).unwrap();
        // Tokens: {0,1,2},{0,2,3},{1,2,3},{0,1,3},{0,1,2}.
        assert_eq!(c.routed, vec![4, 4, 4, 3]);
        assert_eq!(c.together[1], 3); // 0&1: tokens 0, 3, 4
        assert_eq!(c.together[2], 3); // 0&2: tokens 0, 1, 4
        assert_eq!(c.together[3], 2); // 0&3: tokens 1, 3
        assert_eq!(c.together[3 * 4], 2);
        assert_eq!(c.together[0], 0);
        assert_eq!(c.normalized[3], 0.5);
        assert_eq!(c.normalized[3 * 4], 2.0 / 3.0);
        assert_eq!(c.normalized[3 * 4 + 3], 0.0);
    }

    #[test]
    fn saturation_is_mean_topk_overlap() {
        let a = small_trace();
        let mut b = a.clone();
        // Layer 0 token 0: {0,1} -> {1,3} (overlap 1 of 2); token 1: {0,2} -> {3,1} (0 of 2).
        b.expert_ids[0..4].copy_from_slice(&[1, 3, 3, 1]);
        let s = router_saturation(&a, &b).unwrap();
        assert_eq!(s, vec![(1.0 + 0.0 + 2.0 + 2.0 + 2.0) / 10.0, 1.0]);
        let mut c = a.clone();
        c.token_ids[0] = 1;
        assert!(router_saturation(&a, &c).is_err());
    }

    #[test]
    fn specialization_over_steps_averages_layers() {
        let mut early = counts();
        early.step_end = 10;
        let mut late = counts();
        late.step_start = 11;
        late.step_end = 20;
        late.counts[12..16].copy_from_slice(&[4, 4, 0, 0]);
        let s = specialization_over_steps(&[early, late]).unwrap();
        assert_eq!(s.steps, vec![10, 20]);
        // web: layer 0 peak 4/4 = 1, layer 1 peak 2/4 -> 0.75; late layer 1 peak 4/4 -> 1.
        assert_eq!(s.peak_share[0], vec![Some(0.75), Some(1.0), None]);
        assert_eq!(s.peak_share[1][0], Some(1.0));
        assert_eq!(s.uniform, 0.5);
    }
}
