//! loadgen: Pulsar Relay's bundled load generator.
//!
//! A skeleton for now: the benchmark issue fills in the publish, bulk, e2e, fanout and
//! connections scenarios. It builds so the workspace layout is fixed from the start.

fn main() {
    eprintln!("loadgen: no scenarios yet (see the benchmark issue)");
    std::process::exit(2);
}
