//! Matching experts across runs. Expert `e` of one run and expert `e` of another need not mean
//! the same thing (another seed may learn the same experts in another order), so a cross-run JSD
//! is also reported after each layer's experts of run B are matched to run A's: an optimal
//! assignment (Hungarian algorithm) maximising how many of the same validation tokens the matched
//! experts both receive. The match uses per-token co-assignment, not the domain profiles the JSD
//! then compares, so it does not bias that JSD down by construction.

use crate::error::{Result, TraceError};
use crate::router_log::RouterLog;
use crate::trace::Trace;

/// Optimal assignment maximising the total weight of a square matrix: `result[row] = column`,
/// a permutation. O(n^3) Hungarian algorithm (shortest augmenting paths with potentials).
pub fn max_weight_assignment(weights: &[Vec<i64>]) -> Result<Vec<usize>> {
    let n = weights.len();
    if let Some((i, row)) = weights.iter().enumerate().find(|(_, r)| r.len() != n) {
        return Err(TraceError::Invalid(format!(
            "assignment needs a square matrix: row {i} has {} entries, expected {n}",
            row.len()
        )));
    }
    // Minimise cost = -weight; 1-based arrays with a virtual column 0 (the classic formulation).
    let cost = |i: usize, j: usize| -(weights[i - 1][j - 1] as f64);
    let mut u = vec![0.0f64; n + 1];
    let mut v = vec![0.0f64; n + 1];
    let mut row_of_col = vec![0usize; n + 1];
    let mut way = vec![0usize; n + 1];
    for i in 1..=n {
        row_of_col[0] = i;
        let mut col = 0usize;
        let mut min_to = vec![f64::INFINITY; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[col] = true;
            let row = row_of_col[col];
            let mut delta = f64::INFINITY;
            let mut next = 0usize;
            for j in 1..=n {
                if !used[j] {
                    let reduced = cost(row, j) - u[row] - v[j];
                    if reduced < min_to[j] {
                        min_to[j] = reduced;
                        way[j] = col;
                    }
                    if min_to[j] < delta {
                        delta = min_to[j];
                        next = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[row_of_col[j]] += delta;
                    v[j] -= delta;
                } else {
                    min_to[j] -= delta;
                }
            }
            col = next;
            if row_of_col[col] == 0 {
                break;
            }
        }
        // Flip the augmenting path back to the root.
        loop {
            let prev = way[col];
            row_of_col[col] = row_of_col[prev];
            col = prev;
            if col == 0 {
                break;
            }
        }
    }
    let mut assignment = vec![0usize; n];
    for j in 1..=n {
        assignment[row_of_col[j] - 1] = j - 1;
    }
    Ok(assignment)
}

/// `[e_a][e_b]` = tokens that run `a` routes to expert `e_a` and run `b` to expert `e_b` in MoE
/// layer `layer_idx` (with top-k > 1 each pair of the two choice sets counts once). Both traces
/// must cover the same tokens (the fixed validation streams).
pub fn coassignment(a: &Trace, b: &Trace, layer_idx: usize) -> Result<Vec<Vec<i64>>> {
    same_tokens(a, b)?;
    if layer_idx >= a.layers.len() {
        return Err(TraceError::Invalid(format!(
            "MoE layer index {layer_idx} out of range ({} MoE layers)",
            a.layers.len()
        )));
    }
    let n = a.token_ids.len();
    let (ka, kb) = (a.top_k, b.top_k);
    let mut m = vec![vec![0i64; b.n_experts]; a.n_experts];
    let ea = &a.expert_ids[layer_idx * n * ka..(layer_idx + 1) * n * ka];
    let eb = &b.expert_ids[layer_idx * n * kb..(layer_idx + 1) * n * kb];
    for t in 0..n {
        for &x in &ea[t * ka..(t + 1) * ka] {
            for &y in &eb[t * kb..(t + 1) * kb] {
                if let Some(cell) = m
                    .get_mut(x as usize)
                    .and_then(|row| row.get_mut(y as usize))
                {
                    *cell += 1;
                }
            }
        }
    }
    Ok(m)
}

/// Errors unless `a` and `b` trace the same model shape over the same tokens.
fn same_tokens(a: &Trace, b: &Trace) -> Result<()> {
    if a.layers != b.layers || a.n_experts != b.n_experts {
        return Err(TraceError::Mismatch(format!(
            "cannot match experts of different models: MoE layers {:?} vs {:?}, experts {} vs {}",
            a.layers, b.layers, a.n_experts, b.n_experts
        )));
    }
    if a.token_ids != b.token_ids || a.domain_ids != b.domain_ids {
        return Err(TraceError::Mismatch(format!(
            "the traces cover different tokens ({} vs {}): expert matching needs both runs traced \
             on the same validation streams",
            a.token_ids.len(),
            b.token_ids.len()
        )));
    }
    Ok(())
}

/// Per MoE layer, the expert of run `b` matched to each expert of run `a`: `perm[l][e_a] = e_b`,
/// maximising the tokens both send to matched experts.
pub fn match_experts(a: &Trace, b: &Trace) -> Result<Vec<Vec<usize>>> {
    (0..a.layers.len())
        .map(|l| max_weight_assignment(&coassignment(a, b, l)?))
        .collect()
}

/// `counts` with each layer's experts renumbered: expert `e` of the result holds what expert
/// `perm[l][e]` held (so with [`match_experts`]`(a, b)`, run b's counts in run a's expert order).
pub fn permute_experts(counts: &RouterLog, perm: &[Vec<usize>]) -> Result<RouterLog> {
    let e = counts.n_experts;
    let valid = |p: &Vec<usize>| {
        let mut seen = vec![false; e];
        p.len() == e
            && p.iter()
                .all(|&x| x < e && !std::mem::replace(&mut seen[x], true))
    };
    if perm.len() != counts.n_layers() || !perm.iter().all(valid) {
        return Err(TraceError::Invalid(format!(
            "expert permutation must hold one permutation of 0..{e} per MoE layer ({} layers)",
            counts.n_layers()
        )));
    }
    let mut out = counts.clone();
    for (l, p) in perm.iter().enumerate() {
        for d in 0..counts.n_domains() {
            for (new, &old) in p.iter().enumerate() {
                if let (Some(to), Some(from)) = (out.index(l, d, new), counts.index(l, d, old)) {
                    out.counts[to] = counts.counts[from];
                    out.gate_sums[to] = counts.gate_sums[from];
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::analysis::run_jsd;
    use crate::trace::tests::small_trace;

    /// Brute force over all permutations: the best total weight.
    fn best_by_enumeration(w: &[Vec<i64>]) -> i64 {
        fn go(w: &[Vec<i64>], row: usize, used: &mut Vec<bool>) -> i64 {
            if row == w.len() {
                return 0;
            }
            let mut best = i64::MIN;
            for j in 0..w.len() {
                if !used[j] {
                    used[j] = true;
                    best = best.max(w[row][j] + go(w, row + 1, used));
                    used[j] = false;
                }
            }
            best
        }
        go(w, 0, &mut vec![false; w.len()])
    }

    #[test]
    fn hungarian_finds_the_optimal_assignment() {
        // Hand case: the greedy choice (row 0 -> column 0, weight 9) is not optimal;
        // 0->1, 1->0, 2->2 gives 8 + 7 + 6 = 21 against 9 + 1 + ... at most 9 + 5 + 3 = 17.
        let w = vec![vec![9, 8, 0], vec![7, 1, 5], vec![3, 0, 6]];
        let a = max_weight_assignment(&w).unwrap();
        assert_eq!(a, vec![1, 0, 2]);
        // Pseudo-random matrices against brute force.
        let mut x = 12345u64;
        for n in 1..=6 {
            for _ in 0..20 {
                let w: Vec<Vec<i64>> = (0..n)
                    .map(|_| {
                        (0..n)
                            .map(|_| {
                                x = x
                                    .wrapping_mul(6364136223846793005)
                                    .wrapping_add(1442695040888963407);
                                ((x >> 33) % 100) as i64
                            })
                            .collect()
                    })
                    .collect();
                let a = max_weight_assignment(&w).unwrap();
                let mut sorted = a.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "not a permutation");
                let total: i64 = a.iter().enumerate().map(|(i, &j)| w[i][j]).sum();
                assert_eq!(total, best_by_enumeration(&w), "{w:?}");
            }
        }
        assert!(max_weight_assignment(&[vec![1, 2], vec![3]]).is_err());
    }

    #[test]
    fn a_run_against_its_permuted_copy_aligns_to_zero_jsd() {
        let a = small_trace();
        // The same run with its experts renumbered per layer (a reversal and a rotation).
        let perms: Vec<Vec<usize>> = (0..a.layers.len())
            .map(|l| {
                (0..a.n_experts)
                    .map(|e| {
                        if l % 2 == 0 {
                            a.n_experts - 1 - e
                        } else {
                            (e + 1) % a.n_experts
                        }
                    })
                    .collect()
            })
            .collect();
        let mut b = a.clone();
        let n = a.token_ids.len();
        for (l, p) in perms.iter().enumerate() {
            for x in &mut b.expert_ids[l * n * a.top_k..(l + 1) * n * a.top_k] {
                *x = p[*x as usize] as u32;
            }
        }
        let (ca, cb) = (a.counts(), b.counts());
        let raw = run_jsd(&ca, &cb).unwrap();
        assert!(
            raw.mean.iter().flatten().any(|&j| j > 0.0),
            "the permutation should move raw routing: {raw:?}"
        );
        let matched = match_experts(&a, &b).unwrap();
        // Expert e of a is p[e] in b.
        assert_eq!(matched, perms);
        let aligned = run_jsd(&ca, &permute_experts(&cb, &matched).unwrap()).unwrap();
        for j in aligned.per_layer.iter().flatten().flatten() {
            assert!(j.abs() < 1e-12, "aligned JSD {j}");
        }
        assert_eq!(permute_experts(&cb, &matched).unwrap(), ca);
        // Different tokens are refused.
        let mut c = a.clone();
        c.token_ids[0] += 1;
        assert!(match_experts(&a, &c).is_err());
        assert!(permute_experts(&ca, &[vec![0, 0, 1, 2]]).is_err());
    }
}
