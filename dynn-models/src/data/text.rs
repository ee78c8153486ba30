//! A tokenized text for next-token language modelling: random windows as batches.

use dynn_core::{Device, Error, Result, Tensor};

use super::tokenizer::BpeTokenizer;
use crate::rng::Rng;

/// Which part of a dataset to draw from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// The first 90% of the tokens.
    Train,
    /// The last 10% of the tokens.
    Valid,
}

/// A text encoded with its own BPE tokenizer, split 90/10 into train and validation tokens.
#[derive(Clone, Debug)]
pub struct TextDataset {
    tokenizer: BpeTokenizer,
    tokens: Vec<u32>,
    split_at: usize,
}

impl TextDataset {
    /// Trains a tokenizer of at most `vocab_size` tokens on `text`, encodes all of it and
    /// keeps the last 10% of the tokens for validation.
    pub fn new(text: &str, vocab_size: usize) -> Result<Self> {
        let tokenizer = BpeTokenizer::train(text, vocab_size)?;
        let tokens = tokenizer.encode(text)?;
        let split_at = tokens.len() - tokens.len() / 10;
        Ok(TextDataset {
            tokenizer,
            tokens,
            split_at,
        })
    }

    /// The tokenizer's vocabulary size (every token id is below it).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }

    /// The tokenizer (to decode samples).
    pub fn tokenizer(&self) -> &BpeTokenizer {
        &self.tokenizer
    }

    /// The number of training tokens.
    pub fn train_tokens(&self) -> usize {
        self.split_at
    }

    /// The number of validation tokens.
    pub fn valid_tokens(&self) -> usize {
        self.tokens.len() - self.split_at
    }

    /// The tokens of `split`.
    pub fn tokens(&self, split: Split) -> &[u32] {
        match split {
            Split::Train => &self.tokens[..self.split_at],
            Split::Valid => &self.tokens[self.split_at..],
        }
    }

    /// `batch` windows of `seq` tokens at random offsets in `split`: the inputs and the
    /// next-token targets (the same windows shifted by one), both `(batch, seq)` U32 on
    /// `device`. An error when `batch` or `seq` is zero or the split is shorter than `seq + 1`.
    pub fn batch(
        &self,
        rng: &mut Rng,
        batch: usize,
        seq: usize,
        split: Split,
        device: Device,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "TextDataset::batch";
        if batch == 0 || seq == 0 {
            return Err(Error::invalid(
                OP,
                format!("batch ({batch}) and seq ({seq}) must be positive"),
            ));
        }
        let toks = self.tokens(split);
        if toks.len() < seq + 1 {
            return Err(Error::invalid(
                OP,
                format!(
                    "the {split:?} split has {} tokens, fewer than seq + 1 = {}",
                    toks.len(),
                    seq + 1
                ),
            ));
        }
        let mut inputs = Vec::with_capacity(batch * seq);
        let mut targets = Vec::with_capacity(batch * seq);
        for _ in 0..batch {
            let start = rng.range(0, toks.len() - seq);
            inputs.extend_from_slice(&toks[start..start + seq]);
            targets.extend_from_slice(&toks[start + 1..start + seq + 1]);
        }
        Ok((
            Tensor::from_vec(inputs, (batch, seq), device)?,
            Tensor::from_vec(targets, (batch, seq), device)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::corpus::generated_corpus;
    use dynn_core::DType;

    #[test]
    fn batches_are_shifted_windows() {
        let ds = TextDataset::new(&generated_corpus(4, 20_000), 300).unwrap();
        assert_eq!(ds.vocab_size(), ds.tokenizer().vocab_size());
        assert!(ds.valid_tokens() * 9 <= ds.train_tokens() + 9);
        let mut rng = Rng::new(0);
        let (x, y) = ds
            .batch(&mut rng, 3, 16, Split::Train, Device::Cpu)
            .unwrap();
        assert_eq!(x.dims(), &[3, 16]);
        assert_eq!(y.dims(), &[3, 16]);
        assert_eq!(x.dtype(), DType::U32);
        let (x, y) = (x.to_vec::<u32>().unwrap(), y.to_vec::<u32>().unwrap());
        for r in 0..3 {
            assert_eq!(x[r * 16 + 1..(r + 1) * 16], y[r * 16..(r + 1) * 16 - 1]);
        }
        let (x2, _) = ds
            .batch(&mut Rng::new(0), 3, 16, Split::Train, Device::Cpu)
            .unwrap();
        assert_eq!(x, x2.to_vec::<u32>().unwrap());
        assert!(ds.batch(&mut rng, 2, 8, Split::Valid, Device::Cpu).is_ok());
        let too_long = ds.valid_tokens();
        assert!(
            ds.batch(&mut rng, 1, too_long, Split::Valid, Device::Cpu)
                .is_err()
        );
        assert!(ds.batch(&mut rng, 0, 4, Split::Train, Device::Cpu).is_err());
    }
}
