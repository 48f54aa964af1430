//! Server selection as pure functions over weights and live counters.

/// nginx's smooth weighted round robin unrolled once: weights 5,1,1 give `0 0 1 0 2 0 0`-like
/// interleaving instead of five 0s in a row. Indexed by an atomic counter, so picking takes no lock.
pub fn smooth_weighted_sequence(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut sequence = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += i64::from(w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        sequence.push(best);
    }
    sequence
}

/// The server with the fewest active leases per unit of weight. The scan starts at `start`
/// (a rotating counter) so that ties spread instead of piling onto the first server.
pub fn least_loaded(active: &[usize], weights: &[u32], start: usize) -> usize {
    let n = active.len();
    let mut best = start % n;
    for offset in 1..n {
        let i = (start + offset) % n;
        // active[i] / weights[i] < active[best] / weights[best], without division.
        if active[i] as u64 * u64::from(weights[best]) < active[best] as u64 * u64::from(weights[i])
        {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_sequence_interleaves_by_weight() {
        assert_eq!(smooth_weighted_sequence(&[1, 1, 1]), [0, 1, 2]);
        let seq = smooth_weighted_sequence(&[5, 1, 1]);
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
        let seq = smooth_weighted_sequence(&[3, 2]);
        assert_eq!(seq.iter().filter(|&&i| i == 0).count(), 3);
        assert_eq!(seq.iter().filter(|&&i| i == 1).count(), 2);
    }

    #[test]
    fn least_loaded_respects_weight_and_rotates_ties() {
        assert_eq!(least_loaded(&[3, 1, 2], &[1, 1, 1], 0), 1);
        // 4 active on weight 4 is lighter than 2 on weight 1.
        assert_eq!(least_loaded(&[4, 2], &[4, 1], 1), 0);
        let picks: Vec<usize> = (0..3)
            .map(|s| least_loaded(&[0, 0, 0], &[1, 1, 1], s))
            .collect();
        assert_eq!(picks, [0, 1, 2]);
    }
}
