//! A batch of sequences as the model takes it: inputs, next-token targets, domain and source
//! ids. Both the mixture stream and the validation split fill it.

/// A batch of sequences: inputs and next-token targets, row-major, with domain and source ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `n_sequences * seq_len` input token ids.
    pub tokens: Vec<u32>,
    /// `n_sequences * seq_len` target ids (the next token of each input).
    pub targets: Vec<u32>,
    /// Domain id (index into [`Dataset::domains`](crate::Dataset::domains)) per sequence.
    pub domain_ids: Vec<u32>,
    /// Source id (index into that domain's [`Dataset::sources`](crate::Dataset::sources)) per
    /// sequence.
    pub source_ids: Vec<u32>,
    /// Number of sequences.
    pub n_sequences: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
}

impl Batch {
    /// An empty batch with room for `n` sequences.
    pub(crate) fn with_capacity(n: usize, seq_len: usize) -> Self {
        Batch {
            tokens: Vec::with_capacity(n * seq_len),
            targets: Vec::with_capacity(n * seq_len),
            domain_ids: Vec::with_capacity(n),
            source_ids: Vec::with_capacity(n),
            n_sequences: 0,
            seq_len,
        }
    }

    /// Appends one sequence from a chunk of seq_len + 1 tokens.
    pub(crate) fn push(&mut self, chunk: &[u32], domain: u32, source: u32) {
        let l = self.seq_len;
        self.tokens.extend_from_slice(&chunk[..l]);
        self.targets.extend_from_slice(&chunk[1..=l]);
        self.domain_ids.push(domain);
        self.source_ids.push(source);
        self.n_sequences += 1;
    }
}
