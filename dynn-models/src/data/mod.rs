//! The datasets of the four bundled trainers, all generated in memory and deterministic given
//! a seed (only an optional text file is read from disk):
//!
//! - [`corpus`] and [`text`]: an English-like corpus, a byte-level BPE [`tokenizer`], and
//!   next-token batches for the MoE and early-exit language models;
//! - [`listops`]: nested list-operation trees for the Tree-LSTM;
//! - [`protein`]: MSAs and distograms of synthetic folded chains for the Evoformer-lite.
//!
//! `listops` and `protein` each have a `batch` function, so they are used through their
//! module paths (`data::listops::batch`, `data::protein::batch`).

pub mod corpus;
pub mod listops;
pub mod protein;
pub mod text;
pub mod tokenizer;

pub use corpus::{generated_corpus, load_corpus};
pub use listops::{ListOpsBatch, ListOpsConfig, Node, Tree};
pub use protein::{ProteinConfig, ProteinSample};
pub use text::{Split, TextDataset};
pub use tokenizer::BpeTokenizer;

#[cfg(test)]
mod report_tmp {
    use super::*;
    use crate::rng::Rng;
    #[test]
    #[ignore]
    fn report() {
        let cfg = ListOpsConfig::default();
        let mut rng = Rng::new(0);
        let b = listops::batch(&mut rng, &cfg, 10_000);
        let mut h = [0usize; 10];
        let mut dh = [0usize; 5];
        let mut nodes = 0;
        let mut maxn = 0;
        for (t, &l) in b.trees.iter().zip(&b.labels) {
            h[l as usize] += 1;
            dh[t.depth()] += 1;
            nodes += t.nodes.len();
            maxn = maxn.max(t.nodes.len());
        }
        println!(
            "listops labels {h:?} depths {dh:?} mean nodes {} max {maxn}",
            nodes as f64 / 1e4
        );
        println!("example {}", b.trees[0]);
        println!("example {}", b.trees[1]);
        let pc = ProteinConfig::default();
        let edges = protein::bin_edges(pc.len, pc.bins);
        println!("edges {edges:?}");
        let mut rng = Rng::new(1);
        let l = pc.len;
        let mut hist = vec![0usize; pc.bins];
        // per separation histogram
        let mut sep = vec![vec![0usize; pc.bins]; l];
        let mut samples = Vec::new();
        for _ in 0..2000 {
            let s = protein::sample(&mut rng, &pc);
            for i in 0..l {
                for j in 0..l {
                    let b = s.distogram[i * l + j] as usize;
                    hist[b] += 1;
                    sep[i.abs_diff(j)][b] += 1;
                }
            }
            samples.push(s);
        }
        let total: usize = hist.iter().sum();
        println!(
            "bins {hist:?} majority {:.3}",
            *hist.iter().max().unwrap() as f64 / total as f64
        );
        let correct: usize = sep.iter().map(|r| *r.iter().max().unwrap()).sum();
        println!("separation-only acc {:.3}", correct as f64 / total as f64);
        // off-diagonal only
        let offd: usize = sep[1..].iter().map(|r| r.iter().sum::<usize>()).sum();
        let offc: usize = sep[1..].iter().map(|r| *r.iter().max().unwrap()).sum();
        println!(
            "separation-only acc off-diag {:.3}",
            offc as f64 / offd as f64
        );
        // covariation oracle: pairs whose columns co-mutate (i != native and j != native in same rows)
        let d = pc.msa_depth;
        let mut cov = vec![vec![0usize; pc.bins]; 2];
        for s in &samples {
            for i in 0..l {
                for j in i + 3..l {
                    let mut both = 0;
                    let mut one = 0;
                    for r in 1..d {
                        let mi = s.msa[r * l + i] != s.msa[i] && s.msa[r * l + i] != 20;
                        let mj = s.msa[r * l + j] != s.msa[j] && s.msa[r * l + j] != 20;
                        if mi && mj {
                            both += 1
                        } else if mi || mj {
                            one += 1
                        }
                    }
                    let c = (both >= 1 && one == 0) as usize;
                    cov[c][s.distogram[i * l + j] as usize] += 1;
                }
            }
        }
        println!(
            "co-mutating pairs bins {:?}\nother pairs bins {:?}",
            cov[1], cov[0]
        );
        let text = generated_corpus(0, 400_000);
        println!("corpus head: {}", &text[..600]);
        let t0 = std::time::Instant::now();
        let ds = TextDataset::new(&text, 2048).unwrap();
        println!(
            "tokenizer 400KB vocab {} tokens {} train {} in {:?}",
            ds.vocab_size(),
            ds.train_tokens() + ds.valid_tokens(),
            ds.train_tokens(),
            t0.elapsed()
        );
    }
}
