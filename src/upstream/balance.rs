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

/// Among the `n` servers `load` offers (active leases, weight), the one with the fewest active
/// leases per unit of weight; `None` when it offers none. The scan starts at `start` (a
/// rotating counter) so that ties spread instead of piling onto the first server.
pub fn least_loaded(
    n: usize,
    start: usize,
    load: impl Fn(usize) -> Option<(usize, u32)>,
) -> Option<usize> {
    let mut best: Option<(usize, (usize, u32))> = None;
    for offset in 0..n {
        let i = (start + offset) % n;
        let Some((active, weight)) = load(i) else {
            continue;
        };
        // active / weight < best_active / best_weight, without division.
        let lighter = best.is_none_or(|(_, (best_active, best_weight))| {
            active as u64 * u64::from(best_weight) < best_active as u64 * u64::from(weight)
        });
        if lighter {
            best = Some((i, (active, weight)));
        }
    }
    best.map(|(i, _)| i)
}

/// A 64-bit hash that is the same in every build and on every machine (FNV-1a, then a
/// finalizer to spread FNV's weak low bits): instances choose alike only if they hash alike,
/// which std's `DefaultHasher` does not promise across Rust releases.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(hash)
}

/// murmur3's fmix64: every input bit affects every output bit.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// Weighted rendezvous hashing (HRW): the server with the highest score owns the key. A
/// score depends only on the key and that server, so removing one of N servers moves only its
/// own keys (about 1/N) and adding one takes about 1/(N+1) from the others; no ring to build
/// or keep in step. `-w / ln(u)`, with `u` uniform in (0, 1), gives each server a share of keys
/// proportional to its weight (Schindelhauer and Schomaker, "Weighted distributed hash tables").
pub fn rendezvous_score(key: u64, server: u64, weight: u32) -> f64 {
    let h = mix(key ^ mix(server));
    // 53 random bits, centred in their interval so that u is never 0 or 1.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(weight) / -u.ln()
}

/// Server indices from the key's owner down: where a key goes while servers before it in this
/// order are down.
pub fn rendezvous_order(key: u64, servers: &[(u64, u32)]) -> Vec<usize> {
    let mut scored: Vec<(f64, usize)> = servers
        .iter()
        .enumerate()
        .map(|(i, &(server, weight))| (rendezvous_score(key, server, weight), i))
        .collect();
    // Highest first; equal scores (practically never) by index, so the order is total.
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, i)| i).collect()
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

    fn loads<'a>(
        active: &'a [usize],
        weights: &'a [u32],
    ) -> impl Fn(usize) -> Option<(usize, u32)> + 'a {
        |i| Some((active[i], weights[i]))
    }

    #[test]
    fn least_loaded_respects_weight_and_rotates_ties() {
        assert_eq!(least_loaded(3, 0, loads(&[3, 1, 2], &[1, 1, 1])), Some(1));
        // 4 active on weight 4 is lighter than 2 on weight 1.
        assert_eq!(least_loaded(2, 1, loads(&[4, 2], &[4, 1])), Some(0));
        let picks: Vec<Option<usize>> = (0..3)
            .map(|s| least_loaded(3, s, loads(&[0, 0, 0], &[1, 1, 1])))
            .collect();
        assert_eq!(picks, [Some(0), Some(1), Some(2)]);
    }

    #[test]
    fn least_loaded_skips_what_is_not_offered() {
        let active = [0, 5, 9];
        let only_busy = |i: usize| (i != 0).then_some((active[i], 1));
        assert_eq!(least_loaded(3, 0, only_busy), Some(1));
        assert_eq!(least_loaded(3, 0, |_| None), None);
    }

    fn servers(names: &[&str], weights: &[u32]) -> Vec<(u64, u32)> {
        names
            .iter()
            .zip(weights)
            .map(|(name, &w)| (stable_hash(name.as_bytes()), w))
            .collect()
    }

    fn owner(key: u64, servers: &[(u64, u32)]) -> usize {
        rendezvous_order(key, servers)[0]
    }

    #[test]
    fn the_hash_is_fixed_across_builds() {
        // Pinned values (from an independent Python FNV-1a + fmix64): a change here would make
        // instances of two versions disagree.
        assert_eq!(stable_hash(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(stable_hash(b"127.0.0.1:9001"), 0x33ac_4f5a_f5b0_6ee4);
    }

    #[test]
    fn two_independently_built_server_lists_choose_alike_for_10_000_keys() {
        let names = [
            "10.0.0.1:80",
            "10.0.0.2:80",
            "10.0.0.3:80",
            "b.internal:8080",
        ];
        let first = servers(&names, &[1, 2, 1, 1]);
        let owned: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let second: Vec<(u64, u32)> = owned
            .iter()
            .zip([1, 2, 1, 1])
            .map(|(name, w)| (stable_hash(name.as_bytes()), w))
            .collect();
        for k in 0..10_000u32 {
            let key = stable_hash(format!("user-{k}").as_bytes());
            assert_eq!(
                rendezvous_order(key, &first),
                rendezvous_order(key, &second)
            );
        }
    }

    #[test]
    fn removing_one_of_five_servers_moves_only_its_keys() {
        let names = ["s1:1", "s2:1", "s3:1", "s4:1", "s5:1"];
        let five = servers(&names, &[1; 5]);
        let four = servers(&names[..4], &[1; 4]);
        let mut moved = 0;
        for k in 0..1_000u32 {
            let key = stable_hash(&k.to_be_bytes());
            let before = owner(key, &five);
            let after = owner(key, &four);
            if before != 4 {
                assert_eq!(before, after, "key {k} moved off a server that stayed");
            }
            moved += usize::from(before != after);
        }
        // Expected 1/5 of the keys; the bound is 1.3/N.
        assert!(moved <= 1_300 / 5, "{moved} of 1000 keys moved");
        assert!(
            moved >= 100,
            "{moved}: the removed server owned too few keys"
        );
    }

    #[test]
    fn keys_follow_the_weights_within_5_percent() {
        let weights = [1, 2, 3, 4];
        let list = servers(&["a:1", "b:1", "c:1", "d:1"], &weights);
        let mut owned = [0u32; 4];
        for k in 0..100_000u32 {
            owned[owner(stable_hash(&k.to_le_bytes()), &list)] += 1;
        }
        let total: u32 = weights.iter().sum();
        for (i, &w) in weights.iter().enumerate() {
            let expected = 100_000.0 * f64::from(w) / f64::from(total);
            let off = (f64::from(owned[i]) - expected).abs() / expected;
            assert!(
                off < 0.05,
                "server {i} (weight {w}) owns {} keys, expected {expected}",
                owned[i]
            );
        }
    }

    #[test]
    fn the_order_lists_every_server_once_owner_first() {
        let list = servers(&["a:1", "b:1", "c:1"], &[1, 1, 1]);
        let key = stable_hash(b"room-7");
        let mut order = rendezvous_order(key, &list);
        assert_eq!(order[0], owner(key, &list));
        order.sort();
        assert_eq!(order, [0, 1, 2]);
    }
}
