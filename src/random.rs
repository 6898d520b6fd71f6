//! Seeded random draws shared by weight initialisation (`model::init`) and LoRA (`lora`),
//! kept here so that neither module imports the other for them.
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Standard normal draws by Box–Muller (no extra dependency, stable across rand versions).
pub fn normal_vec(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
            let u2: f32 = rng.random();
            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect()
}

/// Uniform draws in [-bound, bound).
pub fn uniform_vec(rng: &mut ChaCha8Rng, n: usize, bound: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
        .collect()
}
