//! Turning logits into the next token: penalties, truncation (top-k, top-p, min-p), temperature
//! and a seedable random draw; greedy when the temperature is zero.
//!
//! ```
//! use air_sampling::{Sampler, SamplingParams};
//! let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
//! assert_eq!(sampler.sample(&[0.1, 2.0, -1.0], &[]), 1);
//! ```

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings; the defaults are llama.cpp's.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = off).
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0 = off).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recently seen tokens (1 = off).
    pub repeat_penalty: f32,
    /// Subtract `count * frequency_penalty` from the logits of seen tokens (0 = off).
    pub frequency_penalty: f32,
    /// Subtract `presence_penalty` from the logits of seen tokens (0 = off).
    pub presence_penalty: f32,
    /// How many of the most recent tokens the penalties look at.
    pub penalty_last_n: usize,
    /// Seed of the random draw; None draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Whether any penalty changes the logits.
    fn has_penalties(&self) -> bool {
        self.repeat_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }

    /// Always the most likely token, no penalties.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }
}

/// A settings value out of its range.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid sampling parameter {name} = {value}: {expected}")]
pub struct InvalidParam {
    pub name: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl SamplingParams {
    /// Checks every value is in range.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        let check = |ok: bool, name, value: f32, expected| {
            if ok { Ok(()) } else { Err(InvalidParam { name, value: value.to_string(), expected }) }
        };
        let t = self.temperature;
        check(t.is_finite() && t >= 0.0, "temperature", t, "a number >= 0")?;
        check((0.0..=1.0).contains(&self.top_p) && self.top_p > 0.0, "top_p", self.top_p, "in (0, 1]")?;
        check((0.0..=1.0).contains(&self.min_p), "min_p", self.min_p, "in [0, 1]")?;
        let r = self.repeat_penalty;
        check(r.is_finite() && r > 0.0, "repeat_penalty", r, "a number > 0")?;
        check(self.frequency_penalty.is_finite(), "frequency_penalty", self.frequency_penalty, "a finite number")?;
        check(self.presence_penalty.is_finite(), "presence_penalty", self.presence_penalty, "a finite number")?;
        Ok(())
    }
}

/// Picks tokens from logits according to [`SamplingParams`].
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler; fails if a parameter is out of range.
    pub fn new(params: SamplingParams) -> Result<Self, InvalidParam> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Self { params, rng, candidates: Vec::new() })
    }

    /// The settings.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from `logits`, given the tokens so far (`history`, for penalties).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 && !p.has_penalties() {
            // Greedy without penalties: the first maximum, without building candidates.
            return first_max(logits);
        }
        self.candidates.clear();
        self.candidates.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        apply_penalties(&mut self.candidates, history, p);
        if p.temperature <= 0.0 {
            return argmax(&self.candidates);
        }
        let c = &mut self.candidates;
        c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < c.len() {
            c.truncate(p.top_k);
        }
        // Probabilities at temperature 1 for top-p and min-p (as llama.cpp orders them).
        let probs = softmax(c.iter().map(|x| x.1), 1.0);
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            let keep = probs.iter().position(|&q| {
                mass += q;
                mass >= p.top_p
            });
            c.truncate(keep.map_or(c.len(), |i| i + 1));
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            let keep = probs.iter().take(c.len()).take_while(|&&q| q >= floor).count().max(1);
            c.truncate(keep);
        }
        let weights = softmax(c.iter().map(|x| x.1), p.temperature);
        let mut r: f32 = self.rng.random();
        for (cand, w) in c.iter().zip(&weights) {
            if r < *w {
                return cand.0;
            }
            r -= w;
        }
        c.last().map_or(0, |x| x.0)
    }
}

/// Index of the first greatest value (NaNs never win; 0 when none beats -∞). The maximum
/// first, over 16 independent lanes (a single running maximum is a chain of dependent
/// compares), then its first position: the same index as one pass keeping the first strict
/// improvement.
fn first_max(logits: &[f32]) -> u32 {
    const LANES: usize = 16;
    let greater = |m: f32, x: f32| if x > m { x } else { m };
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = greater(*m, x);
        }
    }
    let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &x| greater(m, x));
    if max == f32::NEG_INFINITY {
        return 0;
    }
    logits.iter().position(|&x| x == max).unwrap_or(0) as u32
}

fn argmax(c: &[(u32, f32)]) -> u32 {
    c.iter().fold((0u32, f32::NEG_INFINITY), |best, &x| if x.1 > best.1 { x } else { best }).0
}

fn softmax(logits: impl Iterator<Item = f32> + Clone, temperature: f32) -> Vec<f32> {
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.map(|l| ((l - max) / temperature).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

fn apply_penalties(c: &mut [(u32, f32)], history: &[u32], p: &SamplingParams) {
    if !p.has_penalties() {
        return;
    }
    let recent = &history[history.len().saturating_sub(p.penalty_last_n)..];
    let mut counts = std::collections::HashMap::<u32, u32>::new();
    for &t in recent {
        *counts.entry(t).or_default() += 1;
    }
    for (&token, &count) in &counts {
        let Some(entry) = c.get_mut(token as usize) else { continue };
        let l = &mut entry.1;
        *l = if *l > 0.0 { *l / p.repeat_penalty } else { *l * p.repeat_penalty };
        *l -= count as f32 * p.frequency_penalty + p.presence_penalty;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).unwrap()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let one_pass = |l: &[f32]| {
            l.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32
        };
        let mut seed = 3u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            ((seed >> 20) % 7) as f32 - 3.0
        };
        for len in [1, 15, 16, 17, 100, 49152] {
            let logits: Vec<f32> = (0..len).map(|_| next()).collect();
            assert_eq!(first_max(&logits), one_pass(&logits), "{len} logits");
        }
        let special = [f32::NAN, -0.0, f32::NEG_INFINITY, 0.0, f32::NAN];
        assert_eq!(first_max(&special), one_pass(&special));
        assert_eq!(first_max(&[f32::NAN, f32::NEG_INFINITY]), 0);
        assert_eq!(first_max(&[]), 0);
    }

    #[test]
    fn greedy_takes_the_maximum() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&[1.0, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn repeat_penalty_changes_the_choice() {
        let params = SamplingParams { repeat_penalty: 2.0, ..SamplingParams::greedy() };
        let mut s = sampler(params);
        assert_eq!(s.sample(&[1.0, 3.0, 2.0], &[1]), 2);
        let params = SamplingParams { presence_penalty: 5.0, ..SamplingParams::greedy() };
        assert_eq!(sampler(params).sample(&[-1.0, 3.0, -2.0], &[1]), 0);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_the_distribution() {
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        let params =
            SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(7), ..Default::default() };
        let draw = |n| {
            let mut s = sampler(params.clone());
            (0..n).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(50), draw(50));
        let many = draw(4000);
        let freq3 = many.iter().filter(|&&t| t == 3).count() as f32 / 4000.0;
        let expected = 3f32.exp() / (0f32.exp() + 1f32.exp() + 2f32.exp() + 3f32.exp());
        assert!((freq3 - expected).abs() < 0.03, "{freq3} vs {expected}");
    }

    #[test]
    fn truncation_limits_the_choices() {
        let logits = [5.0f32, 4.9, 0.0, -1.0];
        for params in [
            SamplingParams { temperature: 1.0, top_k: 2, top_p: 1.0, min_p: 0.0, seed: Some(1), ..Default::default() },
            SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.9, min_p: 0.0, seed: Some(1), ..Default::default() },
            SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.5, seed: Some(1), ..Default::default() },
        ] {
            let mut s = sampler(params);
            assert!((0..200).all(|_| s.sample(&logits, &[]) < 2));
        }
    }

    #[test]
    fn invalid_values_are_rejected() {
        let bad = SamplingParams { temperature: -1.0, ..Default::default() };
        assert_eq!(Sampler::new(bad).err().unwrap().name, "temperature");
        let bad = SamplingParams { top_p: 0.0, ..Default::default() };
        assert_eq!(Sampler::new(bad).err().unwrap().name, "top_p");
    }
}
