//! Deterministic randomness by step index, so a resumed run draws exactly what an uninterrupted
//! one would: libtorch's generator state cannot be read back through tch, so instead of saving it
//! every step reseeds from `(seed, step)`, and batches are picked from per-epoch permutations that
//! depend only on `(seed, epoch)`.

use crate::{Error, Result};

/// SplitMix64's finalizer: a cheap, well-mixed 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of step `step` of a run seeded with `seed` (different steps get unrelated seeds).
pub fn step_seed(seed: u64, step: u64) -> u64 {
    mix(mix(seed) ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// Seeds libtorch's global generators (CPU and CUDA) for step `step`; call it at the start of
/// every step, before anything draws random numbers. The generators are per process: two runs
/// training at once in one process (e.g. parallel tests) interleave their draws and lose
/// reproducibility.
pub fn seed_step(seed: u64, step: u64) {
    // libtorch takes the seed as a signed 64-bit value; the bits are what matter.
    tch::manual_seed(step_seed(seed, step) as i64);
}

/// A permutation of `0..len` that depends only on `(seed, epoch)` (Fisher-Yates over SplitMix64).
pub fn epoch_permutation(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..len).collect();
    let mut state = mix(seed ^ mix(epoch.wrapping_add(0x5851_F42D_4C95_7F2D)));
    for i in (1..len).rev() {
        state = mix(state);
        // Multiply-shift maps the 64-bit draw onto 0..=i without a modulo bias worth noticing.
        let j = ((state as u128 * (i as u128 + 1)) >> 64) as usize;
        perm.swap(i, j);
    }
    perm
}

/// The dataset indices of batch number `step`: the examples at positions `step * batch ..
/// (step + 1) * batch` of the endless sequence of epoch permutations, so every example is seen
/// once per epoch and the order depends only on `(seed, step)`.
pub fn batch_indices(len: usize, batch: usize, seed: u64, step: u64) -> Result<Vec<usize>> {
    if len == 0 || batch == 0 {
        return Err(Error::InvalidArgument(format!(
            "batches need a non-empty dataset and batch size (len {len}, batch {batch})"
        )));
    }
    let start = (step as u128) * (batch as u128);
    let mut out = Vec::with_capacity(batch);
    let mut cached: Option<(u128, Vec<usize>)> = None;
    for pos in start..start + batch as u128 {
        let epoch = pos / len as u128;
        if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            cached = Some((epoch, epoch_permutation(len, seed, epoch as u64)));
        }
        if let Some((_, perm)) = &cached {
            out.push(perm[(pos % len as u128) as usize]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_cover_everything_and_differ() {
        let p = epoch_permutation(100, 7, 0);
        let mut s = p.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_ne!(p, epoch_permutation(100, 7, 1));
        assert_ne!(p, epoch_permutation(100, 8, 0));
        assert_eq!(p, epoch_permutation(100, 7, 0));
    }

    #[test]
    fn batches_walk_through_epochs() {
        // 10 examples, batches of 4: steps 0..5 cover two epochs exactly.
        let all: Vec<usize> = (0..5).flat_map(|s| batch_indices(10, 4, 3, s).unwrap()).collect();
        let (mut e0, mut e1) = (all[..10].to_vec(), all[10..].to_vec());
        assert_eq!(e0, epoch_permutation(10, 3, 0));
        e0.sort();
        e1.sort();
        assert_eq!(e0, (0..10).collect::<Vec<_>>());
        assert_eq!(e1, (0..10).collect::<Vec<_>>());
        assert!(batch_indices(0, 4, 3, 0).is_err());
        assert_ne!(step_seed(1, 0), step_seed(1, 1));
    }
}
