//! loadgen: Pulsar Relay's bundled load generator.
//!
//! Scenarios (`loadgen <scenario> --help` for flags):
//! - `publish`: single-message publishes over N keep-alive connections; closed loop (max
//!   throughput) or open loop at `--rate` with latency from intended send times.
//! - `bulk`: the same with bulk publishes of `--batch` messages.
//! - `e2e`: publishers and subscribers (WebSocket, long-poll or SSE): delivery latency, and
//!   with `--verify` a check that every acknowledged message reached every subscriber once,
//!   in order.
//! - `fanout`: one topic, many WebSocket subscribers: deliveries/s, delivery lag, misses.
//! - `connections`: many idle WebSocket subscribers held open; relay memory per connection.
//! - `churn`: up to 10,000 WebSocket connections coming and going while publishing; the
//!   relay's connection and subscriber counts and memory must return to the baseline.
//! - `soak`: hours of publishing with reconnecting WebSocket, long-poll and SSE subscribers;
//!   the relay's RSS over time and exact delivery accounting.
//! - `check`: the randomized delivery model checker; starts its own relays (see `check`).
//!
//! This file turns the command line into a run and prints the report. Module map:
//! `cli` flags; `run` shared state and progress; `schedule` send plans; `publish`
//! publishers; `subscribe` subscribers; `delivery` e2e/fanout; `connections`; `verify`
//! delivery accounting; `stats` histograms and counters; `payload` bodies and parsing;
//! `http` connections; `target` the Python relay's differences; `report` output; `churn`; `soak`;
//! `check` the model checker.

mod check;
mod churn;
mod cli;
mod connections;
mod delivery;
mod groupbench;
mod http;
mod payload;
mod publish;
mod report;
mod run;
mod schedule;
mod soak;
mod stats;
mod subscribe;
mod target;
mod verify;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use cli::{Cli, Common, Scenario, Transport};
use http::Endpoint;
use publish::{publish, PublishResult, PublishSpec};
use report::Report;
use run::{Phase, RunCtx};
use schedule::{Plan, Stop};
use stats::LatencySummary;
use target::Target;

/// The measured phase when neither `--duration` nor `--messages` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// A run that could not be set up (exit status 2).
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error(transparent)]
    Url(#[from] http::UrlError),
    #[error(transparent)]
    Target(#[from] target::TargetError),
    #[error(transparent)]
    NoSubscribers(#[from] delivery::NoSubscribers),
    #[error(transparent)]
    SoakSubscribers(#[from] soak::SubscribersNotReady),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

fn invalid(message: impl Into<String>) -> SetupError {
    SetupError::Invalid(message.into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every connection is a descriptor; the usual soft limit (1024) would cap the churn and
    // connections scenarios far below what the relay can hold.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("loadgen: cannot raise the open files limit: {e}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&SetupError::Runtime(e)),
    };
    if let Scenario::Groups(a) = &cli.scenario {
        if a.consumers == 0 || a.connections == 0 || a.duration.is_zero() {
            return fail(&invalid(
                "--consumers, --connections and --duration must be positive",
            ));
        }
        let spec = groupbench::GroupBenchSpec {
            url: a.url.clone(),
            consumers: a.consumers,
            max_in_flight: a.max_in_flight,
            connections: a.connections,
            duration: a.duration,
            rate: a.rate,
            payload_bytes: a.payload_bytes,
            drain_timeout: a.drain_timeout,
            token: a.token.clone(),
        };
        return match runtime.block_on(groupbench::run(&spec)) {
            Ok(report) => {
                if a.json {
                    println!(
                        "{}",
                        serde_json::to_string(&report).unwrap_or_else(|e| e.to_string())
                    );
                } else {
                    print!("{}", report.to_text());
                }
                if report.plain.complete && report.group.complete {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => fail(&invalid(e)),
        };
    }
    if let Scenario::Check(args) = cli.scenario {
        return match check_spec(args) {
            Ok((spec, json)) => {
                let summary = runtime.block_on(check::run(&spec));
                if json {
                    println!(
                        "{}",
                        serde_json::to_string(&summary).unwrap_or_else(|e| e.to_string())
                    );
                } else {
                    print!("{}", summary.to_text());
                }
                if summary.histories == 0 {
                    ExitCode::from(2)
                } else if summary.failures.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => fail(&e),
        };
    }
    match runtime.block_on(run(cli)) {
        Ok((report, json, failed_check)) => {
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
            if failed_check {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => fail(&e),
    }
}

fn fail(e: &SetupError) -> ExitCode {
    eprintln!("loadgen: {e}");
    ExitCode::from(2)
}

/// The model checker's run from its flags: binaries found, pins checked.
fn check_spec(a: cli::CheckArgs) -> Result<(check::CheckSpec, bool), SetupError> {
    use check::history::{Ack, Backend};
    let relay = a
        .relay_bin
        .or_else(|| std::env::var_os("PULSAR_RELAY_BIN").map(Into::into))
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let sibling = exe.parent()?.join("pulsar-relay");
            sibling.is_file().then_some(sibling)
        })
        .or_else(|| check::procs::on_path("pulsar-relay"))
        .ok_or_else(|| invalid("no pulsar-relay binary: give --relay-bin"))?;
    let valkey = a
        .valkey_bin
        .or_else(|| check::procs::on_path("valkey-server"));
    if a.shards.is_some_and(|s| !(1..=2).contains(&s)) {
        return Err(invalid("--shards must be 1 or 2"));
    }
    if a.valkey_connections.is_some_and(|c| !(1..=4).contains(&c)) {
        return Err(invalid("--valkey-connections must be 1 to 4"));
    }
    if a.steps == 0 {
        return Err(invalid("--steps must be at least 1"));
    }
    if !(1..=5).contains(&a.relays) {
        return Err(invalid("--relays must be 1 to 5"));
    }
    if a.relays > 1 && a.backend == Some(cli::CheckBackend::Memory) {
        return Err(invalid(
            "--relays above 1 needs the Valkey backend (memory relays share nothing)",
        ));
    }
    if a.cluster && a.backend == Some(cli::CheckBackend::Memory) {
        return Err(invalid("--cluster needs the Valkey backend"));
    }
    let mut backend = a.backend.map(|b| match b {
        cli::CheckBackend::Memory => Backend::Memory,
        cli::CheckBackend::Valkey => Backend::Valkey,
    });
    if a.relays > 1 || a.cluster {
        backend = Some(Backend::Valkey);
    }
    if valkey.is_none() {
        if backend == Some(Backend::Valkey) {
            return Err(invalid(
                "--backend valkey needs valkey-server (--valkey-bin)",
            ));
        }
        eprintln!("loadgen check: no valkey-server found: memory backend only");
        backend = Some(Backend::Memory);
    }
    let spec = check::CheckSpec {
        seed: a.seed,
        histories: a.histories,
        duration: a.duration,
        steps: a.steps,
        shrink: check::shrink::Budget {
            runs: a.shrink_runs,
            time: a.shrink_time,
        },
        bins: check::exec::Bins {
            relay,
            valkey,
            relays: a.relays,
            cluster: a.cluster,
        },
        pins: check::history::Pins {
            backend,
            shards: a.shards,
            connections: a.valkey_connections,
            // `ack: buffered` is for one writer per topic: with several relays it degrades
            // (docs/scaling.md) and ids acknowledged before that may move, which the oracle
            // rightly reports. Only when asked for.
            ack: match (a.ack, a.relays > 1) {
                (Some(cli::CheckAck::Persisted), _) | (None, true) => Some(Ack::Persisted),
                (Some(cli::CheckAck::Buffered), _) => Some(Ack::Buffered),
                (None, false) => None,
            },
            transport: a.transport,
            auth: a.auth.map(|a| a == cli::CheckAuth::On),
            groups: a.groups.map(|g| g == cli::CheckAuth::On),
        },
        quiet: a.quiet,
    };
    Ok((spec, a.json))
}

/// Checks the common flags and builds the run's shared state.
fn setup(common: &Common, topics: usize) -> Result<Arc<RunCtx>, SetupError> {
    if common.connections == 0 {
        return Err(invalid("--connections must be at least 1"));
    }
    if topics == 0 {
        return Err(invalid("--topics must be at least 1"));
    }
    if common.messages == Some(0) {
        return Err(invalid("--messages must be at least 1"));
    }
    if common.duration.is_some_and(|d| d.is_zero()) {
        return Err(invalid("--duration must be positive"));
    }
    if common.token.is_some() && common.target == cli::TargetKind::Nchan {
        return Err(invalid(
            "--token is for the relays (--target pulsar or python)",
        ));
    }
    let endpoint = Endpoint::parse(&common.url)?;
    let publish_endpoints = common
        .publish_url
        .iter()
        .map(|url| Endpoint::parse(url))
        .collect::<Result<Vec<_>, _>>()?;
    let target = Target::new(common.target, common.token.as_deref(), common.nchan_store)?;
    let names = run::topic_names(common.topic_prefix.as_deref(), topics);
    Ok(RunCtx::new(
        endpoint,
        publish_endpoints,
        target,
        names,
        common.payload_bytes,
        common.timeout,
    ))
}

fn check_rate(rate: f64) -> Result<f64, SetupError> {
    if rate.is_finite() && rate > 0.0 {
        Ok(rate)
    } else {
        Err(invalid(
            "--rate must be a positive number of messages per second",
        ))
    }
}

/// The plan in requests: `--messages` and `--rate` count messages, a bulk request carries
/// `per_request` of them (a message count is rounded up to whole requests).
fn plan(common: &Common, rate: Option<f64>, per_request: usize) -> Plan {
    let per = per_request.max(1) as u64;
    Plan {
        warmup: common.warmup,
        stop: match common.messages {
            Some(n) => Stop::Sends(n.div_ceil(per)),
            None => Stop::After(common.duration.unwrap_or(DEFAULT_DURATION)),
        },
        rate: rate.map(|r| r / per as f64),
    }
}

/// Single publishes at `rate` for the whole run, no warm-up: the background load of the
/// churn and soak scenarios.
fn steady_publishing(common: &Common, rate: f64, ledger: bool) -> PublishSpec {
    let mut plan = plan(common, Some(rate), 1);
    plan.warmup = Duration::ZERO;
    PublishSpec {
        plan,
        connections: common.connections,
        batch: None,
        ledger,
    }
}

/// Sets the phase to measure when the warm-up ends.
fn phase_timer(ctx: &Arc<RunCtx>, warmup: Duration) -> tokio::task::JoinHandle<()> {
    ctx.set_phase(if warmup.is_zero() {
        Phase::Measure
    } else {
        Phase::Warmup
    });
    let ctx = ctx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(warmup).await;
        ctx.set_phase(Phase::Measure);
    })
}

fn base_report(
    scenario: &'static str,
    common: &Common,
    ctx: &RunCtx,
    plan: &Plan,
    batch: Option<usize>,
    published: Option<&PublishResult>,
) -> Report {
    let c = &ctx.counters;
    let measured = published.map_or(0.0, |p| p.measured.as_secs_f64());
    let acknowledged = c.get(&c.acked);
    Report {
        scenario,
        target: ctx.target.name(),
        url: common.url.clone(),
        publish_urls: common.publish_url.clone(),
        mode: if plan.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        rate: plan.rate.map(|r| r * batch.unwrap_or(1) as f64),
        connections: common.connections,
        topics: ctx.topics.len(),
        payload_bytes: common.payload_bytes,
        batch,
        warmup_s: plan.warmup.as_secs_f64(),
        measured_s: measured,
        sent: c.get(&c.sent),
        acknowledged,
        failed: c.get(&c.failed),
        failures: c.failures(),
        requests: c.get(&c.requests),
        throughput_msg_s: if measured > 0.0 {
            acknowledged as f64 / measured
        } else {
            0.0
        },
        behind_schedule: published.and_then(|p| p.behind_schedule),
        latency: published.map_or_else(LatencySummary::empty, |p| p.latency.clone()),
        service_time: published.and_then(|p| p.service_time.clone()),
        delivery: None,
        held: None,
        churn: None,
        soak: None,
    }
}

/// Runs the scenario; returns the report, whether to print JSON, and whether a delivery
/// check failed.
async fn run(cli: Cli) -> Result<(Report, bool, bool), SetupError> {
    match cli.scenario {
        // Handled in `main`: it starts its own relays and has its own report.
        Scenario::Check(_) | Scenario::Groups(_) => Err(invalid("not a load scenario")),
        Scenario::Publish { common, load } => {
            let rate = load.rate.map(check_rate).transpose()?;
            let ctx = setup(&common, common.topics)?;
            let plan = plan(&common, rate, 1);
            let report = publish_only("publish", &common, ctx, plan, None).await;
            Ok((report, common.json, false))
        }
        Scenario::Bulk {
            common,
            load,
            batch,
        } => {
            let rate = load.rate.map(check_rate).transpose()?;
            let ctx = setup(&common, common.topics)?;
            let max = ctx.target.max_bulk();
            if max == 0 {
                return Err(invalid(format!(
                    "the bulk scenario has no {} counterpart",
                    ctx.target.name()
                )));
            }
            if batch == 0 || batch > max {
                return Err(invalid(format!(
                    "--batch must be 1 to {max} for the {} relay",
                    ctx.target.name()
                )));
            }
            let plan = plan(&common, rate, batch);
            let report = publish_only("bulk", &common, ctx, plan, Some(batch)).await;
            Ok((report, common.json, false))
        }
        Scenario::E2e {
            common,
            delivery,
            transport,
            subscribers,
            verify,
            closed_loop,
        } => {
            let report = deliveries(
                "e2e",
                &common,
                common.topics,
                (!closed_loop).then_some(delivery.rate),
                delivery.drain_timeout,
                transport,
                subscribers,
            )
            .await?;
            let failed = verify
                && report
                    .delivery
                    .as_ref()
                    .is_some_and(|d| !d.check.clean() || !d.drained);
            Ok((report, common.json, failed))
        }
        Scenario::Fanout {
            common,
            delivery,
            subscribers,
        } => {
            let report = deliveries(
                "fanout",
                &common,
                1,
                Some(delivery.rate),
                delivery.drain_timeout,
                Transport::Ws,
                subscribers,
            )
            .await?;
            Ok((report, common.json, false))
        }
        Scenario::Connections {
            common,
            subscribers,
            hold,
            relay_pid,
        } => {
            if subscribers == 0 {
                return Err(invalid("--subscribers must be at least 1"));
            }
            let ctx = setup(&common, 1)?;
            let progress = ctx.spawn_progress(common.quiet);
            let held = connections::run(ctx.clone(), subscribers, hold, relay_pid).await;
            if let Some(p) = progress {
                p.abort();
            }
            let plan = Plan {
                warmup: Duration::ZERO,
                stop: Stop::After(hold),
                rate: None,
            };
            let mut report = base_report("connections", &common, &ctx, &plan, None, None);
            report.connections = subscribers;
            report.measured_s = held.hold_s;
            report.throughput_msg_s = 0.0;
            report.held = Some(held);
            Ok((report, common.json, false))
        }
        Scenario::Churn {
            common,
            concurrent,
            rate,
            life_min,
            life_max,
            relay_pid,
            settle_timeout,
        } => {
            let rate = check_rate(rate)?;
            if concurrent == 0 {
                return Err(invalid("--concurrent must be at least 1"));
            }
            if life_max < life_min {
                return Err(invalid("--life-max must be at least --life-min"));
            }
            let ctx = setup(&common, common.topics)?;
            if ctx.target.name() != "pulsar" {
                return Err(invalid(
                    "churn drives this relay only (it reads /api/v1/stats)",
                ));
            }
            let publish_spec = steady_publishing(&common, rate, false);
            let plan = publish_spec.plan;
            let spec = churn::ChurnSpec {
                concurrent,
                life_min,
                life_max,
                relay_pid,
                settle_timeout,
            };
            let (published, churned) = churn::run(ctx.clone(), spec, publish_spec).await;
            let mut report = base_report("churn", &common, &ctx, &plan, None, Some(&published));
            let failed = !churned.settled;
            report.churn = Some(churned);
            Ok((report, common.json, failed))
        }
        Scenario::Soak {
            common,
            rate,
            ws,
            longpoll,
            sse,
            reconnect_every,
            report_every,
            relay_pid,
            drain_timeout,
        } => {
            let rate = check_rate(rate)?;
            if ws + longpoll + sse == 0 {
                return Err(invalid("a soak needs at least one subscriber"));
            }
            if reconnect_every.is_zero() || report_every.is_zero() {
                return Err(invalid(
                    "--reconnect-every and --report-every must be positive",
                ));
            }
            let ctx = setup(&common, common.topics)?;
            let subscribers = vec![
                (Transport::Ws, ws),
                (Transport::Longpoll, longpoll),
                (Transport::Sse, sse),
            ];
            for &(transport, count) in &subscribers {
                if let Some(why) = ctx.target.unsupported(transport, common.topics) {
                    if count > 0 {
                        return Err(invalid(why));
                    }
                }
            }
            let publish_spec = steady_publishing(&common, rate, true);
            let plan = publish_spec.plan;
            let spec = soak::SoakSpec {
                subscribers,
                reconnect_every,
                report_every,
                relay_pid,
                drain_timeout,
            };
            let (published, soaked) = soak::run(ctx.clone(), spec, publish_spec).await?;
            let mut report = base_report("soak", &common, &ctx, &plan, None, Some(&published));
            let failed = !soaked.clean();
            report.soak = Some(soaked);
            Ok((report, common.json, failed))
        }
    }
}

async fn publish_only(
    scenario: &'static str,
    common: &Common,
    ctx: Arc<RunCtx>,
    plan: Plan,
    batch: Option<usize>,
) -> Report {
    let progress = ctx.spawn_progress(common.quiet);
    let timer = phase_timer(&ctx, plan.warmup);
    let spec = PublishSpec {
        plan,
        connections: common.connections,
        batch,
        ledger: false,
    };
    let start = ctx.elapsed();
    let published = publish(ctx.clone(), spec, start).await;
    timer.abort();
    if let Some(p) = progress {
        p.abort();
    }
    base_report(scenario, common, &ctx, &plan, batch, Some(&published))
}

async fn deliveries(
    scenario: &'static str,
    common: &Common,
    topics: usize,
    rate: Option<f64>,
    drain_timeout: Duration,
    transport: Transport,
    subscribers: usize,
) -> Result<Report, SetupError> {
    let rate = rate.map(check_rate).transpose()?;
    if subscribers == 0 {
        return Err(invalid("--subscribers must be at least 1"));
    }
    let ctx = setup(common, topics)?;
    if let Some(why) = ctx.target.unsupported(transport, topics) {
        return Err(invalid(why));
    }
    let plan = plan(common, rate, 1);
    let spec = PublishSpec {
        plan,
        connections: common.connections,
        batch: None,
        ledger: true,
    };
    let progress = ctx.spawn_progress(common.quiet);
    let outcome = delivery::run(
        ctx.clone(),
        delivery::DeliverySpec {
            transport,
            publish_urls: common.publish_url.clone(),
            subscribers,
            drain_timeout,
        },
        spec,
    )
    .await;
    if let Some(p) = progress {
        p.abort();
    }
    let (published, delivered) = outcome?;
    let mut report = base_report(scenario, common, &ctx, &plan, None, Some(&published));
    report.delivery = Some(delivered);
    Ok(report)
}
