//! Exact mixing: Megatron's greedy blending rule with cached checkpoints, and seeded
//! permutations that need no storage.

use std::sync::{Mutex, RwLock};

use moelab_io::rng::mix64;

/// A weight vector that takes over from a position of the blended sequence on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BlendStage {
    /// First position (in blended order) the weights apply to.
    pub start: u64,
    /// One weight per category, summing to 1 (0 = never chosen).
    pub weights: Vec<f64>,
}

/// Where the greedy rule stands before the step at `pos`.
#[derive(Debug, Clone)]
struct BlendState {
    pos: u64,
    counts: Vec<u64>,
    /// Counts when the stage containing `pos` began (the rule is applied per stage).
    base: Vec<u64>,
}

/// The greedy blend of categories: position i goes to the category with the largest
/// `weight * (j + 1) - chosen_so_far` (j = i within its stage), so every prefix of every stage
/// is within one sequence of its target share.
///
/// The rule is sequential, so random access starts from the nearest cached state: a
/// checkpoint every `CHECKPOINT_INTERVAL` positions, or the cursor left by the previous call
/// (sequential batches then cost O(batch) instead of O(interval)).
pub(crate) struct Blender {
    categories: usize,
    stages: Vec<BlendStage>,
    /// Flattened `[counts, base]` per checkpoint; checkpoint k is the state at k * interval.
    checkpoints: RwLock<Vec<u64>>,
    cursor: Mutex<Option<BlendState>>,
}

const CHECKPOINT_INTERVAL: u64 = 1024;

impl Blender {
    /// A blender over `categories` with the given stages (the first must start at 0).
    pub(crate) fn new(categories: usize, stages: Vec<BlendStage>) -> Self {
        Blender {
            categories,
            stages,
            checkpoints: RwLock::new(vec![0; 2 * categories]),
            cursor: Mutex::new(None),
        }
    }

    fn stage_at(&self, pos: u64) -> &BlendStage {
        let i = self
            .stages
            .partition_point(|s| s.start <= pos)
            .saturating_sub(1);
        &self.stages[i]
    }

    /// Applies the rule at `state.pos` and advances; returns the chosen category.
    fn step(&self, state: &mut BlendState) -> usize {
        let stage = self.stage_at(state.pos);
        if stage.start == state.pos {
            state.base.copy_from_slice(&state.counts);
        }
        let j = (state.pos - stage.start) as f64;
        let mut best = 0usize;
        let mut best_deficit = f64::NEG_INFINITY;
        for (c, &w) in stage.weights.iter().enumerate() {
            if w <= 0.0 {
                continue;
            }
            let deficit = w * (j + 1.0) - (state.counts[c] - state.base[c]) as f64;
            if deficit > best_deficit {
                best_deficit = deficit;
                best = c;
            }
        }
        state.counts[best] += 1;
        state.pos += 1;
        best
    }

    fn checkpoint(&self, k: u64) -> BlendState {
        let n = self.categories;
        {
            let cps = self.checkpoints.read().unwrap_or_else(|p| p.into_inner());
            let have = (cps.len() / (2 * n)) as u64;
            if k < have {
                return self.state_from(&cps, k);
            }
        }
        let mut cps = self.checkpoints.write().unwrap_or_else(|p| p.into_inner());
        let mut have = (cps.len() / (2 * n)) as u64;
        while have <= k {
            let mut state = self.state_from(&cps, have - 1);
            for _ in 0..CHECKPOINT_INTERVAL {
                self.step(&mut state);
            }
            cps.extend_from_slice(&state.counts);
            cps.extend_from_slice(&state.base);
            have += 1;
        }
        self.state_from(&cps, k)
    }

    fn state_from(&self, cps: &[u64], k: u64) -> BlendState {
        let n = self.categories;
        let at = k as usize * 2 * n;
        BlendState {
            pos: k * CHECKPOINT_INTERVAL,
            counts: cps[at..at + n].to_vec(),
            base: cps[at + n..at + 2 * n].to_vec(),
        }
    }

    /// The state just before position `pos`: from the cursor when it is close behind,
    /// otherwise from the nearest checkpoint.
    fn state_before(&self, pos: u64) -> BlendState {
        let from_cursor = {
            let cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
            cursor
                .as_ref()
                .filter(|c| {
                    c.pos <= pos && c.pos >= pos / CHECKPOINT_INTERVAL * CHECKPOINT_INTERVAL
                })
                .cloned()
        };
        let mut state = match from_cursor {
            Some(c) => c,
            None => self.checkpoint(pos / CHECKPOINT_INTERVAL),
        };
        while state.pos < pos {
            self.step(&mut state);
        }
        state
    }

    /// (category, index within the category) of positions [start, start + len).
    pub(crate) fn decode(&self, start: u64, len: usize) -> Vec<(u32, u64)> {
        let mut state = self.state_before(start);
        let mut out = Vec::with_capacity(len);
        for _ in 0..len {
            let c = self.step(&mut state);
            out.push((c as u32, state.counts[c] - 1));
        }
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
        out
    }

    /// How many of the first `pos` positions went to each category.
    #[cfg(test)]
    pub(crate) fn counts_at(&self, pos: u64) -> Vec<u64> {
        self.state_before(pos).counts
    }
}

/// A seeded pseudo-random permutation of [0, n) computed per element (a 4-round Feistel
/// network with cycle walking), so epochs of any size need no stored order.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Permutation {
    n: u64,
    half_bits: u32,
    key: u64,
}

impl Permutation {
    /// The permutation of [0, n) selected by `key`.
    pub(crate) fn new(n: u64, key: u64) -> Self {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        Permutation {
            n,
            half_bits: bits.div_ceil(2).max(1),
            key,
        }
    }

    fn encrypt(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let mut left = x >> self.half_bits;
        let mut right = x & mask;
        for round in 0..4u64 {
            let f = mix64(right ^ mix64(self.key.wrapping_add(round))) & mask;
            let next = left ^ f;
            left = right;
            right = next;
        }
        (left << self.half_bits) | right
    }

    /// Image of `x` (< n).
    pub(crate) fn apply(&self, x: u64) -> u64 {
        if self.n <= 1 {
            return x;
        }
        // The Feistel domain is at most 4n, so the walk takes a few steps on average.
        let mut y = self.encrypt(x);
        while y >= self.n {
            y = self.encrypt(y);
        }
        y
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn permutation_is_a_bijection() {
        for n in [1u64, 2, 3, 7, 64, 100, 1000, 4097] {
            let p = Permutation::new(n, 42 + n);
            let mut seen = vec![false; n as usize];
            for x in 0..n {
                let y = p.apply(x);
                assert!(y < n);
                assert!(!seen[y as usize]);
                seen[y as usize] = true;
            }
        }
    }

    #[test]
    fn random_access_matches_sequential() {
        let stages = vec![
            BlendStage {
                start: 0,
                weights: vec![0.5, 0.3, 0.2],
            },
            BlendStage {
                start: 3000,
                weights: vec![0.1, 0.0, 0.9],
            },
        ];
        let a = Blender::new(3, stages.clone());
        let all = a.decode(0, 6000);
        let b = Blender::new(3, stages);
        for start in [5000u64, 17, 2999, 3000, 4100, 1023, 1024, 0] {
            let part = b.decode(start, 300.min(6000 - start as usize));
            assert_eq!(&all[start as usize..start as usize + part.len()], &part[..]);
        }
        assert_eq!(b.counts_at(6000).iter().sum::<u64>(), 6000);
    }
}
