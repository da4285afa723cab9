//! Seeds derived from content, not from scheduling: the same (run seed,
//! target, round, stage) gives the same seed on any worker of any cluster size.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// Derives a 64-bit seed from a base seed and labelled parts.
pub fn derive_seed(base: u64, parts: &[&str]) -> u64 {
    let mut h = Sha256::new();
    h.update(base.to_le_bytes());
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("sha256 has 32 bytes"))
}

/// `n` standard normal samples from a seeded generator (Box–Muller), the
/// initial noise of diffusion and the random init of tiny weights.
pub fn gaussian(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos()) as f32);
        out.push((r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_depend_on_every_part() {
        let a = derive_seed(1, &["t.jpg", "0"]);
        assert_eq!(a, derive_seed(1, &["t.jpg", "0"]));
        assert_ne!(a, derive_seed(2, &["t.jpg", "0"]));
        assert_ne!(a, derive_seed(1, &["t.jpg", "1"]));
        // length-prefixing keeps ("ab","c") and ("a","bc") apart
        assert_ne!(derive_seed(1, &["ab", "c"]), derive_seed(1, &["a", "bc"]));
    }

    #[test]
    fn gaussian_is_seeded_and_roughly_standard() {
        let x = gaussian(5, 20_000);
        assert_eq!(x, gaussian(5, 20_000));
        let mean = x.iter().sum::<f32>() / x.len() as f32;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / x.len() as f32;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }
}
