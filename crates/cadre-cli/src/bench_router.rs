//! `cadre bench router`: routing a signal type against many routes, against an exact-match hash
//! map lookup of the whole type (the cheapest possible routing) in the same run.
//!
//! The route table mixes distinct exact paths (80%), `*` paths (15%) and `**` paths (5%) over 100
//! services; looked-up types hit exact routes, wildcard routes and nothing. Each lookup is timed on its own
//! (the clock read, about 20 ns, is included in both figures).

use std::hint::black_box;
use std::time::Instant;

use anyhow::{bail, Result};
use cadre::router::{RouteSpec, Router};
// The same fast hasher the router uses, so the baseline is the cheapest honest lookup.
use rustc_hash::FxHashMap as HashMap;

const SERVICES: usize = 100;
/// Lookups timed together (one clock read per batch; this VM's clock reads cost tens of ns).
const BATCH: usize = 64;

fn path_of(i: usize) -> String {
    let (svc, k) = (i % SERVICES, i / SERVICES);
    match i % 20 {
        0 => format!("svc{svc}.region{k}.**"),
        1..=3 => format!("svc{svc}.*.event{k}"),
        _ => format!("svc{svc}.entity{k}.event{}", k % 7),
    }
}

/// A type that matches route `j`'s path (every fourth lookup is a miss instead).
fn type_of(i: usize, routes: usize) -> String {
    let j = (i * 7919) % routes;
    let (svc, k) = (j % SERVICES, j / SERVICES);
    if i % 4 == 3 {
        return format!("svc{svc}.unknown.thing");
    }
    match j % 20 {
        0 => format!("svc{svc}.region{k}.deep.path"),
        1..=3 => format!("svc{svc}.anything.event{k}"),
        _ => format!("svc{svc}.entity{k}.event{}", k % 7),
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn run(routes: usize, lookups: usize) -> Result<()> {
    if !(1..=1_000_000).contains(&routes) || !(1000..=100_000_000).contains(&lookups) {
        bail!("--routes must be within 1..=1000000 and --lookups within 1000..=100000000");
    }
    let mut router: Router<usize> = Router::new();
    let mut exact: HashMap<String, Vec<usize>> = HashMap::default();
    for i in 0..routes {
        let path = path_of(i);
        router.add(RouteSpec::new(path.clone(), i))?;
        exact.entry(path).or_default().push(i);
    }
    let types: Vec<String> = (0..4096).map(|i| type_of(i, routes)).collect();
    debug_assert_eq!(types.len() % BATCH, 0);
    let batches = lookups / BATCH;
    let (mut ours, mut base) = (Vec::with_capacity(batches), Vec::with_capacity(batches));
    let mut matched = 0usize;
    for b in 0..batches {
        let batch = &types[(b * BATCH) % types.len()..][..BATCH];
        // Alternate the two so both see the same cache and machine conditions.
        let t = Instant::now();
        for ty in batch {
            matched += black_box(router.route(black_box(ty), &())).map(|v| v.len()).unwrap_or(0);
        }
        ours.push(t.elapsed().as_nanos() as u64 / BATCH as u64);
        let t = Instant::now();
        for ty in batch {
            black_box(exact.get(black_box(ty.as_str())).map(|v| v.len()));
        }
        base.push(t.elapsed().as_nanos() as u64 / BATCH as u64);
    }
    let lookups = batches * BATCH;
    ours.sort_unstable();
    base.sort_unstable();
    let (p50, p99) = (percentile(&ours, 0.5), percentile(&ours, 0.99));
    let (b50, b99) = (percentile(&base, 0.5), percentile(&base, 0.99));
    println!("{:<28} {:>12} {:>14} {:>8}", "measure", "router", "exact hashmap", "ratio");
    println!("{:<28} {:>12} {:>14} {:>8.2}", "lookup p50 ns", p50, b50, p50 as f64 / b50.max(1) as f64);
    println!("{:<28} {:>12} {:>14} {:>8.2}", "lookup p99 ns", p99, b99, p99 as f64 / b99.max(1) as f64);
    println!("{:<28} {:>12} {:>14} {:>8}", "routes / lookups", routes, lookups, "-");
    println!("{:<28} {:>12.2} {:>14} {:>8}", "targets per lookup", matched as f64 / lookups as f64, "-", "-");
    let json = serde_json::json!({
        "bench": "router",
        "routes": routes,
        "lookups": lookups,
        "route_p50_ns": p50,
        "route_p99_ns": p99,
        "baseline_p50_ns": b50,
        "baseline_p99_ns": b99,
        "ratio_p50": ((p50 as f64 / b50.max(1) as f64) * 100.0).round() / 100.0,
        "targets_per_lookup": ((matched as f64 / lookups as f64) * 100.0).round() / 100.0,
    });
    println!("{json}");
    Ok(())
}
