use super::*;

fn backend(last: u8, weight: u32) -> Backend {
    Backend {
        addr: SocketAddr::from(([10, 0, 0, last], 80)),
        weight,
        info: Default::default(),
    }
}

#[test]
fn find_looks_in_every_weight_class() {
    let s = Selection::new(vec![
        backend(9, 1),
        backend(3, 5),
        backend(7, 1),
        backend(1, 5),
        backend(5, 2),
    ]);
    for (last, weight) in [(1, 5), (3, 5), (5, 2), (7, 1), (9, 1)] {
        let addr = SocketAddr::from(([10, 0, 0, last], 80));
        assert_eq!(s.find(&addr).map(|b| b.weight), Some(weight), "{addr}");
    }
    assert!(s.find(&SocketAddr::from(([10, 0, 0, 4], 80))).is_none());
    assert!(Selection::default()
        .find(&SocketAddr::from(([10, 0, 0, 1], 80)))
        .is_none());
}

/// A retry must reach another backend even when the rotation would give the refused one
/// again and again (found by tests/semantics.rs: weights 100:1, the heavy Pod dead, every
/// retry went back to it).
#[test]
fn a_refused_heavy_backend_does_not_hide_a_light_one() {
    for weights in [[100, 1], [1, 100], [50, 3]] {
        let b = Balancer::new(Selection::new(vec![
            backend(1, weights[0]),
            backend(2, weights[1]),
        ]));
        for _ in 0..300 {
            let first = b.pick(|_| false).unwrap();
            let other = b.pick(|c| c.addr == first.addr).unwrap();
            assert_ne!(other.addr, first.addr, "weights {weights:?}");
        }
    }
    let one = Balancer::new(Selection::new(vec![backend(1, 100)]));
    let only = one.pick(|_| true).expect("a refused one rather than none");
    assert_eq!(only.addr, backend(1, 100).addr);
}

fn picks(b: &Balancer, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| match b.pick(|_| false).unwrap().addr.ip() {
            std::net::IpAddr::V4(v4) => v4.octets()[3],
            _ => unreachable!(),
        })
        .collect()
}

#[test]
fn interleaves_instead_of_blocks() {
    let b = Balancer::new(Selection::new(vec![
        backend(1, 1),
        backend(2, 2),
        backend(3, 1),
    ]));
    let seq = picks(&b, 8);
    assert_eq!(seq, vec![2, 1, 2, 3, 2, 1, 2, 3]);
}

/// Over every window of sum(weights) consecutive picks each backend gets its weight ±1.
#[test]
fn every_window_is_fair() {
    let cases: &[&[u32]] = &[
        &[1, 2, 1],
        &[5, 1, 1],
        &[10, 20, 30],
        &[3, 3, 7, 7, 7, 1],
        &[100, 1],
        &[2, 3, 5, 7, 11, 13],
        &[1; 9],
    ];
    for weights in cases {
        let set: Vec<Backend> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| backend(i as u8 + 1, *w))
            .collect();
        let b = Balancer::new(Selection::new(set));
        let total: u32 = weights.iter().sum();
        let seq = picks(&b, total as usize * 4);
        for window in seq.windows(total as usize) {
            for (i, w) in weights.iter().enumerate() {
                let got = window.iter().filter(|x| **x == i as u8 + 1).count() as i64;
                assert!(
                    (got - i64::from(*w)).abs() <= 1,
                    "weights {weights:?}: backend {i} got {got} in window {window:?}"
                );
            }
        }
    }
}

#[test]
fn rotation_continues_across_a_change() {
    let set = |lasts: &[u8]| Selection::new(lasts.iter().map(|l| backend(*l, 1)).collect());
    let b = Balancer::new(set(&[1, 2, 3]));
    assert_eq!(picks(&b, 2), vec![1, 2]);
    b.swap(set(&[1, 2, 3, 4]));
    assert_eq!(picks(&b, 3), vec![3, 4, 1], "3 was due, not a restart at 1");
    b.swap(set(&[1, 3, 4])); // 2 leaves; 2 was due next
    assert_eq!(picks(&b, 2), vec![3, 4]);
}

#[test]
fn segments_side_by_side_are_picked_like_one_set() {
    // Two weight classes spread over three segments (services).
    let segments = vec![
        Segment::new(vec![backend(1, 3), backend(2, 3)]),
        Segment::new(vec![backend(3, 1)]),
        Segment::new(vec![backend(5, 1), backend(4, 3)]),
    ];
    let s = Selection::from_segments(segments);
    assert_eq!(s.len(), 5);
    for (last, weight) in [(1, 3), (2, 3), (3, 1), (4, 3), (5, 1)] {
        let addr = SocketAddr::from(([10, 0, 0, last], 80));
        assert_eq!(s.find(&addr).map(|b| b.weight), Some(weight), "{addr}");
    }
    let order: Vec<u32> = s.iter().map(|b| b.weight).collect();
    assert_eq!(order, vec![3, 3, 3, 1, 1], "heaviest class first");
    let b = Balancer::new(s);
    let seq = picks(&b, 11 * 4);
    for window in seq.windows(11) {
        for (last, weight) in [(1, 3), (2, 3), (3, 1), (4, 3), (5, 1)] {
            let got = window.iter().filter(|x| **x == last).count() as i64;
            assert!((got - weight).abs() <= 1, "{last} got {got} in {window:?}");
        }
    }
}

#[test]
fn rotation_continues_when_one_segment_changes() {
    let kept = Segment::new(vec![backend(1, 1), backend(2, 1)]);
    let b = Balancer::new(Selection::from_segments(vec![
        kept.clone(),
        Segment::new(vec![backend(3, 1), backend(4, 1)]),
    ]));
    assert_eq!(picks(&b, 2), vec![1, 2]);
    // 3 was due; the second service gains 5.
    b.swap(Selection::from_segments(vec![
        kept.clone(),
        Segment::new(vec![backend(3, 1), backend(4, 1), backend(5, 1)]),
    ]));
    assert_eq!(picks(&b, 5), vec![3, 4, 5, 1, 2]);
    // 3 was due again and leaves: the rotation goes on from its place.
    b.swap(Selection::from_segments(vec![
        kept,
        Segment::new(vec![backend(4, 1), backend(5, 1)]),
    ]));
    assert_eq!(picks(&b, 4), vec![4, 5, 1, 2]);
}

#[test]
fn a_segment_keeps_the_heaviest_of_a_repeated_address() {
    let s = Segment::new(vec![
        backend(1, 2),
        backend(1, 7),
        backend(2, 0),
        backend(1, 3),
    ]);
    let kept: Vec<(SocketAddr, u32)> = s.backends().iter().map(|b| (b.addr, b.weight)).collect();
    assert_eq!(kept, vec![(SocketAddr::from(([10, 0, 0, 1], 80)), 7)]);
}

#[test]
fn retries_skip_tried_backends() {
    let b = Balancer::new(Selection::new(vec![backend(1, 1), backend(2, 1)]));
    let first = b.pick(|_| false).unwrap();
    let second = b.pick(|b| b.addr == first.addr).unwrap();
    assert_ne!(first.addr, second.addr);
    // With everything excluded there is still an answer (better a retry than none).
    assert!(b.pick(|_| true).is_some());
}

#[test]
fn empty_and_zero_weights() {
    let b = Balancer::new(Selection::new(vec![backend(1, 0)]));
    assert!(b.pick(|_| false).is_none());
    let b = Balancer::default();
    assert!(b.pick(|_| false).is_none());
}
