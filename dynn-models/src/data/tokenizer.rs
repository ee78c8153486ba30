//! A byte-level BPE tokenizer (GPT-2 style), trained in memory with Hugging Face's
//! `tokenizers` crate.

use dynn_core::{Error, Result};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{NormalizerWrapper, PostProcessorWrapper, TokenizerBuilder, TokenizerImpl};

// The dataset built on this tokenizer lives in `text`; also reachable from here.
pub use super::text::{Split, TextDataset};

/// The concrete tokenizer: BPE model, no normalizer, byte-level pre-tokenizer and decoder.
type Inner = TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, PostProcessorWrapper, ByteLevel>;

/// The byte alphabet every byte-level vocabulary starts from.
const BYTE_ALPHABET: usize = 256;

/// A byte-level BPE tokenizer: any UTF-8 text encodes (no unknown token) and
/// `decode(encode(s)) == s`. Training is deterministic given the text.
#[derive(Clone)]
pub struct BpeTokenizer {
    inner: Inner,
}

impl std::fmt::Debug for BpeTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpeTokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

fn tk_err(what: &str, e: tokenizers::Error) -> Error {
    Error::Msg(format!("BpeTokenizer::{what}: {e}"))
}

impl BpeTokenizer {
    /// Trains a byte-level BPE on `text` with at most `vocab_size` tokens (the 256 byte
    /// tokens plus merges seen at least twice; fewer when the text runs out of merges).
    pub fn train(text: &str, vocab_size: usize) -> Result<Self> {
        if vocab_size < BYTE_ALPHABET {
            return Err(Error::invalid(
                "BpeTokenizer::train",
                format!("vocab_size {vocab_size} is below the byte alphabet ({BYTE_ALPHABET})"),
            ));
        }
        if text.is_empty() {
            return Err(Error::invalid("BpeTokenizer::train", "empty text"));
        }
        let byte_level = ByteLevel::default().add_prefix_space(false);
        let mut inner: Inner = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_pre_tokenizer(Some(byte_level))
            .with_decoder(Some(byte_level))
            .build()
            .map_err(|e| tk_err("train", e))?;
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        inner
            .train(&mut trainer, text.split_inclusive('\n'))
            .map_err(|e| tk_err("train", e))?;
        Ok(BpeTokenizer { inner })
    }

    /// The number of token ids (every id this tokenizer produces is below it).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| tk_err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`; an error on an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let n = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= n) {
            return Err(Error::IndexOutOfRange {
                op: "BpeTokenizer::decode",
                index: bad as i64,
                size: n,
                context: " (token id)".into(),
            });
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| tk_err("decode", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::corpus::generated_corpus;

    #[test]
    fn round_trip_and_vocab() {
        let text = generated_corpus(1, 30_000);
        let tok = BpeTokenizer::train(&text, 400).unwrap();
        assert!(
            tok.vocab_size() <= 400 && tok.vocab_size() > 300,
            "{}",
            tok.vocab_size()
        );
        let ids = tok.encode(&text).unwrap();
        assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
        assert!(ids.len() < text.len() / 2, "BPE should compress");
        assert_eq!(tok.decode(&ids).unwrap(), text);
        for s in [
            "",
            " a  b\n\nc ",
            "Zürich ∑ 🦀 \t!",
            "unseen-words: xylophone",
        ] {
            assert_eq!(tok.decode(&tok.encode(s).unwrap()).unwrap(), s);
        }
    }

    #[test]
    fn deterministic() {
        let text = generated_corpus(2, 10_000);
        let a = BpeTokenizer::train(&text, 320).unwrap();
        let b = BpeTokenizer::train(&text, 320).unwrap();
        assert_eq!(a.encode(&text).unwrap(), b.encode(&text).unwrap());
    }

    #[test]
    fn bad_input() {
        assert!(BpeTokenizer::train("abc", 100).is_err());
        assert!(BpeTokenizer::train("", 300).is_err());
        let tok = BpeTokenizer::train("hello hello", 260).unwrap();
        assert!(tok.decode(&[tok.vocab_size() as u32]).is_err());
    }
}
