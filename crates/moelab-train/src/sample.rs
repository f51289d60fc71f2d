//! `moelab sample`: read what a checkpoint's model writes after a prompt (as nanoGPT's
//! sample.py). Greedy at temperature 0 (the evaluation's own greedy decoding, so it is what the
//! exact-match tasks score); otherwise temperature and top-k sampling from a seeded generator, so
//! a seed gives the same text every time.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use moelab_io::rng::SplitMix64;
use moelab_model::ForwardOptions;
use serde::Serialize;

use crate::tasks::{Codec, ModelScorer, Scorer, TokenizerCodec};
use crate::TrainError;

/// The most tokens one call generates (each costs a forward over the whole window).
pub const MAX_NEW_TOKENS: usize = 100_000;

/// What to generate.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// The prompt as text (encoded with the run's tokenizer).
    pub prompt: Option<String>,
    /// The prompt as token ids (instead of text).
    pub prompt_ids: Option<Vec<u32>>,
    /// Tokens to generate at most (generation stops early at the end-of-document token).
    pub max_tokens: usize,
    /// 0 = greedy (argmax); above 0 the logits are divided by it before sampling.
    pub temperature: f64,
    /// Sample only among the k likeliest tokens (0 = all).
    pub top_k: usize,
    /// Seed of the sampler.
    pub seed: u64,
}

/// What `moelab sample` generated.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// The checkpoint used.
    pub checkpoint: PathBuf,
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// The generated token ids (without the end-of-document token that stopped it).
    pub generated_ids: Vec<u32>,
    /// The generated text.
    pub text: String,
    /// True when the end-of-document token ended the generation.
    pub stopped_at_eos: bool,
}

/// Generates from the model of `checkpoint` (a checkpoint folder) on the CPU.
pub fn sample(checkpoint: &Path, options: &SampleOptions) -> Result<Sample, TrainError> {
    let argument = |m: String| Err(TrainError::Argument(m));
    if !(options.temperature >= 0.0 && options.temperature.is_finite()) {
        return argument(format!(
            "--temperature {}: give 0 (greedy) or a positive number",
            options.temperature
        ));
    }
    if options.max_tokens > MAX_NEW_TOKENS {
        return argument(format!(
            "--max-tokens {}: at most {MAX_NEW_TOKENS}",
            options.max_tokens
        ));
    }
    let device = Device::Cpu;
    let (cfg, model, _) = crate::run::load::load_model(checkpoint, &device)?;
    // The run's dataset holds its tokenizer (a relative path is said to be relative).
    let dataset = crate::run::load::open_run_data(&cfg, checkpoint)?;
    let codec = TokenizerCodec::open(&dataset.tokenizer_path())?;
    let prompt_ids = match (&options.prompt_ids, &options.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => codec.encode(text)?,
        (None, None) => return argument("give --prompt TEXT or --prompt-ids".into()),
    };
    if prompt_ids.is_empty() {
        return argument("the prompt is empty (no tokens); give at least one token".into());
    }
    if let Some(bad) = prompt_ids
        .iter()
        .find(|&&t| t as usize >= cfg.model.vocab_size)
    {
        return argument(format!(
            "prompt token {bad} is outside the model's vocabulary of {} (model.vocab_size)",
            cfg.model.vocab_size
        ));
    }
    let scorer = ModelScorer {
        model: &model,
        device: &device,
        max_len: cfg.model.max_seq_len,
        eos_id: dataset.eos_id(),
    };
    let generated_ids = if options.temperature == 0.0 {
        scorer.greedy(&prompt_ids, options.max_tokens)?
    } else {
        sampled(&scorer, &prompt_ids, options)?
    };
    Ok(Sample {
        checkpoint: checkpoint.to_path_buf(),
        stopped_at_eos: generated_ids.len() < options.max_tokens,
        text: codec.decode(&generated_ids)?,
        prompt_ids,
        generated_ids,
    })
}

/// Temperature and top-k sampling: softmax(logits / T) over the k likeliest tokens, drawn with
/// a generator seeded by `options.seed`.
fn sampled(
    scorer: &ModelScorer,
    prompt: &[u32],
    options: &SampleOptions,
) -> Result<Vec<u32>, TrainError> {
    let mut rng = SplitMix64::new(options.seed);
    let mut tokens = prompt.to_vec();
    let mut generated = Vec::with_capacity(options.max_tokens);
    for _ in 0..options.max_tokens {
        let start = tokens.len().saturating_sub(scorer.max_len);
        let input = candle_core::Tensor::from_slice(
            &tokens[start..],
            (1, tokens.len() - start),
            scorer.device,
        )?;
        let out = scorer
            .model
            .forward(&input, None, ForwardOptions::default())?;
        let logits = out.logits()?;
        let last: Vec<f64> = logits
            .squeeze(0)?
            .get(logits.dim(1)? - 1)?
            .to_dtype(DType::F64)?
            .to_vec1()?;
        let next = draw(&last, options.temperature, options.top_k, rng.uniform());
        if next == scorer.eos_id {
            break;
        }
        generated.push(next);
        tokens.push(next);
    }
    Ok(generated)
}

/// The token a uniform draw `u` in [0, 1) picks from softmax(`logits` / `temperature`) over the
/// `top_k` likeliest tokens (0 = all; ties keep the lower id first).
fn draw(logits: &[f64], temperature: f64, top_k: usize, u: f64) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if top_k > 0 {
        order.truncate(top_k);
    }
    let top = order.first().map_or(0.0, |&i| logits[i]);
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] - top) / temperature).exp())
        .collect();
    let mut target = u * weights.iter().sum::<f64>();
    for (&i, w) in order.iter().zip(&weights) {
        if target < *w {
            return i as u32;
        }
        target -= w;
    }
    order.last().copied().unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draw_follows_temperature_and_top_k() {
        let logits = [0.0, 3.0, 1.0, 2.9];
        // top-1 is greedy whatever the draw.
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(draw(&logits, 1.0, 1, u), 1);
        }
        // top-2 picks among tokens 1 and 3 only; a low draw gives the likeliest.
        assert_eq!(draw(&logits, 1.0, 2, 0.0), 1);
        assert_eq!(draw(&logits, 1.0, 2, 0.999), 3);
        // A tiny temperature is greedy; a huge one is near uniform (the last token for u ~ 1).
        assert_eq!(draw(&logits, 1e-6, 0, 0.999), 1);
        assert_eq!(draw(&logits, 1e6, 0, 0.999), 0);
    }
}
