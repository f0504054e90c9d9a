//! Rebuilding an upstream from the discovery store: which endpoints of each service get traffic
//! (Kubernetes conditions, the empty hold, slow start, carried-over health), the weighted
//! selection and traffic plan swapped in, and the endpoint gauges. Runs on discovery events and
//! hold timers, never on the request path.

use super::*;

impl Upstream {
    /// Recomputes the backends from the store and swaps them in.
    ///
    /// Kubernetes conditions decide who gets traffic: ready endpoints (`ready` unset counts as
    /// ready) when there is any in the whole upstream; otherwise the `serving` ones, terminating or
    /// not, as a fallback, because a draining Pod still beats a 503.
    pub fn rebuild(&self, store: &Store) -> Rebuilt {
        // Held for the whole rebuild: concurrent rebuilds (several sources, the hold timer) then
        // apply in order and an older one can never overwrite a newer one.
        let mut views_guard = match self.views.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = Instant::now();
        let mut holding = false;
        let mut views = Vec::with_capacity(self.conf.services.len());
        let states: Vec<_> = (0..self.conf.services.len())
            .map(|i| store.get(&self.key(i)))
            .collect();
        for (i, svc) in self.conf.services.iter().enumerate() {
            let old = views_guard.get(i);
            let unchanged = match (old.and_then(|o| o.source.as_ref()), &states[i]) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            if let (true, Some(old)) = (unchanged, old) {
                if old.emptied_at.is_none() {
                    views.push(old.clone());
                    continue;
                }
            }
            let fresh = match &states[i] {
                None => ServiceView {
                    problem: Some("no such Service or EndpointSlice seen yet".into()),
                    ..ServiceView::default()
                },
                Some(state) => match state.endpoints(&svc.port) {
                    Ok(endpoints) => ServiceView {
                        endpoints: Arc::new(endpoints),
                        source: Some(state.clone()),
                        ..ServiceView::default()
                    },
                    Err(e) => ServiceView {
                        problem: Some(e.to_string()),
                        source: Some(state.clone()),
                        ..ServiceView::default()
                    },
                },
            };
            let view = match old {
                Some(old) => hold_if_emptied(old, fresh, now),
                None => fresh,
            };
            if view.emptied_at.is_some() {
                holding = true;
                log::info!(
                    "upstream {}: service {} lost its last endpoint; keeping the previous ones \
                     for up to {EMPTY_HOLD:?} in case a replacement slice follows",
                    self.conf.name,
                    self.key(i)
                );
            } else if let Some(p) = &view.problem {
                log::warn!("upstream {}: service {}: {p}", self.conf.name, self.key(i));
            }
            views.push(view);
        }
        let any_ready = views.iter().any(|v| v.endpoints.iter().any(|e| e.ready));
        // Zone-aware: per service entry, whether its tier's locality comes from hints.
        let zone = self.conf.local_zone.as_deref();
        let hints: Vec<bool> = self
            .conf
            .services
            .iter()
            .map(|svc| {
                zone.is_some()
                    && zones::hinted(
                        self.conf
                            .services
                            .iter()
                            .zip(&views)
                            .filter(|(s, _)| s.priority == svc.priority)
                            .flat_map(|(_, v)| v.endpoints.iter())
                            .filter(|e| !e.terminating),
                    )
            })
            .collect();
        // Failure records follow the address from one selection to the next.
        let previous = self.balancer.selection();
        // Endpoints that join a running upstream start slow; those of the first build do not
        // (a restart of podgate must not throttle a whole fleet).
        let first_build = !self.built.swap(true, Ordering::Relaxed);
        let mut ramping = false;
        // A backend at `addr`, with the failure record of `known` (what its service had at that
        // address), else of the previous selection's backend there (a Pod new to its service,
        // usually one per change).
        let mut backend = |addr: SocketAddr,
                           weight: u32,
                           cluster,
                           pod,
                           place: (Option<Arc<str>>, bool),
                           known: Option<&Backend>| {
            let health = match known.or_else(|| previous.find(&addr)) {
                Some(b) => Arc::clone(&b.info.health),
                None if first_build || self.conf.slow_start.is_none() => Default::default(),
                None => Arc::new(Health::joining(now)),
            };
            let (weight, ramps) = health.ramped(weight, self.conf.slow_start, now);
            ramping |= ramps;
            (
                Backend {
                    addr,
                    weight,
                    info: Arc::new(BackendInfo {
                        cluster,
                        pod,
                        health,
                        zone: place.0,
                        local: place.1,
                    }),
                },
                ramps,
            )
        };
        // A service whose endpoints did not change keeps the segment built for it last time:
        // one change in a 7,000-endpoint upstream builds one service's backends, and the new
        // selection shares every other service's with the previous one.
        let mut built = match self.built_services.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut segments = Vec::with_capacity(views.len() + 1);
        for (i, view) in views.iter().enumerate() {
            let svc = &self.conf.services[i];
            let was = built.services.get(i);
            if let Some(kept) = was.filter(|c| {
                c.settled
                    && Arc::ptr_eq(&c.endpoints, &view.endpoints)
                    && c.any_ready == any_ready
                    && c.weight == svc.weight
                    && c.hints == hints[i]
            }) {
                segments.push(kept.segment.clone());
                continue;
            }
            let was = was.map(|c| c.segment.clone()).unwrap_or_default();
            let mut had = Had::new(&was);
            let mut settled = true;
            let backends = view
                .endpoints
                .iter()
                .filter(|e| if any_ready { e.ready } else { e.serving })
                .map(|e| {
                    let pod = e.pod.as_deref().map(Arc::from);
                    let cluster = Some(svc.cluster.clone());
                    let known = had.at(&e.addr);
                    // Zones are kept only where they are used (an `Arc<str>` per Pod otherwise).
                    let place = match zone {
                        Some(z) => (
                            e.zone.as_deref().map(Arc::from),
                            zones::is_local(e, z, hints[i]),
                        ),
                        None => (None, false),
                    };
                    let (b, ramps) = backend(e.addr, svc.weight, cluster, pod, place, known);
                    settled &= !ramps;
                    b
                })
                .collect();
            let segment = Segment::new(backends);
            segments.push(segment.clone());
            built.set_service(
                i,
                BuiltService {
                    endpoints: view.endpoints.clone(),
                    any_ready,
                    weight: svc.weight,
                    settled,
                    counts: state_counts(&view.endpoints, any_ready),
                    hints: hints[i],
                    segment,
                },
            );
        }
        if !self.conf.nodes.is_empty() {
            let nodes = self
                .conf
                .nodes
                .iter()
                .map(|n| backend(n.address, n.weight, None, None, (None, false), None).0)
                .collect();
            let nodes = Segment::new(nodes);
            segments.push(nodes.clone());
            built.set_nodes(nodes);
        }
        let selection = if built.overlaps == 0 {
            Selection::from_segments(segments.clone())
        } else {
            // Services sharing Pods (or a node): merged, so that each address counts once.
            Selection::new(
                segments
                    .iter()
                    .flat_map(|s| s.backends().iter().cloned())
                    .collect(),
            )
        };
        let counts = self.endpoint_counts(&built.services);
        let overlaps = built.overlaps > 0;
        drop(built);
        if selection.len() != previous.len() {
            log::info!(
                "upstream {}: {} backend(s) live",
                self.conf.name,
                selection.len()
            );
        }
        self.balancer.swap(selection);
        self.recount_down();
        self.changed.send_replace(());
        if !self.traffic.is_plain() {
            let inputs = self.slot_inputs(&views, &segments, overlaps, &hints);
            let plan = self
                .traffic
                .rebuild(&self.balancer, inputs, outlier::now_ms());
            self.publish_plan(&plan);
        }
        self.metrics.set_endpoints(&counts);
        match self.endpoint_gauges.lock() {
            Ok(mut g) => *g = counts,
            Err(poisoned) => *poisoned.into_inner() = counts,
        }
        *views_guard = views;
        match (holding, ramping) {
            (true, _) => Rebuilt::Again(EMPTY_HOLD + Duration::from_millis(10)),
            (false, true) => Rebuilt::Again(RAMP_STEP),
            (false, false) => Rebuilt::Done,
        }
    }
}

impl Upstream {
    /// The slots of the traffic plan, in `Traffic::layout` order: each tier's backends (split
    /// into local and other zones when zone-aware) and the weight Kubernetes lists for them.
    /// `segments` are the services' (in config order), then the static nodes'. With a single
    /// slot its selection is the upstream's own, and only the capacity is computed.
    fn slot_inputs(
        &self,
        views: &[ServiceView],
        segments: &[Arc<Segment>],
        overlaps: bool,
        hints: &[bool],
    ) -> Vec<SlotInput> {
        let layout = self.traffic.layout();
        let zone = self.conf.local_zone.as_deref();
        let priority_of =
            |segment: usize| self.conf.services.get(segment).map_or(0, |s| s.priority);
        let mut inputs = Vec::with_capacity(layout.len());
        for (priority, part) in layout.iter().copied() {
            // Listed capacity: the endpoints that are not terminating, at their service weight.
            // A service held after it emptied (EMPTY_HOLD) lists nothing: its held Pods stay a
            // fallback, but count as no capacity, so the next tier takes over at once.
            let mut total = 0u64;
            let mut held = 0u64;
            for (i, (svc, view)) in self.conf.services.iter().zip(views).enumerate() {
                if svc.priority != priority {
                    continue;
                }
                if view.emptied_at.is_some() {
                    held += segments[i]
                        .backends()
                        .iter()
                        .filter(|b| match part {
                            ZonePart::All => true,
                            ZonePart::Local => b.info.local,
                            ZonePart::Other => !b.info.local,
                        })
                        .map(|b| u64::from(b.weight))
                        .sum::<u64>();
                    continue;
                }
                let n = view
                    .endpoints
                    .iter()
                    .filter(|e| !e.terminating)
                    .filter(|e| match (part, zone) {
                        (ZonePart::All, _) | (_, None) => true,
                        (ZonePart::Local, Some(z)) => zones::is_local(e, z, hints[i]),
                        (ZonePart::Other, Some(z)) => !zones::is_local(e, z, hints[i]),
                    })
                    .count() as u64;
                total += n * u64::from(svc.weight);
            }
            if priority == 0 && part != ZonePart::Local {
                total += self
                    .conf
                    .nodes
                    .iter()
                    .map(|n| u64::from(n.weight))
                    .sum::<u64>();
            }
            let selection = if layout.len() == 1 {
                None
            } else {
                let mine = segments
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| priority_of(*i) == priority);
                Some(match part {
                    ZonePart::All if !overlaps => {
                        Selection::from_segments(mine.map(|(_, s)| s.clone()).collect())
                    }
                    _ => Selection::new(
                        mine.flat_map(|(_, s)| s.backends().iter())
                            .filter(|b| match part {
                                ZonePart::All => true,
                                ZonePart::Local => b.info.local,
                                ZonePart::Other => !b.info.local,
                            })
                            .cloned()
                            .collect(),
                    ),
                })
            };
            inputs.push(SlotInput {
                selection,
                total,
                held,
            });
        }
        inputs
    }

    /// Endpoints per cluster and state, for the `podgate_upstream_endpoints` gauge. Every cluster
    /// the upstream names is listed, so a state that drops to zero is set to zero.
    fn endpoint_counts(&self, built: &[BuiltService]) -> Vec<(String, [i64; 4])> {
        fn slot(counts: &mut Vec<(String, [i64; 4])>, cluster: &str) -> usize {
            match counts.iter().position(|(c, _)| c == cluster) {
                Some(i) => i,
                None => {
                    counts.push((cluster.to_string(), [0; 4]));
                    counts.len() - 1
                }
            }
        }
        let mut counts: Vec<(String, [i64; 4])> = Vec::new();
        for (svc, service) in self.conf.services.iter().zip(built) {
            let i = slot(&mut counts, &svc.cluster);
            for (sum, n) in counts[i].1.iter_mut().zip(service.counts) {
                *sum += n;
            }
        }
        if !self.conf.nodes.is_empty() {
            let i = slot(&mut counts, "static");
            counts[i].1[0] += self.conf.nodes.len() as i64;
        }
        counts
    }
}

/// A service's endpoints by state: ready (gets traffic), draining (terminating, or serving only:
/// a fallback when nothing in the upstream is ready), unhealthy (failing readiness), and a
/// fourth slot the gauge fills in later (ejected).
fn state_counts(endpoints: &[Endpoint], any_ready: bool) -> [i64; 4] {
    let mut counts = [0; 4];
    for e in endpoints {
        let state = if e.ready || (e.serving && !any_ready) {
            0
        } else if e.serving || e.terminating {
            1
        } else {
            2
        };
        counts[state] += 1;
    }
    counts
}

fn has_usable(v: &ServiceView) -> bool {
    v.endpoints.iter().any(|e| e.ready || e.serving)
}

/// Applies the empty hold: `fresh` replaces `old` unless it empties a service that had usable
/// endpoints less than [`EMPTY_HOLD`] ago.
fn hold_if_emptied(old: &ServiceView, fresh: ServiceView, now: Instant) -> ServiceView {
    if has_usable(&fresh) || !has_usable(old) {
        return fresh;
    }
    let since = old.emptied_at.unwrap_or(now);
    if now.duration_since(since) >= EMPTY_HOLD {
        return fresh;
    }
    ServiceView {
        endpoints: old.endpoints.clone(),
        source: fresh.source,
        problem: fresh.problem,
        emptied_at: Some(since),
    }
}
