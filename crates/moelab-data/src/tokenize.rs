//! Tokenizers for `prepare`: loading a Hugging Face tokenizer.json, training a byte-level BPE,
//! and encoding documents of any length in bounded memory (in whitespace-aligned pieces).

use rayon::prelude::*;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::manifest::EOS_TOKEN;

/// Longest text handed to the tokenizer in one call. The Hugging Face tokenizer keeps about
/// 100-200 bytes of bookkeeping per input byte while it works on a text (a 50 MB document
/// encoded whole peaked at 6.6 GB), and each worker thread holds one piece; documents up to
/// this size are encoded whole, longer ones in pieces of about this size with the same ids.
pub const PIECE_BYTES: usize = 64 << 10;

/// The ids of one document, encoded piece by piece (pieces in parallel), `eos_id` appended.
pub(crate) fn encode_document(
    tokenizer: &Tokenizer,
    text: &str,
    eos_id: u32,
) -> std::result::Result<Vec<u32>, String> {
    let encode = |piece: &&str| {
        tokenizer
            .encode_fast(*piece, false)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|e| e.to_string())
    };
    let pieces: Vec<&str> = text_pieces(text, PIECE_BYTES).collect();
    let mut ids = match pieces.as_slice() {
        [] => Vec::new(),
        [whole] => encode(whole)?,
        _ => {
            let parts = pieces
                .par_iter()
                .map(encode)
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let mut ids = Vec::with_capacity(parts.iter().map(Vec::len).sum::<usize>() + 1);
            for p in parts {
                ids.extend_from_slice(&p);
            }
            ids
        }
    };
    ids.push(eos_id);
    Ok(ids)
}

/// Cuts `text` into pieces of at most `max` bytes (one piece when it fits).
///
/// A cut goes just before a whitespace run that follows a non-whitespace character, as late as
/// possible (a space preferred over other whitespace within the last half). GPT-2 style
/// pre-tokenizers (byte-level BPE, ours included) never join text across such a point, so the
/// ids are the same as for the whole text; a space rather than a newline keeps that true for
/// tokenizers that add a prefix space to each input. Only text with no whitespace at all in a
/// window (no such point exists) is cut at a character boundary, which can split one word.
pub(crate) fn text_pieces(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let max = max.max(8);
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() <= max {
            return Some(std::mem::take(&mut rest));
        }
        let cut = piece_end(rest, max);
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

/// Where the first piece of `text` (longer than `max`) ends; see [`text_pieces`].
fn piece_end(text: &str, max: usize) -> usize {
    let bytes = text.as_bytes();
    let mut whitespace = None;
    for p in (1..=max).rev() {
        // ASCII whitespace bytes are always character boundaries.
        if bytes[p].is_ascii_whitespace()
            && text[..p]
                .chars()
                .next_back()
                .is_some_and(|c| !c.is_whitespace())
        {
            if bytes[p] == b' ' {
                return p;
            }
            whitespace.get_or_insert(p);
        }
        // A space is worth a shorter piece, but not one below half the size.
        if p <= max / 2 {
            if let Some(p) = whitespace {
                return p;
            }
        }
    }
    whitespace.unwrap_or_else(|| {
        let mut p = max;
        while !text.is_char_boundary(p) {
            p -= 1;
        }
        p
    })
}

/// A GPT-2 style byte-level BPE with `<|endoftext|>` as its only special token, trained on
/// `texts` (streamed: the trainer keeps word counts, not the texts).
pub fn train_bpe<I, S>(vocab_size: usize, texts: I) -> std::result::Result<Tokenizer, String>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.with_post_processor(Some(ByteLevel::new(false, false, true)));
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| format!("training failed: {e}"))?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use moelab_io::rng::mix64;

    /// Text with the whitespace a cut must respect: runs of spaces, newlines, tabs, CRLF,
    /// non-ASCII letters and whitespace, punctuation and digits.
    fn awkward_text(words: usize) -> String {
        let parts = [
            "the",
            " ",
            "river",
            "  ",
            "stone",
            "\n",
            "\n\n",
            "x=1;",
            "\t",
            "déjà",
            "\u{3000}",
            "vu",
            "\r\n",
            "42",
            "   ",
            "(proof)",
            " ",
            "ünïcode",
            "\n ",
            "end.",
        ];
        let mut s = String::new();
        let mut state = 7u64;
        for _ in 0..words {
            state = mix64(state);
            s.push_str(parts[(state % parts.len() as u64) as usize]);
        }
        s
    }

    #[test]
    fn pieces_cover_the_text_within_the_size() {
        let text = awkward_text(3000);
        for max in [8, 50, 64, 200, 1000] {
            let pieces: Vec<&str> = text_pieces(&text, max).collect();
            assert_eq!(pieces.concat(), text, "max {max}");
            assert!(pieces.iter().all(|p| p.len() <= max && !p.is_empty()));
        }
        assert_eq!(text_pieces("short", 64).collect::<Vec<_>>(), ["short"]);
        assert_eq!(text_pieces("", 64).count(), 0);
        // No whitespace at all: cut at character boundaries.
        let dense = "é".repeat(100);
        let pieces: Vec<&str> = text_pieces(&dense, 11).collect();
        assert_eq!(pieces.concat(), dense);
        assert!(pieces.iter().all(|p| p.len() <= 11));
    }

    #[test]
    fn pieces_give_the_same_ids_as_the_whole_text() {
        let train = awkward_text(4000);
        let mut tokenizer = train_bpe(400, [train.as_str()].into_iter()).unwrap();
        let text = awkward_text(20_000);
        let whole = |t: &Tokenizer| {
            t.encode_fast(text.as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec()
        };
        let pieced = |t: &Tokenizer, max: usize| -> Vec<u32> {
            text_pieces(&text, max)
                .flat_map(|p| t.encode_fast(p, false).unwrap().get_ids().to_vec())
                .collect()
        };
        let expected = whole(&tokenizer);
        assert!(expected.len() > 1000);
        // (At 300 bytes and more no run of non-whitespace in this text fills a window.)
        for max in [300, 4096] {
            let got = pieced(&tokenizer, max);
            let first = (0..expected.len().min(got.len())).find(|&i| expected[i] != got[i]);
            assert_eq!(first, None, "max {max}: ids differ");
            assert_eq!(got.len(), expected.len(), "max {max}");
        }
        // A byte-level tokenizer that adds a prefix space to every input (GPT-2 style
        // configurations): pieces start with a space where one is available.
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(true, true, true)));
        let expected = whole(&tokenizer);
        let got = pieced(&tokenizer, 4096);
        let differing = expected.iter().zip(&got).filter(|(a, b)| a != b).count()
            + expected.len().abs_diff(got.len());
        assert_eq!(differing, 0);
        // The trainer sees the same words in pieces as whole.
        let whole_bpe = train_bpe(400, [text.as_str()].into_iter()).unwrap();
        let pieces: Vec<&str> = text_pieces(&text, 300).collect();
        let pieced_bpe = train_bpe(400, pieces.into_iter()).unwrap();
        assert_eq!(
            whole_bpe.to_string(false).unwrap(),
            pieced_bpe.to_string(false).unwrap()
        );
    }
}
