//! Which layers stay resident within a memory budget, and which are streamed.

/// The residency decision for a model's layers: a layer is either *pinned* (made resident once
/// and kept) or *streamed* (read in ahead of its use through the prefetch window, released after).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidencyPlan {
    pinned: Vec<bool>,
    depth: usize,
    window_bytes: u64,
    budget: u64,
    fits: bool,
}

impl ResidencyPlan {
    /// Plans layers of `layer_bytes` for a `budget` of bytes with a prefetch window of `depth`
    /// layers. Everything is pinned when the layers fit the budget. Otherwise room is kept for
    /// the streaming window (the layer in use plus `depth` ahead, at the largest layer's size)
    /// and as many layers as fit the rest are pinned, spread evenly through the model so that
    /// their compute overlaps the streamed layers' reads.
    pub fn new(layer_bytes: &[u64], budget: u64, depth: usize) -> Self {
        let n = layer_bytes.len();
        let total: u64 = layer_bytes.iter().sum();
        if total <= budget {
            return Self { pinned: vec![true; n], depth, window_bytes: 0, budget, fits: true };
        }
        let largest = layer_bytes.iter().copied().max().unwrap_or(0);
        let window_bytes = largest * (depth as u64 + 1).min(n as u64);
        let room = budget.saturating_sub(window_bytes);
        let pinned = (0..n)
            .rev()
            .map(|k| spread(n, k))
            .find(|set| layer_bytes.iter().zip(set).filter(|(_, p)| **p).map(|(b, _)| b).sum::<u64>() <= room)
            .unwrap_or_else(|| vec![false; n]);
        Self { pinned, depth, window_bytes, budget, fits: window_bytes <= budget }
    }

    /// A plan that keeps all `layers` resident.
    pub fn all_resident(layers: usize) -> Self {
        Self { pinned: vec![true; layers], depth: 0, window_bytes: 0, budget: u64::MAX, fits: true }
    }

    /// Number of layers planned.
    pub fn layers(&self) -> usize {
        self.pinned.len()
    }

    /// Whether `layer` stays resident.
    pub fn is_pinned(&self, layer: usize) -> bool {
        self.pinned[layer]
    }

    /// The streamed layers, in model order.
    pub fn streamed(&self) -> impl Iterator<Item = usize> + '_ {
        self.pinned.iter().enumerate().filter(|(_, p)| !**p).map(|(i, _)| i)
    }

    /// How many layers stay resident.
    pub fn pinned_count(&self) -> usize {
        self.pinned.iter().filter(|p| **p).count()
    }

    /// How many layers are streamed.
    pub fn streamed_count(&self) -> usize {
        self.layers() - self.pinned_count()
    }

    /// Streamed layers read ahead of the one in use.
    pub fn depth(&self) -> usize {
        self.depth.min(self.streamed_count().saturating_sub(1))
    }

    /// Bytes the streaming window may hold at once (0 when nothing is streamed).
    pub fn window_bytes(&self) -> u64 {
        self.window_bytes
    }

    /// The bytes planned for: the budget the layers were given.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// False when even the streaming window alone exceeds the budget (the model still runs, with
    /// the window's memory).
    pub fn fits_budget(&self) -> bool {
        self.fits
    }
}

/// `k` of `n` positions, spread evenly (position i is chosen when ⌊(i+1)k/n⌋ steps up).
fn spread(n: usize, k: usize) -> Vec<bool> {
    (0..n).map(|i| (i + 1) * k / n > i * k / n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_within_the_budget_is_all_resident() {
        let plan = ResidencyPlan::new(&[100; 8], 800, 2);
        assert_eq!(plan.pinned_count(), 8);
        assert_eq!(plan.streamed().count(), 0);
        assert_eq!(plan.window_bytes(), 0);
        assert!(plan.fits_budget());
    }

    #[test]
    fn a_tiny_budget_streams_every_layer() {
        let plan = ResidencyPlan::new(&[100; 8], 300, 2);
        assert_eq!(plan.pinned_count(), 0);
        assert_eq!(plan.streamed().collect::<Vec<_>>(), (0..8).collect::<Vec<_>>());
        assert_eq!(plan.window_bytes(), 300);
        assert!(plan.fits_budget());
        assert_eq!(plan.depth(), 2);
    }

    #[test]
    fn the_rest_of_the_budget_pins_layers_spread_through_the_model() {
        // Window: 3 × 100; the other 450 bytes pin 4 layers, every other one.
        let plan = ResidencyPlan::new(&[100; 8], 750, 2);
        assert_eq!(plan.pinned_count(), 4);
        assert_eq!(plan.streamed().collect::<Vec<_>>(), vec![0, 2, 4, 6]);
        let pinned_bytes = 100 * plan.pinned_count() as u64;
        assert!(pinned_bytes + plan.window_bytes() <= 750);
    }

    #[test]
    fn uneven_layers_are_counted_by_their_sizes() {
        let sizes = [50, 400, 50, 50, 50, 50, 50, 50];
        // Window 1 × 400; the 300 bytes left cannot hold the large layer.
        let plan = ResidencyPlan::new(&sizes, 700, 0);
        let pinned: u64 = (0..8).filter(|&i| plan.is_pinned(i)).map(|i| sizes[i]).sum();
        assert!(pinned <= 300 && plan.pinned_count() > 0, "{plan:?}");
        assert!(!plan.is_pinned(1));
    }

    #[test]
    fn a_budget_below_the_window_is_reported() {
        let plan = ResidencyPlan::new(&[100; 4], 150, 2);
        assert!(!plan.fits_budget());
        assert_eq!(plan.streamed_count(), 4);
    }

    #[test]
    fn depth_is_bounded_by_the_streamed_layers() {
        assert_eq!(ResidencyPlan::new(&[100; 2], 100, 4).depth(), 1);
        assert_eq!(ResidencyPlan::all_resident(3).depth(), 0);
    }
}
