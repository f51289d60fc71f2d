//! Corpora -> tokenizer -> domain shards -> mixture streams of batches.
//!
//! Knows nothing of the model. The data issue fills this crate: `prepare`, shards with a document
//! index and manifest, and exact, resumable mixture streams.
