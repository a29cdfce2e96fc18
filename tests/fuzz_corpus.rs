//! Every fuzz target on its committed corpus (`fuzz/corpus/<target>/`: seeds and
//! every input a fuzzer found interesting or crashing), then a short, bounded,
//! deterministic mutation run from those inputs. Longer runs use cargo-fuzz (see
//! README, "Fuzzing"); whatever they find is added to the corpus, so it is
//! replayed here on every test run.

mod common;

use std::path::PathBuf;

use common::Rng;

use nxknock::fuzzing::TARGETS;

/// Mutated inputs per target and test run.
const MUTATIONS: usize = 3000;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.remove(i);
            }
            4 => v.truncate(rng.below(v.len() + 1)),
            _ if !other.is_empty() => {
                // Splice in a piece of another input.
                let (a, b) = (rng.below(other.len()), rng.below(other.len()));
                let (a, b) = (a.min(b), a.max(b));
                let at = rng.below(v.len() + 1);
                v.splice(at..at, other[a..b].iter().copied());
            }
            _ => {}
        }
    }
    v
}

#[test]
fn every_target_survives_its_corpus_and_mutations_of_it() {
    for (name, target) in TARGETS {
        let inputs = corpus(name);
        assert!(!inputs.is_empty(), "fuzz/corpus/{name} has inputs");
        for input in &inputs {
            target(input);
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        for _ in 0..MUTATIONS {
            let a = &inputs[rng.below(inputs.len())];
            let b = &inputs[rng.below(inputs.len())];
            target(&mutate(&mut rng, a, b));
        }
        println!("{name}: {} corpus inputs, {MUTATIONS} mutations", inputs.len());
    }
}
